"""The `minivit` command: `minivit shapes`, `minivit train`, `minivit eval`, ...

Each subcommand lives in the module that does the work and registers itself here
through a `register(subparsers)` function.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Modules that define `register(subparsers)`; each adds one subcommand.
COMMAND_MODULES = [
    "minivit.predict",
    "minivit.shapes",
    "minivit.train",
    "minivit.bench",
    "minivit.gradcheck",
    "minivit.analysis",
    "minivit.compare",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minivit",
        description="A Vision Transformer with every forward and backward pass written by hand in NumPy.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, KeyError, RuntimeError, OSError, OverflowError) as exc:
        # Bad input from the command line: one clear line, no traceback. (str() of a
        # KeyError quotes its message, so take the message itself.)
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"minivit {args.command}: error: {message}", file=sys.stderr)
        return 2
    except MemoryError as exc:
        # An absurd size (--set dim=1000000, a huge batch, a file that asks for too much):
        # what the user can change is the size, not the code. NumPy's message says how much
        # it tried to allocate; a bare MemoryError says nothing.
        detail = f" ({exc})" if str(exc) else ""
        print(f"minivit {args.command}: error: out of memory{detail}; "
              f"the model, batch or input is too large for this machine", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
