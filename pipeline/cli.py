"""``r2f``: the command line. Each stage module registers its own subcommands; this file only
dispatches, so the CLI stays a thin layer over ``pipeline.<stage>.run(config)``."""
from __future__ import annotations

import argparse
import importlib
import sys

from .log import get_logger, setup_logging

# Stage modules, each with ``register_cli(subparsers)`` adding subcommands whose ``func(args)``
# returns an exit code.
STAGE_MODULES = (
    "pipeline.extract",
    "pipeline.index",
    "pipeline.rerank",
    "pipeline.evaluate",
    "pipeline.run",
    "pipeline.mine",
    "pipeline.train",
    "pipeline.reindex",
)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every stage shares: a YAML config and ``--set key=value`` overrides."""
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (dotted for nested keys); repeatable")


class _ImageSize(argparse.Action):
    """``--image-size H W`` or ``--image-size H,W`` (also ``HxW``): one form for every subcommand."""

    def __call__(self, parser, namespace, values, option_string=None):
        text = " ".join(values).replace(",", " ").replace("x", " ").split()
        try:
            size = [int(v) for v in text]
        except ValueError:
            size = []
        if len(size) != 2 or min(size) < 1:
            parser.error(f"{option_string} takes a height and a width (e.g. 480 640 or 480,640), got {' '.join(values)!r}")
        setattr(namespace, self.dest, size)


def add_image_size_argument(parser: argparse.ArgumentParser, default: str = "480 640") -> None:
    """The one ``--image-size`` option (input height and width) of every subcommand."""
    parser.add_argument("--image-size", nargs="+", action=_ImageSize, metavar="H W",
                        help=f"input height and width, as 'H W' or 'H,W' (default {default})")


def config_from_args(cls, args: argparse.Namespace, options) -> object:
    """The stage config from ``--config`` and ``--set``, then the stage's own options: each of
    ``options`` is an attribute of ``args`` (or an ``(attribute, config key)`` pair) applied when
    given on the command line. Command-line options win over the file and ``--set``."""
    from .config import load_config

    values = {}
    for opt in options:
        attr, key = opt if isinstance(opt, tuple) else (opt, opt)
        value = getattr(args, attr, None)
        if value is not None:
            values[key] = value
    return load_config(cls, getattr(args, "config", None), getattr(args, "overrides", None), values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="r2f", description="City-scale visual place recognition with R2Former")
    parser.add_argument("--log-level", default=None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in STAGE_MODULES:
        importlib.import_module(name).register_cli(sub)
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
        from .config import ConfigError
        get_logger("r2f").error("%s failed: %s", args.command, exc,
                                exc_info=not isinstance(exc, (ConfigError, ValueError, FileNotFoundError)))
        return 2 if isinstance(exc, (ConfigError, ValueError)) else 1


if __name__ == "__main__":
    sys.exit(main())
