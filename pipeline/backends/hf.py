"""The hf backend: transformers forward in this process (pipeline/logps.py's kernel for score_pairs).

Length-sorted batches, fp32 log-softmax. Scores a pair as one row [prompt, chosen, rejected]
(pipeline/packing.py) so the prompt runs once; `score` (two rows per pair) stays the independent oracle that
`refcache verify` uses. compile=True runs the decoder through torch.compile (fused norms, RoPE and activations;
measured in BENCHMARKS.md).
"""

import functools
import time

import numpy as np
import torch

from pipeline.backends import Backend, Flag, register, torch_dtype
from pipeline.logps import bf16_matmul_native
from refcache_base import UserError
from refcache_base.cache_schema import CHES_COMPUTED, CHES_NO_LAYOUT

BATCH_SIZE = 16  # sequences per forward when not given
HF_CHES_METHOD = "from the scoring forward (no second pass)"  # short: it is in every part's metadata


@register
class HFScorer(Backend):
    """transformers forward. `score_pairs` (what precompute uses) runs one shared-prompt row per pair through
    the log-prob kernel stage 2 trains with (pipeline/logps.py: the LM head only at completion positions, in
    row chunks, fp32 log-softmax). `score`, the oracle: sequences sorted by length and batched (left padding,
    explicit position ids), the model's own head on the last K positions (K = longest completion + 1)."""

    name = "hf"
    pairs_per_call = 256
    batch_size_help = f"sequences per forward (default {BATCH_SIZE})"
    flags = (Flag("compile", "hf: torch.compile the model first (15-30 s for a 30M model on a CPU, then 8-15%% more "
                             "tokens/s and closer to fp32 in bf16; BENCHMARKS.md): worth it past a few thousand "
                             "pairs"),)
    post_seconds = 0.0  # the forward pass ends in numpy already

    def __init__(self, model_dir, dtype="float32", batch_size=BATCH_SIZE, device=None, compile=False, verbose=False):
        import transformers
        from transformers import AutoModelForCausalLM

        if not verbose:
            transformers.utils.logging.disable_progress_bar()
        self.model_dir = str(model_dir)
        self.dtype = dtype
        self.batch_size = int(batch_size or BATCH_SIZE)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(dtype)).to(self.device)
        self.model.eval()
        self.compute_dtype = dtype
        if dtype == "bfloat16" and not bf16_matmul_native(self.device):
            # No bf16 instructions on this CPU: bf16 matmuls are slower than fp32 (bf16_matmul_native).
            # Keep the bf16-rounded weights, compute in fp32: fp32 speed, and closer to fp32 than bf16 math.
            self.model.float()
            self.compute_dtype = "float32"
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
                "compile": self.compile, "compute_dtype": self.compute_dtype,
                "ches": CHES_COMPUTED if self.can_pack() else CHES_NO_LAYOUT,
                "ches_method": HF_CHES_METHOD if self.can_pack() else None}

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

    def score_pairs(self, triples, on_batch=None):
        """triples: (prompt, chosen, rejected) token id lists -> [(chosen logps, rejected logps, ches, ln_ches)]:
        per-token float32 arrays and the pair's CHES scores (pipeline/ches.py, floats) from the same forward.
        Each pair is scored as one shared-prompt row; pairs sorted by length, `batch_size // 2` per forward,
        on_batch(pairs, tokens) after each."""
        lengths = [len(p) + len(c) + len(r) for p, c, r in triples]
        order = np.argsort([-n for n in lengths], kind="stable")
        out = [None] * len(triples)
        step = max(1, self.batch_size // 2)
        for i in range(0, len(order), step):
            idx = order[i : i + step]
            for j, lp in zip(idx, self._packed_batch([triples[j] for j in idx])):
                out[j] = lp
            if on_batch is not None:
                on_batch(len(idx), sum(lengths[j] for j in idx))
        return out

    @functools.cached_property
    def _net(self):
        from pipeline.logps import CompletionLogps

        return CompletionLogps(self.model, decode=self._decode)

    @torch.no_grad()
    def _packed_batch(self, triples):
        """One forward over shared-prompt rows through the kernel stage 2 trains with (pipeline/logps.py); CHES
        from the same forward's hidden states at the scored positions (the LM head's input)."""
        from pipeline.ches import ches_scores
        from pipeline.packing import pack_pairs

        b = {k: v.to(self.device) for k, v in pack_pairs(triples, self.pad_id).items()}
        h = self._net.completion_hidden(b["hidden_index"], input_ids=b["input_ids"], position_ids=b["position_ids"],
                                        attention_mask=b["attention_mask"])
        lp = self._net.head_logps(h, b["targets"]).cpu().numpy().astype(np.float32)
        ches, ln_ches = (x.cpu().tolist() for x in ches_scores(h, b["seq_index"], len(triples)))
        n_c = sum(len(c) for _, c, _ in triples)
        ends_c = np.cumsum([len(c) for _, c, _ in triples])[:-1]
        ends_r = np.cumsum([len(r) for _, _, r in triples])[:-1]
        return list(zip(np.split(lp[:n_c], ends_c), np.split(lp[n_c:], ends_r), ches, ln_ches))

    def score(self, seqs, starts, on_batch=None, sort=True):
        order = np.argsort([-len(s) for s in seqs], kind="stable") if sort else np.arange(len(seqs))
        out = [None] * len(seqs)
        for i in range(0, len(order), self.batch_size):
            idx = order[i: i + self.batch_size]
            for j, lp in zip(idx, self._batch([seqs[j] for j in idx], [int(starts[j]) for j in idx])):
                out[j] = lp
            if on_batch is not None:
                on_batch(len(idx), sum(len(seqs[j]) for j in idx))
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
