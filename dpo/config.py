"""TrainConfig: everything a training run depends on, and the checks every value passes before any work.

The loss parameters (beta, label_smoothing, rpo_alpha, ...) are not written here: one `float | None` field per
entry of dpo.losses.PARAMS is added to the class, None meaning "the loss's own default" (its signature's).
`validate` checks every field against LIMITS (or the loss table) and raises a one-line UserError naming the
flag and the allowed range; the command line and the Python API share it.

TRL's names: a field's `trl=` declares the TRL DPOConfig / transformers TrainingArguments (or TRL ModelConfig)
settings that mean the same, each a `Trl` (its name, how its value becomes this field's, and what differs).
dpo/cli.py makes them flags and `--config` file keys; TRL_ACCEPTED lists TRL settings refcache takes only at the
value it always uses, TRL_UNSUPPORTED the ones it refuses, with the reason. README "Coming from TRL" is generated
from these three (dpo/cli.py trl_table).
"""

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

from dpo.dashboards import REPORT_TO
from dpo.losses import LOSSES, PARAMS, TRL_LOSS_TYPES, check_params, param_help
from dpo.losses import loss_params as loss_defaults
from refcache_base import UserError, limits


@dataclass(frozen=True)
class Trl:
    """A TRL / transformers setting that means what a refcache field means. `convert` turns its value (as typed
    on a command line, or read from a --config file) into the field's: `convert(value, args)`, where `args` holds
    the other settings (a per-device batch needs --grad-accum); it raises UserError for a value refcache has no
    equivalent of. None: the value is the field's as it is (then the TRL name is one more spelling of the flag).
    `switch`: a TRL boolean, given alone (`--bf16`) or with a value (`--bf16 false`). `note`: how the meaning
    differs from TRL's (README)."""

    name: str
    convert: Callable | None = None
    note: str = ""
    switch: bool = False


def setting(default=None, help="", *, range=None, flag=True, trl=(), **argparse_kw):
    """A TrainConfig field with everything said about it once: its default, its help text (the command line's),
    its allowed range (refcache_base/limits.py notation; checked by `validate`), how it is a flag (dpo/cli.py makes
    them): `flag=False` for none, a string for another spelling than --field-name (e.g. "--no-share-prompt"),
    plus argparse keywords (action, metavar, required, nargs; `cli_default` where the flag's default is spelled
    otherwise, `group` for flags that exclude each other), and `trl`: the TRL settings that mean the same (a name
    or a Trl, or a tuple of them)."""
    trl = tuple(t if isinstance(t, Trl) else Trl(t) for t in ((trl,) if isinstance(trl, (str, Trl)) else trl))
    return dataclasses.field(default=default, metadata={"help": help, "range": range, "flag": flag, "trl": trl,
                                                        "argparse": argparse_kw})


# TRL 1.16's DPOConfig names of loss parameters (rpo_alpha: TRL before 1.0)
TRL_PARAMS = {"beta": Trl("beta"), "discopop_tau": Trl("discopop_tau"), "rpo_alpha": Trl(
    "rpo_alpha", note="TRL < 1.0; TRL 1.16 writes loss_type [sigmoid, sft] with loss_weights, whose NLL is a mean "
    "over the batch's tokens, here over each answer's"), "label_smoothing": Trl(
    "label_smoothing", note="TRL 1.16's sigmoid ignores it; refcache's sigmoid applies it (conservative DPO)")}


def _with_loss_params(cls):
    """Add one `float | None` field per loss parameter in dpo.losses.PARAMS (help and range from that table),
    then make `cls` a dataclass."""
    for name in PARAMS:
        cls.__annotations__[name] = float | None
        setattr(cls, name, setting(None, param_help(name), trl=TRL_PARAMS.get(name, ())))
    return dataclass(cls)


# ---- how TRL values become refcache's (Trl.convert) ------------------------------------------------------------

def _bool(value, name) -> bool:
    """A TRL boolean: true/false as YAML or JSON gives it, or as text (HfArgumentParser's spellings)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off"):
        return False
    raise UserError(f"--{name} {value!r}: expected true or false")


def _number(value, name, kind=float):
    """`value` (a number, or its text) as `kind`, float or int; one-line UserError otherwise."""
    x = None
    if not isinstance(value, bool):
        with contextlib.suppress(TypeError, ValueError):
            x = float(value)
    if x is None or (kind is int and not (math.isfinite(x) and x == int(x))):
        raise UserError(f"--{name} {value!r}: expected {'an integer' if kind is int else 'a number'}")
    return kind(x)


def _loss_type(value, args):
    """TRL's loss_type (a name, or a list of one) as a refcache loss."""
    names = [value] if isinstance(value, str) else list(value)
    if len(names) != 1:
        raise UserError(f"--loss_type {' '.join(map(str, names))}: refcache trains one loss per run (no "
                        "loss_weights); for DPO + NLL use --loss rpo --rpo-alpha A")
    name = names[0]
    if name in TRL_LOSS_TYPES:
        return TRL_LOSS_TYPES[name]
    raise UserError(f"--loss_type {name!r}: refcache has no such loss (for DPO + an NLL term: --loss rpo); TRL's "
                    f"names it takes: {', '.join(TRL_LOSS_TYPES)}; or --loss with one of: {', '.join(LOSSES)}")


def _max_steps(value, args):
    """TRL's max_steps: -1 (its default) trains for num_train_epochs; a count overrides them, as in TRL (both can
    come only from a --config file: on the command line they exclude each other)."""
    steps = _number(value, "max_steps", int)
    if steps < 0:
        return None
    args.epochs = None
    return steps


def _per_device_batch(value, args):
    """TRL's per_device_train_batch_size as refcache's --batch-size: pairs per optimizer step over all processes
    (per device x --grad-accum x processes, from torchrun's WORLD_SIZE)."""
    per_device = _number(value, "per_device_train_batch_size", int)
    if per_device < 1:
        raise UserError(f"--per_device_train_batch_size must be an integer in [1, inf) (got {value!r})")
    return per_device * int(args.grad_accum) * int(os.environ.get("WORLD_SIZE", "1"))


def _warmup_ratio(value, args):
    ratio = _number(value, "warmup_ratio")
    if not 0 <= ratio < 1:
        raise UserError(f"--warmup_ratio must be in [0, 1) (got {value!r}); for all steps as warmup give "
                        "--warmup STEPS")
    return ratio


def _lr_scheduler_type(value, args):
    if value == "cosine_with_min_lr":  # transformers' cosine to min_lr_rate (lr_scheduler_kwargs): --min-lr-ratio
        return "cosine"
    if value not in CHOICES["schedule"]:
        raise UserError(f"--lr_scheduler_type {value!r} is not one refcache has: {', '.join(CHOICES['schedule'])}, "
                        "cosine_with_min_lr")
    return value


def _lr_scheduler_kwargs(value, args):
    """transformers' lr_scheduler_kwargs (a dict, or its JSON text): only min_lr_rate, refcache's --min-lr-ratio."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise UserError(f"--lr_scheduler_kwargs {value!r}: expected JSON like '{{\"min_lr_rate\": 0.1}}'") from None
    if not isinstance(value, dict) or set(value) - {"min_lr_rate"}:
        raise UserError(f"--lr_scheduler_kwargs {value!r}: refcache takes only min_lr_rate (its --min-lr-ratio)")
    return _number(value.get("min_lr_rate", 0.0), "lr_scheduler_kwargs min_lr_rate")


def _adam_beta(i):
    def convert(value, args):
        betas = list(args.adam_betas)
        betas[i] = _number(value, f"adam_beta{i + 1}")
        return tuple(betas)
    return convert


def _save_total_limit(value, args):
    if value is None:
        raise UserError("--save_total_limit null (keep every checkpoint): refcache keeps the newest N; give a number")
    return _number(value, "save_total_limit", int)


def _resume_from_checkpoint(value, args):
    if value is None or isinstance(value, bool) or str(value).lower() in ("true", "false"):
        return value is not None and _bool(value, "resume_from_checkpoint")
    raise UserError(f"--resume_from_checkpoint {value!r}: refcache resumes from the latest checkpoint in --out; pass "
                    "--resume (a checkpoint path cannot be chosen)")


def _strategy(field, what):
    """transformers' eval_strategy / save_strategy: "steps" keeps the step count (eval_steps / save_steps), "no"
    makes it 0 (for saving, refcache still checkpoints the last step)."""
    def convert(value, args):
        if value == "steps":
            return getattr(args, field)
        if value == "no":
            return 0
        raise UserError(f"--{what}_strategy {value!r}: refcache counts steps: give --{what}_steps N "
                        f"({flag(field)}), or {what}_strategy no")
    return convert


def _only(name, *allowed, note):
    """A TRL setting refcache takes only at the value(s) it always uses (Trl.convert of TRL_ACCEPTED)."""
    def convert(value, args):
        if value not in allowed and not (isinstance(value, str) and _parsed(value) in allowed):
            raise UserError(f"--{name} {value!r}: {note}")
    return convert


def _parsed(text: str):
    """`text` as JSON reads it (true, 1e-08, ...), else itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


CHOICES = {  # the loss name is checked with the list of losses: check_loss
    "schedule": ("cosine", "linear", "constant", "constant_with_warmup"),  # transformers' lr_scheduler_type
    "dtype": ("float32", "bfloat16"),
    "device": ("auto", "cpu", "cuda"),
    "parallel": ("auto", "ddp", "fsdp"),
}


@_with_loss_params
class TrainConfig:
    """Plain values; `None` means "derive it" (said per field). Loss parameters: see the module doc."""

    cache: str = setting(dataclasses.MISSING, "stage-1 cache directory (training pairs)", required=True)
    out: str = setting(dataclasses.MISSING, "run directory (new, or existing with --resume)", flag=False,
                       trl=Trl("output_dir", note="required (TRL's default: trainer_output)"))
    eval_cache: str | None = setting(None, "stage-1 cache of eval pairs: probes, and the eval pass of --eval-every")
    where: str | None = setting(
        None, "train only on the pairs this SQL predicate over the `pairs` view keeps, e.g. \"ln_ches < 0.5\" or "
        "\"category = 'math'\" (any column of `refcache sql \"DESCRIBE pairs\" --cache CACHE`; a NULL result drops "
        "the pair; the eval cache is not filtered)", metavar="SQL")
    model: str | None = setting(None, "policy to start from (default: the model the cache was scored with)",
                                trl=Trl("model_name_or_path", note="TRL ModelConfig; default: the cache's model"))
    loss: str = setting("sigmoid", f"one of: {', '.join(LOSSES)}", trl=Trl(
        "loss_type", _loss_type, "TRL's ipo (per-token mean log ratios) is refcache's ipo_norm (refcache's ipo sums "
        "them); one loss per run: no sft, no loss_weights"))
    steps: int | None = setting(None, "optimizer steps (default: from --epochs)", range="[1, inf)",
                                group="length", trl=Trl("max_steps", _max_steps, "-1 (TRL's default) = from epochs"))
    epochs: float | None = setting(None, "passes over the training pairs (default: 1 unless --steps)",
                                   range="(0, inf)", group="length", trl=Trl(
                                       "num_train_epochs", note="TRL's default 3; max_steps and num_train_epochs "
                                       "exclude each other (in a --config file max_steps wins, as in TRL)"))
    batch_size: int = setting(8, "pairs per optimizer step, over all processes", range="[1, inf)", group="batch",
                              trl=Trl("per_device_train_batch_size", _per_device_batch,
                                      "refcache's --batch-size counts the pairs of one optimizer step over all "
                                      "processes; this one is per device and micro-batch: --batch-size = it x "
                                      "--grad-accum x WORLD_SIZE"))
    grad_accum: int = setting(1, "micro-batches per process per step", range="[1, inf)",
                              trl="gradient_accumulation_steps")
    max_tokens: int = setting(2048, "padded tokens per forward pass: longer micro-batches run in pieces, same "
                              "gradient (0 = no limit)", range="[0, inf)")
    share_prompt: bool = setting(True, "run the prompt twice (rows prompt+chosen, prompt+rejected) instead of once "
                                 "per pair", flag="--no-share-prompt", action="store_false")
    lr: float = setting(1e-6, "peak learning rate", range="[0, inf)", trl="learning_rate")
    warmup: float = setting(0.0, "warmup steps (the lr rises from 0), or a fraction of all steps if < 1, rounded up",
                            range="[0, inf)", trl=("warmup_steps", Trl("warmup_ratio", _warmup_ratio, "transformers "
                                                                       "< 5; below 1, as warmup_steps takes it")))
    schedule: str = setting("cosine", "lr after warmup, as transformers' lr_scheduler_type of that name (constant: "
                            "no warmup)", trl=Trl("lr_scheduler_type", _lr_scheduler_type, "TRL's default linear; "
                                                  "cosine_with_min_lr is cosine with --min-lr-ratio; no restarts, "
                                                  "polynomial, wsd"))
    min_lr_ratio: float = setting(0.0, "cosine and linear decay to this fraction of the peak (cosine: transformers' "
                                  "cosine_with_min_lr)", range="[0, 1]", trl=Trl(
                                      "lr_scheduler_kwargs", _lr_scheduler_kwargs, "only {\"min_lr_rate\": R}"))
    weight_decay: float = setting(0.0, "AdamW weight decay", range="[0, inf)", trl="weight_decay")
    adam_betas: tuple = setting((0.9, 0.999), "AdamW betas, each in [0, 1)", nargs=2, metavar=("B1", "B2"),
                                trl=(Trl("adam_beta1", _adam_beta(0)), Trl("adam_beta2", _adam_beta(1))))
    max_grad_norm: float = setting(1.0, "clip the global grad norm (0 = off)", range="[0, inf)",
                                   trl="max_grad_norm")
    seed: int = setting(0, "data order, probe subset, LoRA init", range="[0, inf)",
                        trl=Trl("seed", note="TRL's default 42"))
    dtype: str = setting("float32", "compute dtype (bfloat16: autocast, or FSDP mixed precision; master weights "
                         "stay fp32)", trl=Trl("bf16", lambda v, a: "bfloat16" if _bool(v, "bf16") else "float32",
                                              "TRL's default: true (unless fp16)", switch=True))
    device: str = setting("auto", "auto: cuda when there is a GPU",
                          trl=Trl("use_cpu", lambda v, a: "cpu" if _bool(v, "use_cpu") else "auto", switch=True))
    parallel: str = setting("auto", "several processes (torchrun): ddp replicates the model on each, fsdp shards "
                            "weights, gradients and optimizer state over them (FSDP2); auto = ddp")
    grad_checkpointing: bool = setting(False, "recompute activations in backward (less memory)", action="store_true",
                                       trl=Trl("gradient_checkpointing", lambda v, a: _bool(v, "gradient_checkpointing"),
                                               "TRL's default: true", switch=True))
    lora: int = setting(0, "train LoRA adapters of this rank (needs peft; 0 = full fine-tuning)", range="[0, inf)",
                        metavar="RANK", trl=Trl("lora_r", note="TRL ModelConfig; without use_peft"))
    lora_alpha: float = setting(16.0, "LoRA scaling numerator", range="(0, inf)",
                                trl=Trl("lora_alpha", note="TRL ModelConfig; its default 32"))
    live_ref: bool = setting(False, "load the reference model and score it live (for comparison)",
                             action="store_true")
    ref_model: str | None = setting(None, "reference model for --live-ref (default: the cache's model)")
    probe_every: int = setting(10, "score the probe pairs every K steps (0 = at the end only)", range="[0, inf)",
                               metavar="K")
    probe_size: int = setting(32, "probe pairs per split (all of them when a split has fewer)", range="[0, inf)",
                              metavar="N")
    eval_every: int = setting(0, "score the whole --eval-cache every N steps and at the end, into evals.parquet "
                              "(0 = never)", range="[0, inf)", metavar="N",
                              trl=(Trl("eval_steps", note="steps only (no fraction); also at step 0 and the end"),
                                   Trl("eval_strategy", _strategy("eval_every", "eval"), "steps or no")))
    checkpoint_every: int = setting(100, "checkpoint every K steps (0 = only at the end)", range="[0, inf)",
                                    metavar="K", trl=(
                                        Trl("save_steps", note="steps only (no fraction)"),
                                        Trl("save_strategy", _strategy("checkpoint_every", "save"),
                                            "steps, or no: the last step's checkpoint only")))
    keep_checkpoints: int = setting(2, "newest checkpoints kept", range="[1, inf)", metavar="N",
                                    trl=Trl("save_total_limit", _save_total_limit, "null (keep all) is refused"))
    flush_seconds: float = setting(30.0, "write logs at least this often (and at every checkpoint)",
                                   range="[0, inf)", flag=False)
    report_to: tuple = setting(
        (), "also write the curves (TRL's names: train/loss, train/rewards/chosen, eval/loss, ...) to "
        f"{', '.join(REPORT_TO)} or none; several allowed. tensorboard: OUT/tensorboard/ (pip install "
        "'refcache[tensorboard]'); wandb: OUT/wandb/, offline unless logged in (pip install 'refcache[wandb]')",
        nargs="+", metavar="NAME", cli_default="none", trl=Trl("report_to", note="tensorboard, wandb or none"))
    allow_mismatch: bool = setting(False, "train even if the cache was scored with another model",
                                   action="store_true")
    resume: bool = setting(False, "continue the run in --out from its latest checkpoint", action="store_true",
                           trl=Trl("resume_from_checkpoint", _resume_from_checkpoint, "true only: the latest "
                                   "checkpoint in --out (no path)", switch=True))
    save_final: bool = setting(True, "write out/final/ in Hugging Face format", flag=False)
    threads: int | None = setting(None, "torch CPU threads (default: torch's)", range="[1, inf)")
    progress: bool = setting(True, "no progress bar", flag="--no-progress", action="store_false")


# TRL settings refcache takes at the value it always uses (and refuses at any other, saying why).
TRL_ACCEPTED = (
    Trl("precompute_ref_log_probs", _only(
        "precompute_ref_log_probs", True, note="refcache always reads the reference log-probs from a cache "
        "(`refcache precompute`); --live-ref scores them live, for comparison"),
        "true is what refcache is: stage 1 computes them once, for every run", switch=True),
    Trl("optim", _only("optim", "adamw_torch_fused", "adamw_torch", note="refcache trains with torch's AdamW"),
        "adamw_torch_fused or adamw_torch: torch's fused AdamW"),
    Trl("adam_epsilon", _only("adam_epsilon", 1e-8, note="refcache's AdamW uses eps 1e-8"), "1e-8 only"),
    Trl("disable_dropout", _only("disable_dropout", True, note="refcache always trains with dropout off"),
        "true only", switch=True),
    Trl("logging_steps", lambda v, a: _number(v, "logging_steps"),
        "any value: every step is logged (steps.parquet, dashboards)"),
)

# TRL settings refcache does not take, and why (the command line and --config say it in one line).
_STAGE1 = "truncation is fixed when the cache is built: pass {} to `refcache precompute`"
_REF_FIXED = "the reference is fixed (its log-probs are cached)"
TRL_UNSUPPORTED = {
    "max_length": _STAGE1.format("--max-length"),
    "max_prompt_length": _STAGE1.format("--max-prompt-length"),
    "truncation_mode": _STAGE1.format("--truncation-mode (which end of a long prompt is kept)"),
    "precompute_ref_batch_size": "the reference is scored by `refcache precompute`: its --batch-size",
    "dataset_num_proc": "tokenization happens once, in `refcache precompute`",
    "dataset_name": "the pairs come from --cache (`refcache precompute DATA`)",
    "padding_free": "micro-batches are length-grouped; --max-tokens bounds a forward pass",
    "pad_to_multiple_of": "micro-batches are padded to their longest row",
    "loss_weights": "one loss per run",
    "ld_alpha": "LD-DPO is not implemented",
    "f_divergence_type": "f-DPO is not implemented (reverse KL only)",
    "f_alpha_divergence_coef": "f-DPO is not implemented (reverse KL only)",
    "use_weighting": "WPO weighting is not implemented",
    "sync_ref_model": _REF_FIXED,
    "ref_model_mixup_alpha": _REF_FIXED,
    "ref_model_sync_steps": _REF_FIXED,
    "fp16": "bf16 or fp32: --dtype",
    "per_device_eval_batch_size": "the eval pass runs micro-batches of the training size (at least 8 pairs)",
    "model_init_kwargs": "the policy loads with transformers' defaults, in fp32",
    "trust_remote_code": "models that ship their own code are not loaded",
    "router_aux_loss_coef": "the MoE load-balancing loss is not added",
    "activation_offloading": "not implemented; --grad-checkpointing and --max-tokens save memory",
    "use_liger_kernel": "not implemented",
    "torch_empty_cache_steps": "not implemented",
    "use_peft": "--lora RANK turns LoRA on (TRL's use_peft with lora_r)",
    "pad_token": "deprecated in TRL; the cache holds token ids, padding is internal",
}

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
    if cfg.schedule == "constant" and cfg.warmup:
        raise UserError(f"--schedule constant has no warmup (as transformers' constant); for --warmup {cfg.warmup:g} "
                        "use --schedule constant_with_warmup")
    if cfg.schedule.startswith("constant") and cfg.min_lr_ratio:
        raise UserError(f"--min-lr-ratio shapes the cosine and linear decay; --schedule {cfg.schedule} has none")
    betas = tuple(cfg.adam_betas)
    if len(betas) != 2 or not all(limits.within(b, "[0, 1)") for b in betas):
        raise UserError(f"--adam-betas must be two numbers in [0, 1) (got {cfg.adam_betas!r})")
    cfg.adam_betas = betas
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
