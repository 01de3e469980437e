"""Each loss against its paper's formula written out in plain Python floats, and against TRL 1.16 where TRL has
a loss of the same name (called through TRL's own DPOTrainer._compute_loss on the same log-probs)."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from dpo import losses as L


def _ls(z):  # log sigmoid, stable
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def _s(z):
    return math.exp(_ls(z))


def paper(name, pc, pr, rc, rr, lc, lr, p):
    """Per-example losses from the papers' formulas, in Python floats (independent of dpo.losses)."""
    b = p["beta"]
    n = len(pc)
    c = [pc[i] - rc[i] for i in range(n)]
    r = [pr[i] - rr[i] for i in range(n)]
    x = [c[i] - r[i] for i in range(n)]
    eps = p.get("label_smoothing", 0.0)
    if name == "sigmoid":
        return [-(1 - eps) * _ls(b * xi) - eps * _ls(-b * xi) for xi in x]
    if name == "ipo":  # Azar et al. Eq. 17: (h - tau^-1 / 2)^2
        return [(xi - 1 / (2 * b)) ** 2 for xi in x]
    if name == "ipo_norm":
        return [(c[i] / lc[i] - r[i] / lr[i] - 1 / (2 * b)) ** 2 for i in range(n)]
    if name == "hinge":
        return [max(0.0, 1 - b * xi) for xi in x]
    if name == "robust":  # Chowdhury et al. Eq. 6
        return [((1 - eps) * -_ls(b * xi) - eps * -_ls(-b * xi)) / (1 - 2 * eps) for xi in x]
    if name == "exo_pair":  # KL(q || p_eps), q = (s(bx), s(-bx)), p = (1-eps, eps)
        out = []
        for xi in x:
            q = [_s(b * xi), _s(-b * xi)]
            pe = [1 - eps, eps]
            out.append(sum(q[k] * (math.log(q[k]) - math.log(pe[k])) for k in range(2)))
        return out
    if name == "nca_pair":
        return [-_ls(b * c[i]) - 0.5 * _ls(-b * c[i]) - 0.5 * _ls(-b * r[i]) for i in range(n)]
    if name == "bco_pair":
        return [-_ls(b * c[i]) - _ls(-b * r[i]) for i in range(n)]
    if name == "sppo_hard":  # (log ratio - eta (P - 1/2))^2 with eta = 1/beta, P in {1, 0}
        eta = 1 / b
        return [(c[i] - eta * (1 - 0.5)) ** 2 + (r[i] - eta * (0 - 0.5)) ** 2 for i in range(n)]
    if name in ("aot", "aot_unpaired"):
        if name == "aot":
            d = [
                u - v
                for u, v in zip(
                    sorted(pc[i] - pr[i] for i in range(n)), sorted(rc[i] - rr[i] for i in range(n))
                )
            ]
        else:
            d = [u - v for u, v in zip(sorted(c), sorted(r))]
        return [-(1 - eps) * _ls(b * di) - eps * _ls(-b * di) for di in d]
    if name == "apo_zero":
        return [(1 - _s(b * c[i])) + _s(b * r[i]) for i in range(n)]
    if name == "apo_down":
        return [_s(b * c[i]) + (1 - _s(b * (c[i] - r[i]))) for i in range(n)]
    if name == "discopop":
        tau = p["discopop_tau"]
        out = []
        for xi in x:
            z = b * xi
            w = _s(z / tau)
            out.append((1 - w) * -_ls(z) + w * math.exp(-z))
        return out
    if name == "sigmoid_norm":
        return [-_ls(b * (c[i] / lc[i] - r[i] / lr[i])) for i in range(n)]
    if name == "dpop":  # Smaug Eq. 3
        lam = p["dpop_lambda"]
        return [-_ls(b * (x[i] - lam * max(0.0, rc[i] - pc[i]))) for i in range(n)]
    if name == "rpo":  # Pang et al. Eq. 1: DPO + alpha * NLL(chosen) / |y_w|
        return [-_ls(b * x[i]) + p["rpo_alpha"] * (-pc[i] / lc[i]) for i in range(n)]
    if name == "rdpo":  # Park et al.: - log s(beta x - (alpha |y_w| - alpha |y_l|))
        a = p["rdpo_alpha"]
        return [-_ls(b * x[i] - (a * lc[i] - a * lr[i])) for i in range(n)]
    if name == "simpo":  # Meng et al. Eq. 6
        return [-_ls(b / lc[i] * pc[i] - b / lr[i] * pr[i] - p["simpo_gamma"]) for i in range(n)]
    raise AssertionError(f"no paper formula for {name}")


def random_batch(seed, n=16):
    g = torch.Generator().manual_seed(seed)
    lc = torch.randint(1, 200, (n,), generator=g).double()
    lr = torch.randint(1, 200, (n,), generator=g).double()
    pc = -(lc * (0.5 + 2 * torch.rand(n, generator=g, dtype=torch.float64)))
    pr = -(lr * (0.5 + 2 * torch.rand(n, generator=g, dtype=torch.float64)))
    rc = pc + 4 * torch.randn(n, generator=g, dtype=torch.float64)
    rr = pr + 4 * torch.randn(n, generator=g, dtype=torch.float64)
    return pc, pr, rc, rr, lc, lr


PARAMS = {
    "label_smoothing": 0.1,
    "rpo_alpha": 0.7,
    "rdpo_alpha": 0.02,
    "simpo_gamma": 0.4,
    "dpop_lambda": 5.0,
    "discopop_tau": 0.05,
}


@pytest.mark.parametrize("name", sorted(L.LOSSES))
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_loss_matches_paper_formula(name, beta):
    for seed in range(3):
        pc, pr, rc, rr, lc, lr = random_batch(seed)
        pc.requires_grad_(True)
        params = dict(PARAMS, beta=beta)
        if name == "exo_pair":
            params["label_smoothing"] = 1e-3
        logps = {
            "policy_chosen_logps": pc,
            "policy_rejected_logps": pr,
            "ref_chosen_logps": rc,
            "ref_rejected_logps": rr,
        }
        losses, rw_c, rw_r = L.compute(name, logps, {"chosen_len": lc, "rejected_len": lr}, params)
        want = paper(
            name, pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), lc.tolist(), lr.tolist(), params
        )
        assert losses.shape == (16,)
        assert losses.detach().tolist() == pytest.approx(want, rel=1e-9, abs=1e-9)
        assert torch.allclose(rw_c, beta * (pc - rc)) and torch.allclose(rw_r, beta * (pr - rr))
        assert not rw_c.requires_grad and not rw_r.requires_grad
        losses.sum().backward()  # every loss depends on the policy chosen log-prob
        assert pc.grad is not None and torch.isfinite(pc.grad).all()


@pytest.mark.parametrize("name", ["sigmoid", "robust", "hinge", "ipo"])
def test_policy_equal_to_reference(name):
    z = torch.full((4,), -37.5, dtype=torch.float64)
    logps = {
        "policy_chosen_logps": z,
        "policy_rejected_logps": z - 3,
        "ref_chosen_logps": z,
        "ref_rejected_logps": z - 3,
    }
    losses, rc, rr = L.compute(name, logps, params={"beta": 0.1})
    want = {"sigmoid": math.log(2), "robust": math.log(2), "hinge": 1.0, "ipo": 25.0}[name]
    assert losses.tolist() == pytest.approx([want] * 4, abs=1e-12)
    assert rc.abs().max() == 0 and rr.abs().max() == 0


def test_registry_params_and_checks():
    assert {
        "sigmoid",
        "ipo",
        "hinge",
        "robust",
        "exo_pair",
        "nca_pair",
        "bco_pair",
        "sppo_hard",
        "apo_zero",
        "apo_down",
        "sigmoid_norm",
        "dpop",
        "rpo",
        "rdpo",
        "simpo",
    } <= set(L.LOSSES)
    assert L.needs("simpo") == ("chosen_len", "rejected_len") and L.needs("sigmoid") == ()
    assert L.loss_params("exo_pair") == {"beta": 0.1, "label_smoothing": 1e-3}
    assert L.loss_params("simpo", {"beta": None, "simpo_gamma": 1.0, "label_smoothing": 0.2}) == {
        "beta": 2.0,
        "simpo_gamma": 1.0,
    }
    assert "exo_pair" in L.check_params("exo_pair", {"beta": 0.1, "label_smoothing": 0.0})
    assert "[0, 0.5)" in L.check_params("robust", {"beta": 0.1, "label_smoothing": 0.5})
    assert L.check_params("sigmoid", {"beta": 0.1, "label_smoothing": 0.0}) is None


# ---- agreement with TRL 1.16 -------------------------------------------------------------------------------

TRL_SAME = {ours: trl for trl, ours in L.TRL_LOSS_TYPES.items()}  # our name -> TRL loss_type, same formula


def trl_loss(loss_type, pc, pr, rc, rr, lc, lr, beta, label_smoothing, tau):
    """TRL's own DPOTrainer._compute_loss on a batch whose per-token policy log-probs sum to pc/pr over
    completion masks of lengths lc/lr (precomputed reference rc/rr). Returns (mean loss, metrics)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    n = len(pc)
    lens = torch.cat([lc, lr]).long()
    width = int(lens.max()) + 2
    completion_mask = torch.zeros(2 * n, width, dtype=torch.long)
    per_token = torch.zeros(2 * n, width - 1, dtype=torch.float64)
    totals = torch.cat([pc, pr])
    for i in range(2 * n):
        completion_mask[i, 1 : 1 + lens[i]] = 1  # one prompt token, then the completion
        per_token[i, : lens[i]] = totals[i] / lens[i]
    outputs = SimpleNamespace(
        log_probs=per_token,
        entropy=torch.zeros_like(per_token),
        mean_logits=torch.zeros_like(per_token),
        is_top1=torch.zeros_like(per_token, dtype=torch.bool),
    )
    fake = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda t: t, gather=lambda t: t),
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        args=SimpleNamespace(discopop_tau=tau),
    )
    inputs = {
        "input_ids": torch.zeros(2 * n, width, dtype=torch.long),
        "attention_mask": torch.ones(2 * n, width, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    loss = DPOTrainer._compute_loss(fake, lambda **kw: outputs, inputs, False)
    return float(loss), {k: v[-1] for k, v in fake._metrics["train"].items()}


@pytest.mark.parametrize("name", sorted(TRL_SAME))
def test_loss_agrees_with_trl(name):
    pytest.importorskip("trl", reason="TRL 1.16 is in the dev extra: pip install -e '.[dev]'")
    beta, tau = 0.3, 0.05
    eps = {"robust": 0.1, "exo_pair": 1e-3}.get(name, 0.0)  # TRL 1.16's sigmoid ignores label smoothing
    for seed in range(3):
        pc, pr, rc, rr, lc, lr = random_batch(100 + seed, n=8)
        logps = {
            "policy_chosen_logps": pc,
            "policy_rejected_logps": pr,
            "ref_chosen_logps": rc,
            "ref_rejected_logps": rr,
        }
        params = {"beta": beta, "label_smoothing": eps, "discopop_tau": tau}
        ours, rw_c, rw_r = L.compute(name, logps, {"chosen_len": lc, "rejected_len": lr}, params)
        theirs, metrics = trl_loss(TRL_SAME[name], pc, pr, rc, rr, lc, lr, beta, eps, tau)
        rel = 1e-7 if name == "exo_pair" else 1e-9  # TRL takes log(eps) of a float32 tensor
        assert ours.mean().item() == pytest.approx(theirs, rel=rel, abs=1e-10)
        assert rw_c.mean().item() == pytest.approx(metrics["rewards/chosen"], rel=1e-9)
        assert (rw_c - rw_r).mean().item() == pytest.approx(metrics["rewards/margins"], rel=1e-9, abs=1e-12)
        if name not in L.BATCH_LEVEL:  # per example: one pair at a time through TRL
            for i in range(3):
                one = [t[i : i + 1] for t in (pc, pr, rc, rr, lc, lr)]
                theirs_i, _ = trl_loss(TRL_SAME[name], *one, beta, eps, tau)
                assert ours[i].item() == pytest.approx(theirs_i, rel=rel, abs=1e-10)
