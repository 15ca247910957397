"""The `vlsearch` command. Each subcommand lives in its own module under vlsearch.commands."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from vlsearch import __version__


def build_parser() -> argparse.ArgumentParser:
    from vlsearch.commands import COMMANDS

    parser = argparse.ArgumentParser(prog="vlsearch", description="Fast, accurate text-to-image search.")
    parser.add_argument("--version", action="version", version=f"vlsearch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"vlsearch.commands.{name}")
        except ModuleNotFoundError:
            continue
        p = module.register(sub)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    from vlsearch.errors import VLSearchError

    try:
        return int(args._run(args) or 0)
    except VLSearchError as e:
        print(f"vlsearch {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vlsearch {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
