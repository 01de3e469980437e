"""Stage-2 building blocks on the real tiny model and cache: batching, and policy log-probs that reproduce the
stage-1 hf backend's per-token numbers (the reason step 0 starts at exactly ln 2)."""

import numpy as np
import pytest
import torch

from dpo import data as D
from dpo.logps import CompletionLogps, batch_logps
from pipeline.logps import TokenLogp


@pytest.fixture(scope="module")
def pairs(train_cache):
    return D.load_pairs(train_cache)


def test_token_logp_gradients():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(9, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(13, 6, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, 13, (9,), generator=g)
    assert torch.autograd.gradcheck(lambda a, b: TokenLogp.apply(a, b, t, torch.float64), (h, w))
    want = torch.log_softmax(h @ w.T, -1).gather(1, t[:, None]).squeeze(1)
    assert torch.allclose(TokenLogp.apply(h, w, t, torch.float64), want, atol=1e-12)


def test_policy_logps_equal_cached_reference(pairs, tiny_model_dir, train_cache):
    """Same model as the cache's reference -> the same per-token log-probs (fp32) and sums."""
    import pyarrow as pa
    from transformers import AutoModelForCausalLM

    from pipeline import cache as pcache

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    net = CompletionLogps(model)
    assert net.fused  # the chunked LM-head path, not the generic one
    idx = np.argsort(-pairs.seq_len)[:6]  # the longest pairs: most padding elsewhere in a batch
    idx = np.concatenate([idx, np.arange(10)])  # mixed lengths in one padded batch
    batch = D.collate(pairs, idx)
    with torch.no_grad():
        pc, pr, tok = batch_logps(net, batch, "cpu")
    table = pcache.load_table(train_cache, columns=["ref_chosen_token_logps", "ref_rejected_token_logps"])
    rows = pa.array(idx)
    want = np.concatenate(
        [
            np.asarray(x, np.float32)
            for col in ("ref_chosen_token_logps", "ref_rejected_token_logps")
            for x in table.column(col).take(rows).to_pylist()
        ]
    )
    assert tok.shape == want.shape
    assert np.abs(tok.numpy() - want).max() < 1e-5
    assert np.abs(pc.numpy() - pairs.ref_chosen_logp[idx]).max() < 1e-4
    assert np.abs(pr.numpy() - pairs.ref_rejected_logp[idx]).max() < 1e-4


def test_shared_prompt_rows_equal_separate_rows(pairs, tiny_model_dir):
    """One row [prompt, chosen, rejected] per pair (prompt run once) gives the per-token log-probs of the two
    separate rows, and gradients through both layouts agree."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    net = CompletionLogps(model)
    idx = np.concatenate([np.argsort(-pairs.packed_len)[:3], np.arange(5)])  # long and mixed, padded
    sep, shared = D.collate(pairs, idx), D.collate(pairs, idx, share_prompt=True)
    assert shared["input_ids"].shape[0] == len(idx) and shared["padded"] < sep["padded"]
    assert torch.equal(shared["targets"], sep["targets"]) and torch.equal(shared["seq_index"], sep["seq_index"])
    out = {}
    for name, batch in (("sep", sep), ("shared", shared)):
        model.zero_grad()
        pc, pr, tok = batch_logps(net, batch, "cpu")
        (pc - pr).sum().backward()
        out[name] = (pc.detach(), pr.detach(), tok.detach(), model.model.layers[0].mlp.up_proj.weight.grad.clone())
    a, b = out["sep"], out["shared"]
    print(f"shared vs separate rows: max per-token |diff| {(a[2] - b[2]).abs().max():.2e}")
    assert (a[2] - b[2]).abs().max() < 1e-5
    assert (a[0] - b[0]).abs().max() < 1e-4 and (a[1] - b[1]).abs().max() < 1e-4
    assert torch.allclose(a[3], b[3], rtol=1e-3, atol=1e-5)
    # a rejected token may not see the chosen completion: changing chosen leaves rejected log-probs alone
    mask = shared["attention_mask"][0, 0]
    n_p, n_c = int(pairs.prompt_len[idx[0]]), int(pairs.chosen_len[idx[0]])
    assert not mask[n_p + n_c :, n_p : n_p + n_c].any() and mask[n_p + n_c :, :n_p].all()


def test_split_tokens_bounds_each_forward(pairs):
    idx = D.split_batch(np.arange(32), pairs.seq_len, 1)[0]
    for cost in (2 * pairs.seq_len, pairs.packed_len):
        for budget in (1, 200, 600, 10**9):
            pieces = D.split_tokens(idx, cost, budget)
            assert np.concatenate(pieces).tolist() == idx.tolist()  # same pairs, same order
            for p in pieces:
                assert len(p) == 1 or len(p) * cost[p].max() <= budget
            if budget == 10**9:
                assert len(pieces) == 1
    assert len(D.split_tokens(idx, pairs.packed_len, 0)) == 1


def test_collate_layout(pairs):
    idx = np.array([3, 0, 7])
    b = D.collate(pairs, idx)
    ids = b["input_ids"]
    assert ids.shape[0] == 6
    for j, i in enumerate(idx):
        p = pairs.prompt[0][pairs.prompt[1][i] : pairs.prompt[1][i + 1]]
        c = pairs.chosen[0][pairs.chosen[1][i] : pairs.chosen[1][i + 1]]
        r = pairs.rejected[0][pairs.rejected[1][i] : pairs.rejected[1][i + 1]]
        assert ids[j, : len(p) + len(c)].tolist() == [*p, *c]
        assert ids[3 + j, : len(p) + len(r)].tolist() == [*p, *r]
    # every completion token is a target, predicted from the position before it
    flat = ids.reshape(-1)
    assert torch.equal(flat[b["hidden_index"] + 1], b["targets"])
    assert len(b["targets"]) == int(pairs.chosen_len[idx].sum() + pairs.rejected_len[idx].sum())


def test_epoch_batches_cover_deterministic_and_length_grouped(pairs):
    lengths = pairs.seq_len
    n, bs = len(pairs), 8
    a = D.epoch_batches(lengths, bs, seed=1, epoch=0)
    assert [x.tolist() for x in a] == [x.tolist() for x in D.epoch_batches(lengths, bs, seed=1, epoch=0)]
    b = D.epoch_batches(lengths, bs, seed=1, epoch=1)
    assert [x.tolist() for x in a] != [x.tolist() for x in b]
    flat = np.concatenate(a)
    assert len(flat) == (n // bs) * bs and len(set(flat.tolist())) == len(flat)

    def padded(batches):
        return sum(len(x) * lengths[x].max() for x in batches) / sum(lengths[x].sum() for x in batches)

    rng = np.random.default_rng(0)
    random_batches = list(rng.permutation(n)[: (n // bs) * bs].reshape(-1, bs))
    assert padded(a) < padded(random_batches)
    assert padded(a) < 1.25  # under 25% padding on the real length spread


def test_split_batch_and_probe_subset(pairs):
    idx = np.arange(16)
    parts = D.split_batch(idx, pairs.seq_len, 4)
    assert len(parts) == 4 and sorted(np.concatenate(parts).tolist()) == idx.tolist()
    s = D.probe_subset(len(pairs), 10, seed=3)
    assert len(s) == 10 and s.tolist() == D.probe_subset(len(pairs), 10, seed=3).tolist()
    assert D.probe_subset(5, 10, seed=3).tolist() == [0, 1, 2, 3, 4]
