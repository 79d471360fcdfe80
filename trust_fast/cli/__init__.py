"""The `trust-fast` command line.

Errors a user can cause (bad spec, missing model, bad paths) print one line and exit 2;
--debug shows the traceback instead.

One module per command (generate, evaluate, world_train, unlearn, demo, patches: export-patch and
apply-patch), each with `add_parser(subparsers)` and the functions it runs; common holds what they
share, config_flags the flags made from TrustConfig's fields, evaluated_run the unlearning run with
its before/after evaluation that unlearn and demo (and benchmarks) use. Nothing imports torch
before a command runs (`trust-fast --help` stays fast).
"""
from __future__ import annotations

import argparse
import sys

from . import demo, evaluate, generate, patches, unlearn, world_train
from .common import OneLineParser, check_device, check_numbers, one_line

# in the order `trust-fast --help` lists them
_COMMANDS = (generate, evaluate, world_train, unlearn, demo, patches)


def _subcommand_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser below `parser`, at any depth (world -> world train)."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for p in action.choices.values():
                out += [p, *_subcommand_parsers(p)]
    return out


def build_parser() -> argparse.ArgumentParser:
    """The parser of every `trust-fast` command; each sets `fn`, the function that runs it."""
    ap = OneLineParser(prog="trust-fast", description="TRUST concept unlearning for diffusion models")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = ap.add_subparsers(dest="command", required=True)
    for command in _COMMANDS:
        command.add_parser(sub)
    # --debug is accepted after the subcommand too (trust-fast unlearn ... --debug)
    for p in _subcommand_parsers(ap):
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return ap


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like SIGINT's KeyboardInterrupt so that every claim cleans up on the way out."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _notes_to_stderr() -> None:
    """trust_fast.io's notes (cleaned leftovers, restored outputs) as 'trust-fast: note: ...' lines."""
    import logging

    class ToStderr(logging.StreamHandler):
        def emit(self, record):
            self.stream = sys.stderr  # whatever stderr is now (redirected, captured)
            super().emit(record)

    log = logging.getLogger("trust_fast.io")
    if not log.handlers:
        handler = ToStderr()
        handler.setFormatter(logging.Formatter("trust-fast: note: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default: sys.argv[1:]); returns the exit status."""
    import signal
    import threading

    args = build_parser().parse_args(argv)  # --help and usage errors exit here, before torch is imported
    from ..distributed import RankMismatchError

    _notes_to_stderr()
    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        check_numbers(args)
        check_device(getattr(args, "device", None))
        return args.fn(args)
    except (ValueError, OSError, RankMismatchError) as e:
        if args.debug:
            raise
        print(f"trust-fast: error: {one_line(e)}", file=sys.stderr)
        return 2
    except Terminated:
        print("trust-fast: terminated; unfinished outputs were removed", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("trust-fast: interrupted; unfinished outputs were removed", file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


__all__ = ["main", "build_parser"]
