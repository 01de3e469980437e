"""TrainConfig: everything a training run depends on, and the checks every value passes before any work.

The loss parameters (beta, label_smoothing, rpo_alpha, ...) are not written here: one `float | None` field per
entry of dpo.losses.PARAMS is added to the class, None meaning "the loss's own default" (its signature's).
`validate` checks every field against LIMITS (or the loss table) and raises a one-line UserError naming the
flag and the allowed range; the command line and the Python API share it.
"""

import dataclasses
import os
from dataclasses import dataclass

from dpo.dashboards import REPORT_TO
from dpo.losses import LOSSES, PARAMS, check_params, param_help
from dpo.losses import loss_params as loss_defaults
from refcache_base import UserError, limits


def setting(default=None, help="", *, range=None, flag=True, **argparse_kw):
    """A TrainConfig field with everything said about it once: its default, its help text (the command line's),
    its allowed range (refcache_base/limits.py notation; checked by `validate`), and how it is a flag (dpo/cli.py makes
    them): `flag=False` for none, a string for another spelling than --field-name (e.g. "--no-share-prompt"),
    plus argparse keywords (action, metavar, required, nargs; `cli_default` where the flag's default is spelled
    otherwise, `group` for flags that exclude each other)."""
    return dataclasses.field(default=default, metadata={"help": help, "range": range, "flag": flag,
                                                        "argparse": argparse_kw})


def _with_loss_params(cls):
    """Add one `float | None` field per loss parameter in dpo.losses.PARAMS (help and range from that table),
    then make `cls` a dataclass."""
    for name in PARAMS:
        cls.__annotations__[name] = float | None
        setattr(cls, name, setting(None, param_help(name)))
    return dataclass(cls)


CHOICES = {  # the loss name is checked with the list of losses: check_loss
    "schedule": ("cosine", "linear", "constant"),
    "dtype": ("float32", "bfloat16"),
    "device": ("auto", "cpu", "cuda"),
    "parallel": ("auto", "ddp", "fsdp"),
}


@_with_loss_params
class TrainConfig:
    """Plain values; `None` means "derive it" (said per field). Loss parameters: see the module doc."""

    cache: str = setting(dataclasses.MISSING, "stage-1 cache directory (training pairs)", required=True)
    out: str = setting(dataclasses.MISSING, "run directory (new, or existing with --resume)", flag=False)
    eval_cache: str | None = setting(None, "stage-1 cache of eval pairs: probes, and the eval pass of --eval-every")
    where: str | None = setting(
        None, "train only on the pairs this SQL predicate over the `pairs` view keeps, e.g. \"ln_ches < 0.5\" or "
        "\"category = 'math'\" (any column of `refcache sql \"DESCRIBE pairs\" --cache CACHE`; a NULL result drops "
        "the pair; the eval cache is not filtered)", metavar="SQL")
    model: str | None = setting(None, "policy to start from (default: the model the cache was scored with)")
    loss: str = setting("sigmoid", f"one of: {', '.join(LOSSES)}")
    steps: int | None = setting(None, "optimizer steps (default: from --epochs)", range="[1, inf)",
                                group="length")
    epochs: float | None = setting(None, "passes over the training pairs (default: 1 unless --steps)",
                                   range="(0, inf)", group="length")
    batch_size: int = setting(8, "pairs per optimizer step, over all processes", range="[1, inf)")
    grad_accum: int = setting(1, "micro-batches per process per step", range="[1, inf)")
    max_tokens: int = setting(2048, "padded tokens per forward pass: longer micro-batches run in pieces, same "
                              "gradient (0 = no limit)", range="[0, inf)")
    share_prompt: bool = setting(True, "run the prompt twice (rows prompt+chosen, prompt+rejected) instead of once "
                                 "per pair", flag="--no-share-prompt", action="store_false")
    lr: float = setting(1e-6, "peak learning rate", range="[0, inf)")
    warmup: float = setting(0.0, "warmup steps, or a fraction of all steps if < 1", range="[0, inf)")
    schedule: str = setting("cosine", "lr decay after warmup")
    min_lr_ratio: float = setting(0.0, "final lr as a fraction of the peak", range="[0, 1]")
    weight_decay: float = setting(0.0, "AdamW weight decay", range="[0, inf)")
    adam_betas: tuple = setting((0.9, 0.999), "AdamW betas, each in [0, 1)", flag=False)
    max_grad_norm: float = setting(1.0, "clip the global grad norm (0 = off)", range="[0, inf)")
    seed: int = setting(0, "data order, probe subset, LoRA init", range="[0, inf)")
    dtype: str = setting("float32", "compute dtype (bfloat16: autocast, or FSDP mixed precision; master weights "
                         "stay fp32)")
    device: str = setting("auto", "auto: cuda when there is a GPU")
    parallel: str = setting("auto", "several processes (torchrun): ddp replicates the model on each, fsdp shards "
                            "weights, gradients and optimizer state over them (FSDP2); auto = ddp")
    grad_checkpointing: bool = setting(False, "recompute activations in backward (less memory)", action="store_true")
    lora: int = setting(0, "train LoRA adapters of this rank (needs peft; 0 = full fine-tuning)", range="[0, inf)",
                        metavar="RANK")
    lora_alpha: float = setting(16.0, "LoRA scaling numerator", range="(0, inf)")
    live_ref: bool = setting(False, "load the reference model and score it live (for comparison)",
                             action="store_true")
    ref_model: str | None = setting(None, "reference model for --live-ref (default: the cache's model)")
    probe_every: int = setting(10, "score the probe pairs every K steps (0 = at the end only)", range="[0, inf)",
                               metavar="K")
    probe_size: int = setting(32, "probe pairs per split (all of them when a split has fewer)", range="[0, inf)",
                              metavar="N")
    eval_every: int = setting(0, "score the whole --eval-cache every N steps and at the end, into evals.parquet "
                              "(0 = never)", range="[0, inf)", metavar="N")
    checkpoint_every: int = setting(100, "checkpoint every K steps (0 = only at the end)", range="[0, inf)",
                                    metavar="K")
    keep_checkpoints: int = setting(2, "newest checkpoints kept", range="[1, inf)", metavar="N")
    flush_seconds: float = setting(30.0, "write logs at least this often (and at every checkpoint)",
                                   range="[0, inf)", flag=False)
    report_to: tuple = setting(
        (), "also write the curves (TRL's names: train/loss, train/rewards/chosen, eval/loss, ...) to "
        f"{', '.join(REPORT_TO)} or none; several allowed. tensorboard: OUT/tensorboard/ (pip install "
        "'refcache[tensorboard]'); wandb: OUT/wandb/, offline unless logged in (pip install 'refcache[wandb]')",
        nargs="+", metavar="NAME", cli_default="none")
    allow_mismatch: bool = setting(False, "train even if the cache was scored with another model",
                                   action="store_true")
    resume: bool = setting(False, "continue the run in --out from its latest checkpoint", action="store_true")
    save_final: bool = setting(True, "write out/final/ in Hugging Face format", flag=False)
    threads: int | None = setting(None, "torch CPU threads (default: torch's)", range="[1, inf)")
    progress: bool = setting(True, "no progress bar", flag="--no-progress", action="store_false")


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# Allowed values of the numeric fields (refcache_base/limits.py notation), from the declarations. Integer fields must also
# be integers.
LIMITS = {name: f.metadata["range"] for name, f in FIELDS.items() if f.metadata.get("range")}
# Fields `refcache sweep` takes as comma lists, in the order run names list them (dpo/sweep.py)
SWEEP_FIELDS = ("loss", *PARAMS, "lr", "seed", "batch_size", "warmup")
PATHS = ("cache", "out", "eval_cache", "model", "ref_model")

# Fields that may differ between a run and its resumption (how it runs, not what it computes).
RESUME_FREE = {"resume", "progress", "out", "flush_seconds", "threads", "keep_checkpoints", "max_tokens",
               "parallel", "world_size", "micro_batch_size", "report_to"}


def flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def scalar_type(name: str):
    """int, float or str: the type of field `name` without None (its flag's argparse type)."""
    t = FIELDS[name].type
    return next((k for k in (int, float) if t in (k, k | None)), str)


def check_loss(name):
    if name not in LOSSES:
        raise UserError(f"unknown loss {name!r}; choose one of: {', '.join(LOSSES)}")


def validate(cfg: TrainConfig) -> TrainConfig:
    """A checked copy of `cfg` (paths as str). Raises UserError with one line naming the flag and what is allowed;
    nothing has been read or written yet."""
    cfg = dataclasses.replace(cfg)
    for k in PATHS:  # accept pathlib.Path too
        if getattr(cfg, k) is not None:
            setattr(cfg, k, os.fspath(getattr(cfg, k)))
    check_loss(cfg.loss)
    for k, choices in CHOICES.items():
        if getattr(cfg, k) not in choices:
            raise UserError(f"{flag(k)} {getattr(cfg, k)!r} is not one of: {', '.join(choices)}")
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    for k, spec in LIMITS.items():
        v = getattr(cfg, k)
        if v is None and "None" in str(types[k]):
            continue
        integer = types[k] in (int, int | None)
        if not limits.inside(v, spec, whole=integer):
            kind = "an integer" if integer else "a number"
            raise UserError(f"{flag(k)} must be {kind} {limits.describe(spec)} (got {v!r})")
    if cfg.steps is not None and cfg.epochs is not None:
        raise UserError("give --steps or --epochs, not both")
    betas = tuple(cfg.adam_betas)
    if len(betas) != 2 or not all(limits.within(b, "[0, 1)") for b in betas):
        raise UserError(f"adam_betas must be two numbers in [0, 1) (got {cfg.adam_betas!r})")
    if problem := check_params(cfg.loss, loss_params(cfg)):
        raise UserError(problem)
    for k in PARAMS:  # the ones this loss does not take: finite all the same
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
    return loss_defaults(cfg.loss, {k: getattr(cfg, k) for k in PARAMS})
