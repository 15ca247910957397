"""The `vlsearch` command. Each subcommand lives in its own module under vlsearch.commands."""

from __future__ import annotations

import argparse
import importlib
import sys

from vlsearch.commands import COMMANDS
from vlsearch.errors import VLSearchError
from vlsearch.settings import set_offline
from vlsearch.version import __version__


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand in COMMANDS, registered from its module; a module that fails to import is an
    error here (a broken install shows at once, not as a subcommand that silently went missing)."""
    parser = argparse.ArgumentParser(prog="vlsearch", description="Fast, accurate text-to-image search.")
    parser.add_argument("--version", action="version", version=f"vlsearch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"vlsearch.commands.{name}")
        p = module.register(sub)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    set_offline()
    args = build_parser().parse_args(argv)

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
