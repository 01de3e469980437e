"""TrainConfig: everything a training run depends on, and the checks every value passes before any work.

The loss parameters (beta, label_smoothing, rpo_alpha, ...) are not written here: one `float | None` field per
entry of dpo.losses.PARAMS is added to the class, None meaning "the loss's own default" (its signature's).
`validate` checks every field against LIMITS (or the loss table) and raises a one-line UserError naming the
flag and the allowed range; the command line and the Python API share it.
"""

import dataclasses
import os
from dataclasses import dataclass

from dpo import limits
from dpo import losses as L
from refcache import UserError


def _with_loss_params(cls):
    """Add one `float | None = None` field per loss parameter in dpo.losses.PARAMS, then make `cls` a
    dataclass."""
    for name in L.PARAMS:
        cls.__annotations__[name] = float | None
        setattr(cls, name, None)
    return dataclass(cls)


@_with_loss_params
class TrainConfig:
    """Plain values; `None` means "derive it" (documented per field). Loss parameters: see the module doc."""

    cache: str  # stage-1 cache directory with the training pairs
    out: str  # run directory (created; must be new unless resume=True)
    eval_cache: str | None = None  # stage-1 cache with eval pairs: probes (split='eval') and the eval pass
    where: str | None = None  # SQL predicate over the cache's `pairs` view: train on the pairs it keeps (dpo/subset.py)
    model: str | None = None  # policy initialisation (HF dir); None = the model recorded in the cache manifest
    loss: str = "sigmoid"  # a name in dpo.losses.LOSSES
    steps: int | None = None  # optimizer steps; None = from epochs
    epochs: float | None = None  # passes over the training pairs (default 1 when steps is None)
    batch_size: int = 8  # pairs per optimizer step, across all processes
    grad_accum: int = 1  # micro-batches per process per step
    max_tokens: int = 2048  # padded tokens per forward pass; longer micro-batches are cut (0 = no limit)
    share_prompt: bool = True  # one row [prompt, chosen, rejected] per pair: the prompt runs once
    lr: float = 1e-6  # peak learning rate (AdamW)
    warmup: float = 0.0  # warmup steps (>= 1) or fraction of total steps (< 1)
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    min_lr_ratio: float = 0.0  # final lr as a fraction of the peak (cosine/linear)
    weight_decay: float = 0.0
    adam_betas: tuple = (0.9, 0.999)
    max_grad_norm: float = 1.0  # clip to this global norm; 0 = no clipping (norm still logged)
    seed: int = 0  # data order, probe subset, LoRA init
    dtype: str = "float32"  # float32 | bfloat16 (autocast, or FSDP mixed precision; master weights stay fp32)
    device: str = "auto"  # auto | cpu | cuda
    parallel: str = "auto"  # auto (ddp when several processes) | ddp | fsdp (FSDP2, sharded; also 1 process)
    grad_checkpointing: bool = False
    lora: int = 0  # LoRA rank (0 = full fine-tuning); needs peft
    lora_alpha: float = 16.0
    live_ref: bool = False  # load the reference model and score it live instead of reading the cache
    ref_model: str | None = None  # reference for live_ref; None = the model recorded in the cache manifest
    probe_every: int = 10  # score the probe pairs every K steps (0 = only at the end)
    probe_size: int = 32  # probe pairs per split (train, eval); 0 = no probes
    eval_every: int = 0  # score the whole eval cache every N steps and at the end (0 = never)
    checkpoint_every: int = 100  # checkpoint every K steps (0 = only at the end)
    keep_checkpoints: int = 2
    flush_seconds: float = 30.0  # write logs at least this often (and at every checkpoint)
    allow_mismatch: bool = False  # train even if the cache was not made with this policy/tokenizer
    resume: bool = False  # continue from the latest checkpoint in `out` (fresh start if there is none)
    save_final: bool = True  # write out/final/ in Hugging Face format
    threads: int | None = None  # torch CPU threads (None = torch's default)
    progress: bool = True  # tqdm progress bar (rank 0)
    report_to: tuple = ()  # dashboards written beside the Parquet logs: "tensorboard", "wandb" (dpo/dashboards.py)


# Allowed values of the numeric fields (dpo/limits.py notation). Integer fields must also be integers.
LIMITS = {
    "steps": "[1, inf)",
    "epochs": "(0, inf)",
    "batch_size": "[1, inf)",
    "grad_accum": "[1, inf)",
    "max_tokens": "[0, inf)",
    "lr": "[0, inf)",
    "warmup": "[0, inf)",
    "min_lr_ratio": "[0, 1]",
    "weight_decay": "[0, inf)",
    "max_grad_norm": "[0, inf)",
    "seed": "[0, inf)",
    "lora": "[0, inf)",
    "lora_alpha": "(0, inf)",
    "probe_every": "[0, inf)",
    "probe_size": "[0, inf)",
    "eval_every": "[0, inf)",
    "checkpoint_every": "[0, inf)",
    "keep_checkpoints": "[1, inf)",
    "flush_seconds": "[0, inf)",
    "threads": "[1, inf)",
}
CHOICES = {
    "loss": tuple(L.LOSSES),
    "schedule": ("cosine", "linear", "constant"),
    "dtype": ("float32", "bfloat16"),
    "device": ("auto", "cpu", "cuda"),
    "parallel": ("auto", "ddp", "fsdp"),
}
PATHS = ("cache", "out", "eval_cache", "model", "ref_model")

# Fields that may differ between a run and its resumption (how it runs, not what it computes).
RESUME_FREE = {"resume", "progress", "out", "flush_seconds", "threads", "keep_checkpoints", "max_tokens",
               "parallel", "world_size", "micro_batch_size", "report_to"}


def flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def validate(cfg: TrainConfig) -> TrainConfig:
    """A checked copy of `cfg` (paths as str). Raises UserError with one line naming the flag and what is allowed;
    nothing has been read or written yet."""
    cfg = dataclasses.replace(cfg)
    for k in PATHS:  # accept pathlib.Path too
        if getattr(cfg, k) is not None:
            setattr(cfg, k, os.fspath(getattr(cfg, k)))
    for k, choices in CHOICES.items():
        if getattr(cfg, k) not in choices:
            raise UserError(f"{flag(k)} {getattr(cfg, k)!r} is not one of: {', '.join(choices)}"
                            if k != "loss" else f"unknown loss {cfg.loss!r}; choose one of: {', '.join(choices)}")
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    for k, spec in LIMITS.items():
        v = getattr(cfg, k)
        if v is None and "None" in str(types[k]):
            continue
        integer = types[k] in (int, int | None)
        if (integer and (not isinstance(v, int) or isinstance(v, bool))) or not limits.within(v, spec):
            kind = "an integer" if integer else "a number"
            raise UserError(f"{flag(k)} must be {kind} {limits.describe(spec)} (got {v!r})")
    if cfg.steps is not None and cfg.epochs is not None:
        raise UserError("give --steps or --epochs, not both")
    betas = tuple(cfg.adam_betas)
    if len(betas) != 2 or not all(limits.within(b, "[0, 1)") for b in betas):
        raise UserError(f"adam_betas must be two numbers in [0, 1) (got {cfg.adam_betas!r})")
    if problem := L.check_params(cfg.loss, loss_params(cfg)):
        raise UserError(problem)
    for k in L.PARAMS:  # the ones this loss does not take: finite all the same
        v = getattr(cfg, k)
        if v is not None and not limits.within(v, "(-inf, inf)"):
            raise UserError(f"{flag(k)} must be a finite number (got {v!r})")
    if cfg.eval_every and not cfg.eval_cache:
        raise UserError("--eval-every scores the eval cache: pass --eval-cache too")
    if cfg.where is not None and (not isinstance(cfg.where, str) or not cfg.where.strip()):
        raise UserError(f"--where must be an SQL predicate over the pairs view, e.g. \"ln_ches < 0.5\" (got "
                        f"{cfg.where!r})")
    cfg.report_to = report_to(cfg.report_to)
    return cfg


def report_to(value) -> tuple:
    """--report-to as a tuple of dashboard names: a name, a comma list or a list of them; "none" = no dashboard.
    One-line UserError for an unknown name or a missing package."""
    from dpo.dashboards import REPORT_TO, check_usable

    items = [value] if isinstance(value, str) else list(value or ())
    names = [n.strip() for item in items for n in str(item).split(",") if n.strip()]
    for n in names:
        if n not in (*REPORT_TO, "none"):
            raise UserError(f"--report-to {n!r} is not one of: {', '.join(REPORT_TO)}, none")
    if "none" in names and len(names) > 1:
        raise UserError(f"--report-to {','.join(names)}: none means no dashboard; give it alone")
    names = tuple(dict.fromkeys(n for n in names if n != "none"))
    check_usable(names)
    return names


def loss_params(cfg: TrainConfig) -> dict:
    """The parameters of cfg.loss: its defaults, overridden by the fields that are set."""
    return L.loss_params(cfg.loss, {k: getattr(cfg, k) for k in L.PARAMS})
