"""Command-line values: argparse ``type=`` validators and a parser whose errors are one line.

Every refusal names the flag (argparse adds ``argument --flag:``) and says what is valid, and the
spac commands print it as the single line ``prog: error: ...`` with exit code 2.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable

from .manifest import excerpt


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, without the usage block above them."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def integer(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    wanted = f"an integer ≥ {minimum}" if maximum is None else f"an integer from {minimum} to {maximum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {excerpt(repr(text))}")
        return value

    return parse


def number(minimum: float, maximum: float = math.inf, above_minimum: bool = False) -> Callable[[str], float]:
    """A finite float in [minimum, maximum], or in (minimum, maximum] with ``above_minimum``."""
    if above_minimum:
        wanted = f"a number in ({minimum:g}, {maximum:g}]"
    else:
        wanted = f"a finite number ≥ {minimum:g}" + ("" if maximum == math.inf else f" and ≤ {maximum:g}")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        low_ok = value > minimum if above_minimum else value >= minimum
        if not (math.isfinite(value) and low_ok and value <= maximum):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {excerpt(repr(text))}")
        return value

    return parse


def utf8_text(text: str) -> str:
    """Text that is valid UTF-8. Python hands undecodable argv bytes over as lone surrogates
    (surrogateescape), which the tokenizer would choke on later."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        code = ord(text[error.start])
        byte = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"character U+{code:04X}"
        raise argparse.ArgumentTypeError(f"not valid UTF-8 ({byte} at character {error.start}); "
                                         "pass UTF-8 text") from None
    return text
