"""The logging flags the commands share: -v/--verbose, --log-level and --log-file."""

from __future__ import annotations

import argparse
import logging
import sys

LEVELS = ("debug", "info", "warning", "error")


def add_logging_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("logging")
    group.add_argument("-v", "--verbose", action="count", default=0,
                       help="more log messages: -v for info, -vv for debug (default: warnings only)")
    group.add_argument("--log-level", choices=LEVELS, default=None, help="log level; overrides -v")
    group.add_argument("--log-file", default=None, help="also append the log to this file")


def setup_logging(program: str, args: argparse.Namespace) -> None:
    """Log to stderr (and --log-file) at the level the flags ask for."""
    if args.log_level:
        level = getattr(logging, args.log_level.upper())
    else:
        level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    handlers = [logging.StreamHandler()]
    if args.log_file:
        try:
            handlers.append(logging.FileHandler(args.log_file, encoding="utf-8"))
        except OSError as error:
            print(f"{program}: error: --log-file {args.log_file}: {error.strerror}", file=sys.stderr)
            raise SystemExit(2) from None
    logging.basicConfig(level=level, format=f"{program}: %(levelname)s: %(name)s: %(message)s", handlers=handlers)
