"""``r2f``: the command line. Each stage module registers its own subcommands; this file only
dispatches, so the CLI stays a thin layer over ``pipeline.<stage>.run(config)``."""
from __future__ import annotations

import argparse
import sys

from . import evaluate, extract, index, mine, reindex, rerank, run, serve, train
from .config import ConfigError
from .log import get_logger, setup_logging

# The stage modules, each with ``register_cli(subparsers)`` adding subcommands whose ``func(args)``
# returns an exit code. Stage modules import their heavy dependencies (torch, Ray) inside functions,
# so building the parser stays quick and a bad argument fails before any of them loads.
STAGES = (extract, index, rerank, evaluate, run, mine, train, reindex, serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="r2f", description="City-scale visual place recognition with R2Former")
    parser.add_argument("--log-level", default=None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for stage in STAGES:
        stage.register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the CLI reports, the library raises
        get_logger("r2f").error("%s failed: %s", args.command, exc,
                                exc_info=not isinstance(exc, (ConfigError, ValueError, FileNotFoundError)))
        return 2 if isinstance(exc, (ConfigError, ValueError)) else 1


if __name__ == "__main__":
    sys.exit(main())
