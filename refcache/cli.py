"""`refcache` command line. Each stage registers its own subcommands; this file dispatches them and holds the help
formatter they share (descriptions kept as written, every default shown from the parser).

Every command exits 0 on success and non-zero with one line on stderr otherwise: a UserError's message, or for
an OSError (a full disk, a file that cannot be written) what failed on which file. Writers leave a state that
the same command resumes from (temp files + rename, parts and checkpoints kept).
"""

import argparse
import errno
import sys

from refcache_base import UserError, __version__, preempt, progress

DESCRIPTION = """Offline reference log-probs for DPO: score pairs once with the reference model (precompute),
train DPO-family losses from that cache many times (train, sweep), and diagnose caches and runs with
DuckDB SQL (query, sql, report). `refcache demo` runs every stage on the embedded model;
`refcache COMMAND --help` shows a command's flags with their defaults."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every command's help: the description's line breaks kept, and each option's default appended from the
    parser itself (the one source), unless the help already says it or there is none (None, a switch)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if action.option_strings and "%(default)" not in text and "(default" not in text and \
                default not in (None, [], argparse.SUPPRESS) and not isinstance(default, bool):
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """argparse with HelpFormatter; subcommand parsers inherit it."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from dpo import cli as dpo_cli
    from pipeline import cli as pipeline_cli
    from queries import cli as queries_cli
    from refcache import demo

    parser = Parser(prog="refcache", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"refcache {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    pipeline_cli.add_commands(sub)  # precompute, verify, merge
    dpo_cli.add_commands(sub)  # train, sweep
    queries_cli.add_commands(sub)  # query, sql, report
    demo.add_commands(sub)  # demo
    return parser


def main(argv=None) -> int:
    parser = build_parser()
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
