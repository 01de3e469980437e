"""`refcache` command line. Each stage registers its own subcommands; this file dispatches them and holds the help
formatter they share (descriptions kept as written, every default shown from the parser).

Every command exits 0 on success and non-zero with one line on stderr otherwise: a UserError's message, or for
an OSError (a full disk, a file that cannot be written) what failed on which file. Writers leave a state that
the same command resumes from (temp files + rename, parts and checkpoints kept).
"""

import argparse
import copy
import difflib
import errno
import json
import os
import sys

from refcache_base import UserError, __version__, preempt, progress

DESCRIPTION = """Offline reference log-probs for DPO: score pairs once with the reference model (precompute),
train DPO-family losses from that cache many times (train, sweep), and diagnose caches and runs with
DuckDB SQL (query, sql, report). `refcache demo` runs every stage on the embedded model;
`refcache COMMAND --help` shows a command's flags with their defaults."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every command's help: the description's line breaks kept, and each option's default appended from the
    parser itself (the one source), unless the help already says it or there is none (None, a switch). Other
    spellings of a flag listed in `action.hidden_options` (TRL's names) are accepted but not shown."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if action.option_strings and "%(default)" not in text and "(default" not in text and \
                default not in (None, [], argparse.SUPPRESS) and not isinstance(default, bool):
            text += " (default: %(default)s)"
        return text

    def _format_action_invocation(self, action):
        if hidden := getattr(action, "hidden_options", ()):
            action = copy.copy(action)
            action.option_strings = [o for o in action.option_strings if o not in hidden]
        return super()._format_action_invocation(action)


class Parser(argparse.ArgumentParser):
    """argparse with HelpFormatter; subcommand parsers inherit it. A command's parser (one without subcommands)
    reports an unknown flag itself, under its own usage, with the nearest flag it has or the reason in
    `flag_hints` ({name: why}, names as typed without --). With `settings_option` ("--config"), that option names a
    YAML or JSON file whose settings (keys: flag names, `_` or `-`) are the defaults that flags given on the
    command line override."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)
        self.flag_hints: dict = {}
        self.settings_option: str | None = None

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        namespace = namespace or argparse.Namespace()
        if self.settings_option and (path := _option_value(args, self.settings_option)):
            try:
                settings = read_settings(self, path)
            except UserError as e:
                self.exit(2, f"{self.prog}: error: {e}\n")
            for dest, value in _not_given(self, args, settings).items():
                setattr(namespace, dest, _FromFile(value))  # argparse keeps a value it finds in the namespace
        required = [a for a in self._actions if a.required]  # checked after the unknown flags, and the file
        for a in required:
            a.required = False
        try:
            namespace, extras = super().parse_known_args(args, namespace)
        finally:
            for a in required:
                a.required = True
        for dest, value in vars(namespace).items():
            if isinstance(value, _FromFile):
                setattr(namespace, dest, value.value)
        if extras and not self._subparsers:
            self.error(unknown_flags(self, extras))
        if clash := exclusive_clash(self, args):
            self.error(clash)
        if missing := [a for a in required if getattr(namespace, a.dest, None) is None]:
            names = [a.option_strings[0] if a.option_strings else a.metavar or a.dest for a in missing]
            self.error(f"the following arguments are required: {', '.join(names)}")
        return namespace, extras


# ---- unknown flags, and settings from a file ---------------------------------------------------------------------

class _FromFile:
    """A setting read from the --config file, until parsing is over (argparse leaves what it finds alone)."""

    def __init__(self, value):
        self.value = value


def _norm(name: str) -> str:
    return name.strip().lstrip("-").replace("_", "-").lower()


def _option_value(args: list, option: str) -> str | None:
    """The value of `option` in `args` (`--opt V` or `--opt=V`), or None."""
    for i, a in enumerate(args):
        if a == option and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(option + "="):
            return a.split("=", 1)[1]
    return None


def _not_given(parser, args: list, settings: dict) -> dict:
    """`settings` less those the command line gives, itself or through a flag they exclude (--steps given:
    the file's epochs count no more)."""
    given = set(given_actions(parser, args))
    for group in parser._mutually_exclusive_groups:
        if given & set(group._group_actions):
            given |= set(group._group_actions)
    taken = {a.dest for a in given}
    return {k: v for k, v in settings.items() if k not in taken}


def given_actions(parser, args: list) -> list:
    """The parser's actions the command line gives, in the order given, each once: flags as typed (`--opt V` or
    `--opt=V`) or as a unique prefix (argparse takes those); nothing after `--`."""
    actions = parser._option_string_actions
    given = []
    for a in args:
        if a == "--":
            break
        name = a.split("=", 1)[0]
        if name not in actions and name.startswith("--") and parser.allow_abbrev:
            names = [o for o in actions if o.startswith(name)]
            name = names[0] if len({actions[o] for o in names}) == 1 else name
        if name in actions:
            given.append(actions[name])
    return list(dict.fromkeys(given))


def exclusive_clash(parser, args: list) -> str | None:
    """argparse's error for two flags of one mutually exclusive group given together, or None. argparse itself
    misses the pair when one value equals its flag's default (`--batch-size 8 --per-device-train-batch-size 2`:
    it compares the value with the default by identity), so the command line is read here as typed."""
    given = given_actions(parser, args)
    for group in parser._mutually_exclusive_groups:
        seen = [a for a in given if a in group._group_actions]
        if len(seen) > 1:  # worded as argparse words it
            return (f"argument {argparse._get_action_name(seen[1])}: not allowed with argument "
                    f"{argparse._get_action_name(seen[0])}")
    return None


def _options(parser) -> dict:
    """{normalized option name: (option as spelled, action)} for the parser's flags, hidden ones too."""
    return {_norm(o): (o, a) for a in parser._actions for o in a.option_strings
            if o.startswith("--") and a.dest not in ("help", "version")}


def _nearest(parser, name: str) -> str:
    """"; did you mean --x?" for the flag of `parser` nearest to `name` (and the flag it spells, for another
    spelling), or ""."""
    options = _options(parser)
    near = difflib.get_close_matches(_norm(name), list(options), n=1)
    if not near:
        return ""
    spelled, action = options[near[0]]
    spelled = next((o for o in action.option_strings if _norm(o) == near[0] and ("_" in o) == ("_" in name)),
                   spelled)  # as the user spells: --learning_rate for --lerning_rate
    primary = action.option_strings[0]
    shown = primary != spelled and action.help != argparse.SUPPRESS
    return f"; did you mean {spelled}{f' ({primary})' if shown else ''}?"


def _hint(parser, name: str) -> str | None:
    return {_norm(k): v for k, v in parser.flag_hints.items()}.get(_norm(name))


def unknown_flags(parser, extras: list) -> str:
    """One line for what the command line gave that `parser` has no flag for: per unknown flag, the reason it is
    not taken (flag_hints) or the nearest flag."""
    flags = [a.split("=", 1)[0] for a in extras if a.startswith("-")]
    if not flags:
        return f"unrecognized arguments: {' '.join(extras)}"
    said = []
    for f in flags:
        why = _hint(parser, f)
        said.append(f"{f}: {why}" if why else f"unrecognized argument {f}{_nearest(parser, f)}")
    return "; ".join(said)


def read_settings(parser, path: str) -> dict:
    """{dest: value} of the settings in the YAML or JSON file `path`: each key a flag of `parser` (spelled with
    `_` or `-`), each value what the flag takes. One-line UserError naming the file and the keys it cannot take."""
    data = _load_settings(path)
    options, values, refused = _options(parser), {}, []
    for key, value in data.items():
        name = _norm(str(key))
        action = options.get(name, (None, None))[1]
        if action is None or action.dest == "config":
            why = _hint(parser, str(key))
            near = difflib.get_close_matches(name, list(options), n=1)
            if why:
                refused.append(f"{key} ({why})")
            elif near:  # spelled like the key: learning_rate, or learning-rate
                refused.append(f"{key} (did you mean {near[0].replace('-', '_') if '_' in str(key) else near[0]}?)")
            else:
                refused.append(str(key))
            continue
        values[action.dest] = _setting_value(action, name, value, path, key)
    if refused:
        raise UserError(f"{path}: settings refcache does not take: {', '.join(refused)}; remove them (README "
                        "\"Coming from TRL\" maps TRL's names)")
    return values


def _load_settings(path: str) -> dict:
    """The mapping in the YAML or JSON file `path`; one-line UserError otherwise."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".yaml", ".yml", ".json"):
        raise UserError(f"--config {path}: expected a .yaml, .yml or .json file")
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file") from None
    if ext == ".json":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise UserError(f"--config {path}: not valid JSON ({e})") from None
    else:
        import yaml  # pyyaml: a dependency of transformers and huggingface_hub

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise UserError(f"--config {path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of settings (name: value), got {type(data).__name__}")
    return data


def _setting_value(action, name: str, value, path, key):
    """`value` (as YAML or JSON gives it) as the flag `action` would store it: typed like the flag, a list for a
    flag of several values, a bool for a switch. A flag marked `raw_settings` takes the value as it is (its
    command converts it, e.g. TRL's loss_type list or lr_scheduler_kwargs dict)."""
    def bad(what):
        return UserError(f"{path}: {key}: {what} (got {value!r})")

    if getattr(action, "raw_settings", False):
        return value
    if action.nargs == 0:  # a switch (store_true / store_false): true or false
        if not isinstance(value, bool):
            raise bad("expected true or false")
        return value if name == _norm(action.dest) else (action.const if value else action.default)
    if value is None:
        if action.default is not None:
            raise bad("expected a value")
        return None
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    items = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not many:
        raise bad("expected one value")
    if isinstance(action.nargs, int) and len(items) != action.nargs:
        raise bad(f"expected {action.nargs} values")
    kind = action.type or str
    typed = []
    for x in items:
        if isinstance(x, (bool, list, dict)) or (kind is int and isinstance(x, float) and x != int(x)):
            raise bad(f"expected {'an integer' if kind is int else 'a number' if kind is float else 'text'}")
        try:
            typed.append(kind(x))
        except (TypeError, ValueError):
            raise bad(f"expected {'an integer' if kind is int else 'a number'}") from None
    return typed if many else typed[0]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `refcache` parser with every command; for `command` one of stage 3's (query, sql, report), one with
    only those: the other stages' flags are made from declarations that sit beside their torch code (loss
    parameters, backends), and importing torch was most of a diagnostic's start-up (`query --help` 2.9 s)."""
    from queries import cli as queries_cli

    light = _parser(queries_cli.add_commands)
    if command in light._subparsers._group_actions[0].choices:
        return light
    from dpo import cli as dpo_cli
    from pipeline import cli as pipeline_cli
    from refcache import demo

    return _parser(pipeline_cli.add_commands,  # precompute, verify, merge
                   dpo_cli.add_commands,  # train, sweep
                   queries_cli.add_commands,  # query, sql, report
                   demo.add_commands)  # demo


def _parser(*add_commands) -> argparse.ArgumentParser:
    parser = Parser(prog="refcache", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"refcache {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in add_commands:
        add(sub)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    preempt.install()  # SIGTERM (a scheduler's time limit or eviction) stops like Ctrl-C
    try:
        try:
            return int(args.func(args) or 0)
        finally:
            progress.close_all()  # an open bar ends its line first: an error below starts a line of its own
    except UserError as e:
        print(f"refcache {args.command}: error: {e}", file=sys.stderr)
        return 2
    except preempt.Preempted as e:
        print(f"refcache {args.command}: {e}; what was written is kept: re-run the same command"
              f"{' with --resume' if args.command in ('train',) else ''} to continue", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print(f"refcache {args.command}: interrupted (re-run the same command to resume)", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"refcache {args.command}: error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # libraries that report a full disk in their own exception type (safetensors, polars)
        if "No space left on device" not in str(e):
            raise
        print(f"refcache {args.command}: error: disk full ({str(e).strip().splitlines()[0]}); free space and "
              "re-run to resume", file=sys.stderr)
        return 2


def os_error_line(e: OSError) -> str:
    """One line for an OSError: what went wrong, on which file, and what to do."""
    where = f" {e.filename}" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full writing{where}; free space and re-run to resume"
    if e.errno == errno.EFBIG:
        return f"file too large writing{where} (a file-size limit, see ulimit -f); raise it and re-run to resume"
    what = (e.strerror or str(e) or type(e).__name__).splitlines()[0]
    return f"{e.filename}: {what}" if e.filename else what


if __name__ == "__main__":
    sys.exit(main())
