"""Every subcommand describes itself and shows its defaults, read from the one place each default lives; defaults
that depend on each other adapt (precompute --max-length alone), and only an explicit conflicting pair fails."""

import argparse
import dataclasses
import inspect

import pytest

from refcache import UserError
from refcache.cli import build_parser
from refcache.cli import main as cli_main


def _subcommands():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices


def _shown_default(action) -> bool:
    return (action.option_strings and action.default not in (None, [], argparse.SUPPRESS)
            and not isinstance(action.default, bool))


def test_every_subcommand_has_a_description_and_shows_its_defaults(capsys):
    parser, commands = _subcommands()
    assert set(commands) >= {"precompute", "verify", "merge", "train", "sweep", "query", "sql", "report", "demo"}
    assert "precompute" in parser.description and "COMMAND --help" in parser.description
    for name, p in commands.items():
        assert p.description and len(p.description) > 40, name
        text = " ".join(p.format_help().split())
        for action in p._actions:
            if _shown_default(action):  # shown from the parser's value, and not written into the help too
                assert f"(default: {action.default})" in text, (name, action.dest)
                assert "default" not in (action.help or ""), (name, action.dest)


def test_defaults_come_from_one_source():
    from dpo.config import TrainConfig
    from pipeline.precompute import _precompute
    from pipeline.verify import verify

    _, commands = _subcommands()

    def default(cmd, dest):
        return next(a.default for a in commands[cmd]._actions if a.dest == dest)

    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for dest in ("batch_size", "lr", "max_tokens", "probe_size", "eval_every", "checkpoint_every", "warmup"):
        assert default("train", dest) == fields[dest], dest
    sig = inspect.signature(_precompute).parameters
    for dest in ("dtype", "max_length", "max_prompt_length", "truncation_mode", "part_size", "prompt_split"):
        assert default("precompute", dest) == sig[dest].default, dest
    assert default("precompute", "max_prompt_length") == "auto"
    vsig = inspect.signature(verify).parameters
    for dest in ("sample", "beta", "tolerance"):
        assert default("verify", dest) == vsig[dest].default, dest


def test_max_length_alone_derives_the_prompt_limit(tmp_path, capsys, tiny_model_dir, prefs_dir):
    """The failure of issue 12: `--max-length 256` alone stopped at "--max-prompt-length 512 must be smaller"."""
    out = tmp_path / "cache"
    assert cli_main(["precompute", str(prefs_dir / "train.jsonl"), "--model", str(tiny_model_dir), "--out", str(out),
                     "--backend", "hf", "--limit", "8", "--max-length", "256", "--no-progress"]) == 0
    from pipeline.cache import read_manifest

    tok = read_manifest(out)["tokenization"]
    assert tok["max_length"] == 256 and tok["max_prompt_length"] == 128
    capsys.readouterr()
    # an explicit pair that cannot work is still an error, and says what to pass
    rc = cli_main(["precompute", str(prefs_dir / "train.jsonl"), "--model", str(tiny_model_dir), "--out",
                   str(tmp_path / "c2"), "--backend", "hf", "--max-length", "256", "--max-prompt-length", "300"])
    err = capsys.readouterr().err
    assert rc == 2 and "--max-prompt-length 300 must be smaller than --max-length 256" in err
    assert "leave it out (default: half of --max-length, 128)" in err


def test_length_rules(tiny_model_dir):
    """_lengths on the embedded model (context 1024): what is not given follows what is."""
    from pipeline.precompute import _lengths

    assert _lengths(tiny_model_dir, None, "auto", "hf") == (1023, 512)  # the context caps the default 1024
    assert _lengths(tiny_model_dir, 256, "auto", "hf") == (256, 128)
    assert _lengths(tiny_model_dir, 255, "auto", "hf") == (255, 128)  # half, rounded up
    assert _lengths(tiny_model_dir, 256, None, "hf") == (256, None)  # none: never cut the prompt
    assert _lengths(tiny_model_dir, 256, 200, "hf") == (256, 200)
    assert _lengths(tiny_model_dir, None, "auto", "vllm", max_model_len=300) == (299, 150)  # vLLM's length alone
    with pytest.raises(UserError, match=r"--max-model-len 300 must be at least --max-length \+ 1 = 513 .*; pass "
                                        r"--max-length 299 or leave --max-model-len out"):
        _lengths(tiny_model_dir, 512, "auto", "vllm", max_model_len=300)
    with pytest.raises(UserError, match="does not fit the model's context"):
        _lengths(tiny_model_dir, 1024, "auto", "vllm")


def test_train_help_names_the_new_flags(capsys):
    _, commands = _subcommands()
    text = " ".join(commands["train"].format_help().split())
    assert "--where SQL" in text and "ln_ches < 0.5" in text and "the eval cache is not filtered" in text
    assert "--report-to NAME" in text and "(default: none)" in text and "refcache[tensorboard]" in text
    sweep = " ".join(commands["sweep"].format_help().split())
    assert "--lr, --seed, --batch-size, --warmup" in sweep and "<loss>-beta<B>[-<flag><value>...]" in sweep


def test_precompute_python_api_default_is_recorded(tmp_path, tiny_model_dir, prefs_dir):
    from pipeline.cache import read_manifest
    from pipeline.precompute import precompute

    precompute(prefs_dir / "eval.jsonl", tiny_model_dir, tmp_path / "c", backend="hf", limit=4, max_length=64,
               progress=False)
    assert read_manifest(tmp_path / "c")["tokenization"]["max_prompt_length"] == 32
