"""DPO-family losses: one small function per loss, per-example outputs.

Every loss takes the summed completion log-probs of a batch of B preference pairs, each a tensor of shape (B,):

    policy_chosen_logps, policy_rejected_logps   log pi_theta(y|x), summed over completion tokens
    ref_chosen_logps, ref_rejected_logps         log pi_ref(y|x), same sums (read from the cache)

plus what the loss needs, as keyword arguments: ``beta``, a loss parameter named like its config field
(``label_smoothing``, ``rpo_alpha``, ...) and, for length-aware losses, ``chosen_len`` / ``rejected_len``
(completion token counts, shape (B,), from the cache columns). It returns ``(losses, chosen_rewards,
rejected_rewards)``, each of shape (B,): the per-example loss (the trainer takes the mean) and the implicit
DPO rewards ``beta * (policy - ref)``, detached. The rewards are the same for every loss so logs compare across
losses, including reference-free SimPO.

Notation in the docstrings: ``c = policy_chosen - ref_chosen``, ``r = policy_rejected - ref_rejected`` (log
ratios), ``x = c - r = (pi_c - pi_r) - (ref_c - ref_r)`` (the DPO logit), ``l_c, l_r`` completion lengths,
``s = sigmoid``.

``LOSSES`` maps each name to its function; :func:`compute` calls one by name with whatever subset of the available
inputs/parameters its signature asks for. Names follow TRL 1.16 where the formula is the same. ``PARAMS`` lists
the scalar parameters (range, meaning); with the signatures' defaults it is the one source of the trainer's config
fields and flags for them.
"""

import inspect
import math

import torch
import torch.nn.functional as F

from refcache_base import limits

Tensor = torch.Tensor


def _rewards(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    return beta * (pc - rc).detach(), beta * (pr - rr).detach()


def _cdpo(z: Tensor, eps: float) -> Tensor:
    """-(1-eps) log s(z) - eps log s(-z): the DPO sigmoid loss with label smoothing eps."""
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def sigmoid(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
):
    """DPO (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290), with conservative-DPO label smoothing
    (Mitchell 2023, https://ericmitchell.ai/cdpo.pdf).

        loss = -(1 - eps) log s(beta x) - eps log s(-beta x)

    eps = ``label_smoothing`` in [0, 0.5): the assumed probability that a preference label is flipped.
    Shapes: all inputs (B,) -> losses, chosen_rewards, rejected_rewards (B,).
    """
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    x = (pc - pr) - (rc - rr)
    return (_cdpo(beta * x, label_smoothing), *_rewards(pc, pr, rc, rr, beta))


def ipo(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float = 0.1
):
    """IPO (Azar et al. 2023, https://arxiv.org/abs/2310.12036, Eq. 17), on summed log-probs as in OpenRLHF
    and torchtune. beta plays the role of the paper's tau.

        loss = (x - 1 / (2 beta))^2

    TRL 1.16's ``ipo`` averages the log ratios per token first; that is :func:`ipo_norm` here.
    Shapes: all inputs (B,) -> (B,) x3.
    """
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    x = (pc - pr) - (rc - rr)
    return ((x - 1 / (2 * beta)) ** 2, *_rewards(pc, pr, rc, rr, beta))


def ipo_norm(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    chosen_len,
    rejected_len,
    beta: float = 0.1,
):
    """IPO on per-token mean log ratios (what TRL 1.16 calls ``ipo``; the IPO authors' normalised form).

        loss = (c / l_c - r / l_r - 1 / (2 beta))^2

    Shapes: logps (B,), chosen_len/rejected_len (B,) token counts -> (B,) x3.
    """
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    x = (pc - rc) / chosen_len.clamp(min=1) - (pr - rr) / rejected_len.clamp(min=1)
    return ((x - 1 / (2 * beta)) ** 2, *_rewards(pc, pr, rc, rr, beta))


def hinge(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float = 0.1
):
    """SLiC hinge loss (Zhao et al. 2023, https://arxiv.org/abs/2305.10425) on the DPO logit.

        loss = max(0, 1 - beta x)

    Shapes: all inputs (B,) -> (B,) x3.
    """
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    x = (pc - pr) - (rc - rr)
    return (torch.relu(1 - beta * x), *_rewards(pc, pr, rc, rr, beta))


def robust(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
):
    """Robust DPO (Chowdhury et al. 2024, https://arxiv.org/abs/2403.00409, Eq. 6): an unbiased loss under
    preference labels flipped with probability eps = ``label_smoothing`` < 0.5.

        loss = [-(1 - eps) log s(beta x) + eps log s(-beta x)] / (1 - 2 eps)

    Shapes: all inputs (B,) -> (B,) x3.
    """
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    x = (pc - pr) - (rc - rr)
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(beta * x) + eps * F.logsigmoid(-beta * x)) / (1 - 2 * eps)
    return (losses, *_rewards(pc, pr, rc, rr, beta))


def exo_pair(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float = 0.1,
    label_smoothing: float = 1e-3,
):
    """EXO, pairwise (Ji et al. 2024, https://arxiv.org/abs/2402.00856, Eq. 16): reverse KL from the model's
    preference distribution q = (s(beta x), s(-beta x)) to the smoothed label p = (1 - eps, eps).

        loss = s(beta x) [log s(beta x) - log(1 - eps)] + s(-beta x) [log s(-beta x) - log eps]

    eps = ``label_smoothing`` must be > 0 (paper: 1e-3, the default here).
    Shapes: all inputs (B,) -> (B,) x3.
    """
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    z = beta * ((pc - pr) - (rc - rr))
    eps = label_smoothing
    losses = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )
    return (losses, *_rewards(pc, pr, rc, rr, beta))


def nca_pair(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float = 0.1
):
    """NCA, pairwise (Chen et al. 2024, https://arxiv.org/abs/2402.05369): scores each response on its own,
    pushing the chosen reward up in absolute terms (against likelihood collapse).

        loss = -log s(beta c) - 1/2 log s(-beta c) - 1/2 log s(-beta r)

    Shapes: all inputs (B,) -> (B,) x3.
    """
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    zc, zr = beta * (pc - rc), beta * (pr - rr)
    losses = -F.logsigmoid(zc) - 0.5 * F.logsigmoid(-zc) - 0.5 * F.logsigmoid(-zr)
    return (losses, *_rewards(pc, pr, rc, rr, beta))


def bco_pair(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float = 0.1
):
    """BCO on pairs (Jung et al. 2024, https://arxiv.org/abs/2404.04656), without the running reward shift:
    chosen classified as good, rejected as bad, each by its own implicit reward.

        loss = -log s(beta c) - log s(-beta r)

    Shapes: all inputs (B,) -> (B,) x3.
    """
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    losses = -F.logsigmoid(beta * (pc - rc)) - F.logsigmoid(-beta * (pr - rr))
    return (losses, *_rewards(pc, pr, rc, rr, beta))


def sppo_hard(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float = 0.1
):
    """SPPO with hard win probabilities (Wu et al. 2024, https://arxiv.org/abs/2405.00675, Eq. 4.7 with P = 1
    for the chosen and 0 for the rejected response).

        loss = (c - 1 / (2 beta))^2 + (r + 1 / (2 beta))^2

    Shapes: all inputs (B,) -> (B,) x3.
    """
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    losses = (pc - rc - 0.5 / beta) ** 2 + (pr - rr + 0.5 / beta) ** 2
    return (losses, *_rewards(pc, pr, rc, rr, beta))


def aot(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
):
    """AOT, paired (Melnyk et al. 2024, https://arxiv.org/abs/2406.05882): distributional alignment via
    optimal transport; the policy and reference log-ratio pi_c - pi_r and ref_c - ref_r are each sorted over
    the batch and matched by rank.

        d = sort_B(pi_c - pi_r) - sort_B(ref_c - ref_r);  loss_i = -(1-eps) log s(beta d_i) - eps log s(-beta d_i)

    Batch-level: loss_i belongs to rank i, not to pair i (its mean is what is optimised).
    Shapes: all inputs (B,) -> (B,) x3.
    """
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    d = torch.sort(pc - pr, dim=0).values - torch.sort(rc - rr, dim=0).values
    return (_cdpo(beta * d, label_smoothing), *_rewards(pc, pr, rc, rr, beta))


def aot_unpaired(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
):
    """AOT, unpaired (Melnyk et al. 2024, https://arxiv.org/abs/2406.05882): chosen and rejected log ratios
    sorted separately over the batch and matched by rank.

        d = sort_B(c) - sort_B(r);  loss_i = -(1-eps) log s(beta d_i) - eps log s(-beta d_i)

    Batch-level like :func:`aot`. Shapes: all inputs (B,) -> (B,) x3.
    """
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    d = torch.sort(pc - rc, dim=0).values - torch.sort(pr - rr, dim=0).values
    return (_cdpo(beta * d, label_smoothing), *_rewards(pc, pr, rc, rr, beta))


def apo_zero(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float = 0.1
):
    """APO-zero (D'Oosterlinck et al. 2024, https://arxiv.org/abs/2408.06266, Eq. 7): for chosen outputs better
    than the model's own; raises chosen likelihood, lowers rejected.

        loss = 1 - s(beta c) + s(beta r)

    Shapes: all inputs (B,) -> (B,) x3.
    """
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    losses = 1 - torch.sigmoid(beta * (pc - rc)) + torch.sigmoid(beta * (pr - rr))
    return (losses, *_rewards(pc, pr, rc, rr, beta))


def apo_down(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float = 0.1
):
    """APO-down (D'Oosterlinck et al. 2024, https://arxiv.org/abs/2408.06266, Eq. 8): for chosen outputs worse
    than the model's own; lowers chosen likelihood, rejected more.

        loss = s(beta c) + 1 - s(beta (c - r))

    Shapes: all inputs (B,) -> (B,) x3.
    """
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    c, r = pc - rc, pr - rr
    losses = torch.sigmoid(beta * c) + 1 - torch.sigmoid(beta * (c - r))
    return (losses, *_rewards(pc, pr, rc, rr, beta))


def discopop(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float = 0.1,
    discopop_tau: float = 0.05,
):
    """DiscoPOP / log-ratio modulated loss (Chris Lu et al. 2024, https://arxiv.org/abs/2406.08414, Eq. 5):
    blends the logistic and exponential losses with a sigmoid gate on the logit.

        z = beta x;  w = s(z / tau);  loss = (1 - w) (-log s(z)) + w exp(-z)

    tau = ``discopop_tau`` (paper: 0.05). Shapes: all inputs (B,) -> (B,) x3.
    """
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    z = beta * ((pc - pr) - (rc - rr))
    w = torch.sigmoid(z / discopop_tau)
    losses = (1 - w) * -F.logsigmoid(z) + w * torch.exp(-z)
    return (losses, *_rewards(pc, pr, rc, rr, beta))


def sigmoid_norm(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    chosen_len,
    rejected_len,
    beta: float = 0.1,
):
    """Length-normalised DPO (DPO on per-token mean log ratios; see the length-normalisation discussion in
    SimPO, https://arxiv.org/abs/2405.14734; TRL 1.16 ``sigmoid_norm``).

        loss = -log s(beta (c / l_c - r / l_r))

    Shapes: logps (B,), chosen_len/rejected_len (B,) -> (B,) x3.
    """
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    x = (pc - rc) / chosen_len.clamp(min=1) - (pr - rr) / rejected_len.clamp(min=1)
    return (-F.logsigmoid(beta * x), *_rewards(pc, pr, rc, rr, beta))


def dpop(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float = 0.1,
    dpop_lambda: float = 50.0,
):
    """DPO-Positive (Pal et al. 2024, Smaug, https://arxiv.org/abs/2402.13228, Eq. 3): DPO plus a penalty
    whenever the chosen log-prob falls below the reference's (the failure mode where both likelihoods drop).

        loss = -log s(beta (x - lambda max(0, ref_c - pi_c)))

    lambda = ``dpop_lambda`` (paper: 50). Shapes: all inputs (B,) -> (B,) x3.
    """
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    x = (pc - pr) - (rc - rr)
    penalty = torch.clamp(rc - pc, min=0)
    return (-F.logsigmoid(beta * (x - dpop_lambda * penalty)), *_rewards(pc, pr, rc, rr, beta))


def rpo(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    chosen_len,
    beta: float = 0.1,
    rpo_alpha: float = 1.0,
):
    """RPO / DPO + NLL (Pang et al. 2024, Iterative Reasoning Preference Optimization,
    https://arxiv.org/abs/2404.19733, Eq. 1): DPO plus the length-normalised negative log-likelihood of the
    chosen response.

        loss = -log s(beta x) - alpha pi_c / l_c

    alpha = ``rpo_alpha`` (paper: 1). Shapes: logps (B,), chosen_len (B,) -> (B,) x3.
    """
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    x = (pc - pr) - (rc - rr)
    nll = -pc / chosen_len.clamp(min=1)
    return (-F.logsigmoid(beta * x) + rpo_alpha * nll, *_rewards(pc, pr, rc, rr, beta))


def rdpo(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    chosen_len,
    rejected_len,
    beta: float = 0.1,
    rdpo_alpha: float = 0.01,
):
    """R-DPO, length-regularised DPO (Park et al. 2024, https://arxiv.org/abs/2403.19159, Eq. 9): subtracts a
    margin proportional to the length difference, so a longer chosen answer earns less.

        loss = -log s(beta x - alpha (l_c - l_r))

    alpha = ``rdpo_alpha``. Shapes: logps (B,), chosen_len/rejected_len (B,) -> (B,) x3.
    """
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    x = (pc - pr) - (rc - rr)
    losses = -F.logsigmoid(beta * x - rdpo_alpha * (chosen_len - rejected_len))
    return (losses, *_rewards(pc, pr, rc, rr, beta))


def simpo(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    chosen_len,
    rejected_len,
    beta: float = 2.0,
    simpo_gamma: float = 0.5,
):
    """SimPO (Meng et al. 2024, https://arxiv.org/abs/2405.14734, Eq. 6): reference-free, length-normalised,
    with a target reward margin gamma.

        loss = -log s(beta pi_c / l_c - beta pi_r / l_r - gamma)

    The reference log-probs are not used by the loss (only by the logged implicit rewards). The paper's beta
    is around 2-10, far above DPO's usual 0.1: pass ``--beta`` accordingly; gamma = ``simpo_gamma``.
    Shapes: logps (B,), chosen_len/rejected_len (B,) -> (B,) x3.
    """
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    z = beta * pc / chosen_len.clamp(min=1) - beta * pr / rejected_len.clamp(min=1) - simpo_gamma
    return (-F.logsigmoid(z), *_rewards(pc, pr, rc, rr, beta))


LOSSES = {
    f.__name__: f
    for f in [
        sigmoid,
        ipo,
        ipo_norm,
        hinge,
        robust,
        exo_pair,
        nca_pair,
        bco_pair,
        sppo_hard,
        aot,
        aot_unpaired,
        apo_zero,
        apo_down,
        discopop,
        sigmoid_norm,
        dpop,
        rpo,
        rdpo,
        simpo,
    ]
}

# TRL 1.16's DPOConfig.loss_type values with the same formula here (tests/test_losses.py checks each against TRL):
# TRL's `ipo` averages the log ratios per token, which is `ipo_norm` here (`ipo` here sums them). TRL's `sft`
# (a batch-mean NLL term, combined with other losses by loss_weights) has no counterpart: one loss per run.
TRL_LOSS_TYPES = {"ipo": "ipo_norm"} | {name: name for name in (
    "sigmoid", "hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero",
    "apo_down", "discopop", "sigmoid_norm")}

# Losses whose per-example values are tied to ranks in the sorted batch, not to pairs.
BATCH_LEVEL = {"aot", "aot_unpaired"}

# The scalar loss parameters: their names, allowed values (refcache_base/limits.py notation) and meaning, in one place.
# Defaults live in the loss functions' signatures above (beta is 0.1, simpo's 2.0). The trainer's config fields,
# the command-line flags with their help, and the run's config.json are all derived from this table and those
# signatures: a new parameter is a keyword argument of its loss plus one row here.
PARAMS = {
    "beta": ("(0, inf)", "temperature of the implicit reward beta * (policy - ref)"),
    "label_smoothing": ("[0, 0.5)", "probability that a preference label is flipped (exo_pair: its epsilon)"),
    "rpo_alpha": ("[0, inf)", "weight of the chosen NLL term"),
    "rdpo_alpha": ("(-inf, inf)", "length penalty per token of length difference"),
    "simpo_gamma": ("(-inf, inf)", "target reward margin"),
    "dpop_lambda": ("[0, inf)", "weight of the chosen-likelihood penalty"),
    "discopop_tau": ("(0, inf)", "gate temperature"),
}
# Where one loss allows other values than PARAMS says.
PARAM_RANGES = {("exo_pair", "label_smoothing"): "(0, 1)"}

_LOGP_ARGS = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
_DATA_ARGS = ("chosen_len", "rejected_len")


def loss_params(name: str, overrides: dict | None = None) -> dict:
    """The scalar parameters loss `name` takes (beta, label_smoothing, ...), defaults updated by the non-None
    values in `overrides` that the loss accepts."""
    sig = inspect.signature(LOSSES[name])
    params = {k: p.default for k, p in sig.parameters.items() if k not in _LOGP_ARGS + _DATA_ARGS}
    for k, v in (overrides or {}).items():
        if k in params and v is not None:
            params[k] = v
    return params


def param_defaults(param: str) -> dict:
    """{loss name: default} for every loss that takes `param`, read from the signatures."""
    return {name: loss_params(name)[param] for name in LOSSES if param in loss_params(name)}


def param_help(param: str) -> str:
    """Command-line help for `param`: its meaning, which losses take it, and the defaults."""
    defaults = param_defaults(param)
    values = list(defaults.values())
    common = max(set(values), key=values.count)
    others = "; ".join(f"{n} {v:g}" for n, v in defaults.items() if v != common)
    takers = "" if len(defaults) > len(LOSSES) // 2 else f"{', '.join(defaults)}: "
    return f"{takers}{PARAMS[param][1]} (default {common:g}{'; ' + others if others else ''})"


def needs(name: str) -> tuple[str, ...]:
    """Which per-example data (chosen_len, rejected_len) loss `name` needs besides the four log-prob sums."""
    return tuple(k for k in inspect.signature(LOSSES[name]).parameters if k in _DATA_ARGS)


def check_params(name: str, params: dict) -> str | None:
    """Return a one-line problem with the parameters of loss `name` (each within its range from PARAMS), or
    None if they are usable."""
    for param, value in params.items():
        spec = PARAM_RANGES.get((name, param), PARAMS[param][0])
        if not limits.within(value, spec):
            flag = "--" + param.replace("_", "-")
            return f"{flag} must be {limits.describe(spec)} for loss {name} (got {value})"
    return None


def compute(name: str, logps: dict, data: dict | None = None, params: dict | None = None):
    """Call loss `name`. `logps` holds the four (B,) sums under the argument names above; `data` may hold
    chosen_len/rejected_len (B,); `params` the scalar parameters (see :func:`loss_params`)."""
    fn = LOSSES[name]
    kw = {k: (data or {})[k] for k in needs(name)}
    kw.update(loss_params(name, params))
    return fn(*(logps[k] for k in _LOGP_ARGS), **kw)
