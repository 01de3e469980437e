"""The one log-prob kernel (pipeline/logps.py) at SmolLM2's size: values and gradients against a plain full-vocab
log_softmax, and stage 1 producing exactly what the kernel produces."""

import numpy as np
import pytest
import torch

from pipeline.logps import CHUNK_ELEMENTS, TokenLogp, token_logps


@pytest.fixture(scope="module")
def head(smollm2_dir):
    """SmolLM2's real LM head (tied to the embeddings): (49152, 576) fp32."""
    from safetensors import safe_open

    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as f:
        return f.get_tensor("model.embed_tokens.weight").float()


def _reference(h, w, t):
    return torch.log_softmax(h @ w.T, dim=-1).gather(1, t[:, None])[:, 0]


def test_kernel_matches_full_vocab_log_softmax(head):
    g = torch.Generator().manual_seed(0)
    n = 2 * (CHUNK_ELEMENTS // head.shape[0]) + 17  # three row chunks, the last one short
    h = (torch.randn(n, head.shape[1], generator=g) * 2).requires_grad_()
    w = head.clone().requires_grad_()
    t = torch.randint(0, head.shape[0], (n,), generator=g)
    coef = torch.randn(n, generator=g)  # a loss that weights every token differently

    got = TokenLogp.apply(h, w, t, torch.float32)
    (got * coef).sum().backward()
    g_h, g_w = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    want = _reference(h, w, t)
    (want * coef).sum().backward()

    print(f"kernel vs log_softmax at vocab {head.shape[0]}: values {(got - want).abs().max():.1e}, "
          f"grad h {(g_h - h.grad).abs().max():.1e}, grad W {(g_w - w.grad).abs().max():.1e}")
    assert got.dtype == torch.float32 and want.min() < -10  # real spread of log-probs, not all near 0
    assert (got - want).abs().max() < 1e-5
    assert (g_h - h.grad).abs().max() < 1e-5
    assert (g_w - w.grad).abs().max() < 1e-5
    # the oracle's helper (HFScorer.score) agrees too
    with torch.no_grad():
        assert (token_logps(h @ w.T, t) - want).abs().max() < 1e-5


def test_kernel_bf16_within_bf16_noise(head):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(300, head.shape[1], generator=g) * 2
    t = torch.randint(0, head.shape[0], (300,), generator=g)
    with torch.no_grad():
        got = TokenLogp.apply(h.bfloat16(), head.bfloat16(), t, torch.bfloat16)
        want = _reference(h, head, t)
    assert got.dtype == torch.float32
    assert (got - want).abs().max() < 0.5 and (got - want).abs().mean() < 0.05


def test_stage1_scores_through_the_kernel(smollm2_dir):
    """HFScorer.score_pairs returns exactly the kernel's per-token values for the same shared-prompt rows."""
    from pipeline.backends import HFScorer
    from pipeline.logps import CompletionLogps
    from pipeline.packing import pack_pairs

    scorer = HFScorer(smollm2_dir, "float32", batch_size=8)
    rng = np.random.default_rng(0)
    triples = [tuple(rng.integers(100, 49000, n).tolist() for n in lens) for lens in ((9, 4, 6), (5, 7, 3))]
    got = scorer._packed_batch(triples)
    b = pack_pairs(triples)
    with torch.no_grad():
        _, tok = CompletionLogps(scorer.model)(b["input_ids"], b["hidden_index"], b["targets"], b["seq_index"], 4,
                                               b["position_ids"], b["attention_mask"])
    want = tok.numpy()
    flat = np.concatenate([got[0][0], got[1][0], got[0][1], got[1][1]])  # all chosen, then all rejected
    assert np.array_equal(flat, want)
    # and the independent oracle (two padded rows per pair, the model's own head) agrees within fp32 noise
    seqs = [p + c for p, c, _ in triples] + [p + r for p, _, r in triples]
    starts = [len(p) for p, _, _ in triples] * 2
    oracle = np.concatenate(scorer.score(seqs, starts))  # chosen 0, 1, then rejected 0, 1: the kernel's order
    assert np.abs(flat - oracle).max() < 1e-4


def test_bf16_matmul_native_follows_onednn(monkeypatch):
    """bf16 counts as native only where oneDNN may use the CPU's bf16 instructions: not when the user caps its ISA
    below AVX512_CORE_BF16, not with oneDNN off; other devices always (run bf16 as asked)."""
    from pipeline.logps import bf16_matmul_native

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert not bf16_matmul_native("cpu")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")
    assert not bf16_matmul_native("cpu")
    assert bf16_matmul_native("meta")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    with torch.backends.mkldnn.flags(enabled=False):
        assert not bf16_matmul_native("cpu")


def test_hf_bf16_without_bf16_instructions_computes_in_fp32(smollm2_dir, monkeypatch):
    """On a CPU without bf16 instructions (here: oneDNN capped at AVX2, as on such a CPU) the hf backend keeps the
    bf16-rounded weights but computes in fp32: fp32 speed instead of the 4x slower bf16 path, recorded as
    compute_dtype; its numbers are bf16-weight numbers (not the fp32 model's), within bf16 noise of fp32."""
    from pipeline.backends import HFScorer

    rng = np.random.default_rng(0)
    triples = [tuple(rng.integers(100, 49000, n).tolist() for n in lens) for lens in ((9, 4, 6), (5, 7, 3))]
    fp32 = np.concatenate([x for pair in HFScorer(smollm2_dir, "float32").score_pairs(triples) for x in pair[:2]])
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    scorer = HFScorer(smollm2_dir, "bfloat16")
    assert scorer.settings()["compute_dtype"] == "float32"
    params = list(scorer.model.parameters())
    assert all(p.dtype == torch.float32 for p in params)
    assert all(torch.equal(p, p.bfloat16().float()) for p in params)  # the weights stay bf16-rounded
    got = np.concatenate([x for pair in scorer.score_pairs(triples) for x in pair[:2]])
    assert got.dtype == np.float32 and 0 < np.abs(got - fp32).max() < 0.5
