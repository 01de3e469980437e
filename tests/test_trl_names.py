"""Issue 19, a TRL user's first hour: TRL's DPOConfig / TrainingArguments names are flags (and --config keys) of
train and sweep that give the same TrainConfig as refcache's own flags; an unknown flag gets its command's usage
and the nearest flag; the learning-rate schedules are transformers', step for step; the sweep's table is the
house table; README "Coming from TRL" is the table the declarations make."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from helpers import one_line_error

from dpo.cli import apply_trl, config_from, trl_table
from dpo.config import FIELDS, TRL_ACCEPTED, TRL_UNSUPPORTED, validate
from dpo.losses import LOSSES
from dpo.sweep import sweep_runs
from dpo.train import TrainConfig, lr_factor, train
from refcache.cli import build_parser
from refcache.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--cache", "c", "--out", "o", "--eval-cache", "e"]


@pytest.fixture(autouse=True)
def one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def parse(*argv, command="train"):
    """What `refcache COMMAND BASE ARGV` runs with, parsed only: a validated TrainConfig for train, the
    converted flags for sweep."""
    args = build_parser().parse_args([command, *BASE, *map(str, argv)])
    apply_trl(args, sweep=command == "sweep")
    return args if command == "sweep" else validate(config_from(args))


# (TRL's flags, refcache's flags that mean the same); every name TRL has and refcache takes appears here
SAME = [
    (["--output_dir", "runs/x"], ["--out", "runs/x"]),
    (["--model_name_or_path", "m"], ["--model", "m"]),
    (["--loss_type", "hinge"], ["--loss", "hinge"]),
    (["--loss_type", "ipo"], ["--loss", "ipo_norm"]),  # TRL's ipo is per-token: refcache's ipo_norm
    (["--max_steps", "7"], ["--steps", "7"]),
    (["--max_steps", "-1"], []),  # TRL's default: from the epochs
    (["--num_train_epochs", "2.5"], ["--epochs", "2.5"]),
    (["--per_device_train_batch_size", "3"], ["--batch-size", "3"]),
    (["--gradient_accumulation_steps", "4", "--per_device_train_batch_size", "3"],
     ["--grad-accum", "4", "--batch-size", "12"]),
    (["--learning_rate", "3e-6"], ["--lr", "3e-6"]),
    (["--warmup_steps", "5"], ["--warmup", "5"]),
    (["--warmup_ratio", "0.1"], ["--warmup", "0.1"]),
    (["--lr_scheduler_type", "linear"], ["--schedule", "linear"]),
    (["--lr_scheduler_type", "cosine_with_min_lr", "--lr_scheduler_kwargs", '{"min_lr_rate": 0.1}'],
     ["--schedule", "cosine", "--min-lr-ratio", "0.1"]),
    (["--lr_scheduler_kwargs", '{"min_lr_rate": 0.2}'], ["--min-lr-ratio", "0.2"]),
    (["--weight_decay", "0.01"], ["--weight-decay", "0.01"]),
    (["--adam_beta1", "0.8"], ["--adam-betas", "0.8", "0.999"]),
    (["--adam_beta2", "0.95", "--adam_beta1", "0.8"], ["--adam-betas", "0.8", "0.95"]),
    (["--max_grad_norm", "0.5"], ["--max-grad-norm", "0.5"]),
    (["--seed", "42"], ["--seed", "42"]),
    (["--bf16"], ["--dtype", "bfloat16"]),
    (["--bf16", "false"], ["--dtype", "float32"]),
    (["--use_cpu"], ["--device", "cpu"]),
    (["--gradient_checkpointing"], ["--grad-checkpointing"]),
    (["--gradient_checkpointing", "False"], []),
    (["--lora_r", "8"], ["--lora", "8"]),
    (["--lora_alpha", "32"], ["--lora-alpha", "32"]),
    (["--eval_steps", "5"], ["--eval-every", "5"]),
    (["--eval_strategy", "steps", "--eval_steps", "5"], ["--eval-every", "5"]),
    (["--eval_steps", "5", "--eval_strategy", "no"], []),  # TRL: no evaluation whatever eval_steps says
    (["--save_steps", "50"], ["--checkpoint-every", "50"]),
    (["--save_strategy", "no"], ["--checkpoint-every", "0"]),
    (["--save_total_limit", "3"], ["--keep-checkpoints", "3"]),
    (["--report_to", "none"], ["--report-to", "none"]),
    (["--resume_from_checkpoint"], ["--resume"]),
    (["--beta", "0.2"], ["--beta", "0.2"]),
    (["--label_smoothing", "0.1"], ["--label-smoothing", "0.1"]),
    (["--rpo_alpha", "0.5", "--loss_type", "sigmoid"], ["--rpo-alpha", "0.5"]),
    (["--discopop_tau", "0.1"], ["--discopop-tau", "0.1"]),
    # taken at the value refcache always uses: nothing changes
    (["--precompute_ref_log_probs"], []),
    (["--optim", "adamw_torch_fused"], []),
    (["--optim", "adamw_torch"], []),
    (["--adam_epsilon", "1e-8"], []),
    (["--disable_dropout", "true"], []),
    (["--logging_steps", "10"], []),
]


def _dashed(argv):
    return [a.replace("_", "-") if a.startswith("--") else a for a in argv]


@pytest.mark.parametrize("trl, ours", SAME, ids=[" ".join(t) for t, _ in SAME])
def test_trl_name_gives_the_config_of_our_flag(trl, ours):
    want = parse(*ours)
    assert parse(*trl) == want
    assert parse(*_dashed(trl)) == want  # --learning-rate as well as --learning_rate


def test_every_trl_name_in_the_code_is_tested_and_in_the_readme():
    declared = {t.name for f in FIELDS.values() for t in f.metadata["trl"]} | {t.name for t in TRL_ACCEPTED}
    tested = {a[2:] for trl, _ in SAME for a in trl if a.startswith("--")}
    assert declared == tested
    readme = (ROOT / "README.md").read_text()
    table = re.search(r"<!-- trl-table[^>]*-->\n(.*?)\n<!-- /trl-table -->", readme, re.DOTALL)
    assert table, "README.md has no generated TRL table"
    assert table.group(1) == trl_table(), 'regenerate: python -c "from dpo.cli import trl_table; print(trl_table())"'
    for name in declared | set(TRL_UNSUPPORTED):
        assert f"| `{name}` |" in table.group(1), name


def test_every_dpoconfig_field_is_mapped_taken_or_refused():
    """TRL 1.16's own DPOConfig fields (and what its base config changes of TrainingArguments): each one is a
    refcache flag, taken at refcache's value, or refused with a reason, so the README's lists are complete."""
    trl = pytest.importorskip("trl", reason="TRL 1.16 is in the dev extra: pip install -e '.[dev]'")
    import dataclasses

    from transformers import TrainingArguments

    base = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}
    own = {f.name for f in dataclasses.fields(trl.DPOConfig) if f.name not in base or base[f.name] != f.default}
    declared = {t.name for f in FIELDS.values() for t in f.metadata["trl"]} | {t.name for t in TRL_ACCEPTED}
    assert own - declared - set(TRL_UNSUPPORTED) == set()


def test_per_device_batch_is_global_batch_over_processes(monkeypatch):
    assert parse("--per_device_train_batch_size", 3).batch_size == 3
    assert parse("--per-device-train-batch-size", 3, "--grad-accum", 2).batch_size == 6
    monkeypatch.setenv("WORLD_SIZE", "4")  # under torchrun
    assert parse("--per_device_train_batch_size", 3, "--gradient_accumulation_steps", 2).batch_size == 24
    # a sweep converts each listed value
    args = parse("--beta", "0.1", "--per_device_train_batch_size", "1,2", command="sweep")
    assert [over["batch_size"] for _, over in sweep_runs(args)] == [4, 8]


PER_DEVICE = "--per_device_train_batch_size/--per-device-train-batch-size"  # as argparse names the flag


@pytest.mark.parametrize("argv, second, first", [
    (["--batch-size", 16, "--per_device_train_batch_size", 2], PER_DEVICE, "--batch-size"),
    # 8 is --batch-size's default: argparse alone let this pair through (it compares a value with the default by
    # identity) and the per-device value silently won
    (["--batch-size", 8, "--per-device-train-batch-size", 2], PER_DEVICE, "--batch-size"),
    (["--per-device-train-batch-size=2", "--batch-size=8"], "--batch-size", PER_DEVICE),
    (["--batch-s", 8, "--per-device-train-batch-size", 2], PER_DEVICE, "--batch-size"),  # a prefix argparse takes
    (["--num_train_epochs", 1, "--steps", 5], "--steps", "--epochs/--num_train_epochs/--num-train-epochs"),
])
def test_flags_that_exclude_each_other_are_refused_whatever_the_value(capsys, argv, second, first):
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: refcache train")
    assert f"refcache train: error: argument {second}: not allowed with argument {first}\n" in err, err


def test_sweep_takes_trl_names():
    args = parse("--learning_rate", "1e-6,5e-7", "--loss_type", "ipo,sigmoid", "--beta", "0.1", command="sweep")
    assert [n for n, _ in sweep_runs(args)] == [f"{loss}-beta0.1-lr{lr}" for loss in ("ipo_norm", "sigmoid")
                                               for lr in ("1e-06", "5e-07")]


@pytest.mark.parametrize("argv, says", [
    (["--loss_type", "sft"], "--loss_type 'sft': refcache has no such loss"),
    (["--loss_type", "bco"], "or --loss with one of: " + ", ".join(LOSSES)),
    (["--optim", "sgd"], "--optim 'sgd': refcache trains with torch's AdamW"),
    (["--warmup_ratio", "1"], "--warmup_ratio must be in [0, 1)"),
    (["--lr_scheduler_type", "polynomial"], "--lr_scheduler_type 'polynomial' is not one refcache has"),
    (["--resume_from_checkpoint", "out/checkpoint-500"], "refcache resumes from the latest checkpoint in --out"),
    (["--save_strategy", "epoch"], "--save_strategy 'epoch': refcache counts steps"),
    (["--schedule", "constant", "--warmup", "2"], "use --schedule constant_with_warmup"),
])
def test_a_trl_value_refcache_lacks_is_one_line(capsys, tmp_path, argv, says):
    line = one_line_error(capsys, ["train", "--cache", tmp_path / "c", "--out", tmp_path / "o", *argv])
    assert says in line, line


def test_unknown_flag_prints_the_subcommands_usage_and_the_nearest_flag():
    """The failure of the issue: the top-level usage and `unrecognized arguments`, no hint."""
    run = subprocess.run([sys.executable, "-m", "refcache", "train", "--lerning-rate", "1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 2
    assert run.stderr.startswith("usage: refcache train [-h] --cache CACHE"), run.stderr
    errors = [ln for ln in run.stderr.splitlines() if "error:" in ln]
    want = "refcache train: error: unrecognized argument --lerning-rate; did you mean --learning-rate (--lr)?"
    assert errors == [want], run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("argv, usage, says", [
    (["train", "--max_length", "512"], "usage: refcache train",
     "--max_length: truncation is fixed when the cache is built: pass --max-length to `refcache precompute`"),
    (["sweep", "--max-prompt-length", "64"], "usage: refcache sweep",
     "pass --max-prompt-length to `refcache precompute`"),
    (["sweep", "--lerning_rate", "1"], "usage: refcache sweep", "did you mean --learning_rate (--lr)?"),
    (["precompute", "d", "--model", "m", "--out", "o", "--max_lenght", "5"], "usage: refcache precompute",
     "did you mean --max_length (--max-length)?"),
    (["query", "compare", "--rn", "r"], "usage: refcache query", "did you mean --run?"),
    (["sql", "SELECT 1", "--max-rowz", "3"], "usage: refcache sql", "did you mean --max-rows?"),
    (["report", "r", "--oot", "x"], "usage: refcache report", "did you mean --out?"),
    (["verify", "--sampel", "3"], "usage: refcache verify", "did you mean --sample?"),
])
def test_every_subcommand_reports_its_own_unknown_flags(capsys, argv, usage, says):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(usage), err
    assert says in err.splitlines()[-1], err


def test_precompute_takes_trls_length_names():
    args = build_parser().parse_args(["precompute", "d", "--model", "m", "--out", "o", "--max_length", "512",
                                      "--max_prompt_length", "100"])
    assert (args.max_length, args.max_prompt_length) == (512, 100)
    assert "--max_length" not in build_parser()._subparsers._group_actions[0].choices["precompute"].format_help()


# ---- --config FILE -----------------------------------------------------------------------------------------

TRL_YAML = """\
output_dir: runs/from-file     # BASE gives --out: the command line wins
learning_rate: 5e-7          # pyyaml reads this as text: refcache types it like the flag
loss_type: [ipo]
per_device_train_batch_size: 3
gradient_accumulation_steps: 2
num_train_epochs: 2
max_steps: -1
lr_scheduler_type: cosine_with_min_lr
lr_scheduler_kwargs: {min_lr_rate: 0.1}
warmup_ratio: 0.1
bf16: true
adam_beta2: 0.95
logging_steps: 10
optim: adamw_torch_fused
report_to: none
seed: 42
label_smoothing: 0.05
"""
FROM_FILE = ["--loss", "ipo_norm", "--batch-size", "6", "--grad-accum", "2",
             "--epochs", "2", "--min-lr-ratio", "0.1", "--warmup", "0.1", "--dtype", "bfloat16", "--adam-betas",
             "0.9", "0.95", "--report-to", "none", "--seed", "42", "--lr", "5e-7", "--label-smoothing", "0.05"]


def _config(tmp_path, text, name="dpo.yaml"):
    (tmp_path / name).write_text(text)
    return ["--config", str(tmp_path / name)]


def test_config_file_gives_what_the_flags_give(tmp_path):
    assert parse(*_config(tmp_path, TRL_YAML)) == parse(*FROM_FILE)
    as_json = json.dumps({"learning_rate": 5e-7, "loss_type": "ipo", "per_device_train_batch_size": 3,
                          "gradient_accumulation_steps": 2, "bf16": True, "grad_checkpointing": True,
                          "adam_betas": [0.8, 0.9], "warmup": 3})
    assert parse(*_config(tmp_path, as_json, "dpo.json")) == parse(
        "--lr", "5e-7", "--loss", "ipo_norm", "--batch-size", "6", "--grad-accum", "2", "--dtype", "bfloat16",
        "--grad-checkpointing", "--adam-betas", "0.8", "0.9", "--warmup", "3")


def test_command_line_overrides_the_file(tmp_path):
    cfg = _config(tmp_path, TRL_YAML)
    got = parse(*cfg, "--lr", "1e-5", "--grad-accum", "4", "--seed", "1", "--out", "elsewhere")
    assert (got.lr, got.grad_accum, got.batch_size, got.seed, got.out) == (1e-5, 4, 12, 1, "elsewhere")
    assert parse(*cfg, "--learning_rate", "1e-5").lr == 1e-5  # through TRL's spelling too
    # a flag given excludes the file's settings it excludes: --steps the file's epochs, --batch-size its per-device
    got = parse(*cfg, "--steps", "4", "--batch-size", "16")
    assert (got.steps, got.epochs, got.batch_size) == (4, None, 16)
    # the same through prefixes argparse takes (the file's per-device batch silently won over --batch-s 16, and
    # --ste 4 was refused as given with the file's epochs)
    got = parse(*cfg, "--ste", "4", "--batch-s=16")
    assert (got.steps, got.epochs, got.batch_size) == (4, None, 16)
    # in the file, max_steps overrides num_train_epochs (TRL's rule)
    got = parse(*_config(tmp_path, "max_steps: 5\nnum_train_epochs: 3\n"))
    assert (got.steps, got.epochs) == (5, None)
    # --out is required, and the file may give it
    args = build_parser().parse_args(["train", "--cache", "c", *_config(tmp_path, "output_dir: x\n")])
    assert args.out == "x"


@pytest.mark.parametrize("text, says", [
    ("learning_rate: 1e-6\nmax_length: 512\nfp16: false\nlerning_rate: 2\nhub_model_id: me/x\n",
     ("dpo.yaml: settings refcache does not take: max_length (truncation is fixed when the cache is built: pass "
      "--max-length to `refcache precompute`), fp16 (bf16 or fp32: --dtype), lerning_rate (did you mean "
      "learning_rate?), hub_model_id; remove them")),
    ("use_weighting: true\n", "use_weighting (WPO weighting is not implemented)"),
    ("learning_rate: fast\n", "dpo.yaml: learning_rate: expected a number (got 'fast')"),
    ("- 1\n", "expected a mapping of settings"),
    ("steps: [1\n", "not valid YAML"),
])
def test_config_file_with_settings_refcache_does_not_take_is_one_line(tmp_path, capsys, text, says):
    with pytest.raises(SystemExit) as e:
        cli_main(["train", "--cache", str(tmp_path), *_config(tmp_path, text)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("refcache train: error: "), err
    assert says in err, err


def test_config_file_loss_types_refcache_lacks(tmp_path, capsys):
    line = one_line_error(capsys, ["train", "--cache", tmp_path, *_config(tmp_path, "loss_type: [sigmoid, sft]\n"
                                                                          "output_dir: o\n")])
    assert "refcache trains one loss per run" in line and "--loss rpo" in line, line
    line = one_line_error(capsys, ["train", "--cache", tmp_path, *_config(tmp_path, "loss_type: sft\n"
                                                                          "output_dir: o\n")])
    assert "--loss_type 'sft': refcache has no such loss" in line, line


# ---- learning-rate schedules: transformers' -----------------------------------------------------------------

def _transformers_lrs(name, warmup, total, min_ratio=None) -> list:
    from transformers import get_scheduler

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    kw = {"min_lr_rate": min_ratio} if min_ratio is not None else None
    sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total, scheduler_specific_kwargs=kw)
    lrs = []
    for _ in range(total):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return lrs


SCHEDULES = [(name, ours, warmup, total, ratio)
             for name, ours, ratios in (("cosine", "cosine", (None,)), ("linear", "linear", (None,)),
                                        ("constant_with_warmup", "constant_with_warmup", (None,)),
                                        ("cosine_with_min_lr", "cosine", (0.0, 0.1, 0.5)))
             for warmup in (0, 1, 3) for total in (1, 2, 3, 10, 57) for ratio in ratios] + \
            [("constant", "constant", 0, total, None) for total in (1, 3, 10)]


def test_lr_factor_equals_transformers_get_scheduler():
    for name, ours, warmup, total, ratio in SCHEDULES:
        want = _transformers_lrs(name, warmup, total, ratio)
        got = [lr_factor(s, warmup, total, ours, ratio or 0.0) for s in range(total)]
        assert got == pytest.approx(want, abs=1e-12, rel=0), (name, warmup, total, ratio)
    # the 3-step cosine: 1, 0.75, 0.25 (it was 1, 0.5, 0)
    assert [lr_factor(s, 0, 3, "cosine", 0.0) for s in range(3)] == pytest.approx([1, 0.75, 0.25], abs=1e-15)


def test_a_run_logs_transformers_lrs(tmp_path, train_cache, capsys):
    """A real run: the lr column of steps.parquet is transformers' schedule (warmup 0.25 of 6 steps: 2, rounded
    up as transformers does), and the last step's lr is above 0; a run recorded without a schedule version (one
    made before it) is not resumed."""
    out = tmp_path / "run"
    cfg = TrainConfig(cache=str(train_cache), out=str(out), steps=6, batch_size=4, lr=1e-4, warmup=0.25,
                      probe_every=0, probe_size=4, checkpoint_every=3, save_final=False, progress=False, threads=1)
    train(cfg)
    lrs = pq.read_table(out / "steps.parquet").column("lr").to_pylist()
    want = [1e-4 * f for f in _transformers_lrs("cosine", 2, 6)]
    assert lrs == pytest.approx(want, abs=1e-12 * 1e-4, rel=0)
    assert lrs[0] == 0 and lrs[-1] > 0
    config = json.loads((out / "config.json").read_text())
    assert (config["warmup_steps"], config["lr_schedule"]) == (2, "transformers")

    # an older refcache's run (no lr_schedule recorded), killed after its checkpoint at step 3
    del config["lr_schedule"]
    (out / "config.json").write_text(json.dumps(config))
    (out / "summary.json").unlink()
    line = one_line_error(capsys, ["train", "--cache", train_cache, "--out", out, "--steps", 6, "--batch-size", 4,
                                   "--lr", 1e-4, "--warmup", 0.25, "--probe-every", 0, "--probe-size", 4,
                                   "--checkpoint-every", 3, "--threads", 1, "--resume", "--no-progress"])
    assert "was started by an earlier refcache whose learning-rate schedule differs" in line, line
    assert "train it again in a new --out" in line, line


def test_sweep_table_is_the_house_table(tmp_path, train_cache, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # a wide terminal: one line per run
    assert cli_main(["sweep", "--cache", str(train_cache), "--out", str(tmp_path), "--beta", "0.1,0.2", "--steps",
                     "2", "--batch-size", "4", "--probe-every", "0", "--probe-size", "4", "--threads", "1",
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert not set("│┌┐└┘─┬┴┼╞╡═") & set(out), out  # no Polars box drawing
    header = next(ln for ln in out.splitlines() if ln.startswith("run "))
    assert header.split()[-1] == "loss_last10" and "final_loss" not in out, out
    assert re.search(r"^\d+ rows$", out, re.MULTILINE), out
