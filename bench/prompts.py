"""Benchmark prompts: the opening of the first function of standard-library modules. Named
modules, not a glob, so every machine with the same Python version sees the same prompts."""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

PROMPT_CHARS = 300
WARMUP_MODULE = "keyword.py"
# The share of standard-library paths (by a hash of the relative path) held out of training
# (scripts/train_small_moe.py splits its corpus with `heldout`).
HELDOUT_PERCENT = 10
# Modules held out of training: prompts whose draft acceptance is not inflated by memorised text.
HELDOUT_MODULES = ("argparse.py", "copy.py", "dis.py", "fileinput.py", "functools.py", "sysconfig.py",
                   "tarfile.py", "timeit.py", "json/decoder.py", "unittest/suite.py", "xmlrpc/client.py",
                   "html/__init__.py")
# Other modules, for calibration passes (static's offline frequencies).
CALIBRATION_MODULES = ("asyncio/events.py", "multiprocessing/connection.py", "importlib/metadata/__init__.py",
                       "crypt.py")
# Short, common modules (some in the training set): the paging benchmarks' prompts.
PAGING_MODULES = ("bisect.py", "heapq.py", "textwrap.py", "shlex.py", "fnmatch.py", "calendar.py",
                  "copy.py", "string.py")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def heldout(module: str) -> bool:
    """Whether scripts/train_small_moe.py holds this standard-library path (relative, with /) out of training."""
    return int(hashlib.sha256(module.encode()).hexdigest(), 16) % 100 < HELDOUT_PERCENT


def function_openings(modules, chars: int = PROMPT_CHARS) -> dict[str, str]:
    """Module path -> the first `chars` characters from its first top-level function; modules
    this Python lacks are left out."""
    root = stdlib_root()
    found = {}
    for name in modules:
        path = root / name
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            start = text.find("\ndef ") + 1
            found[name] = text[start:start + chars]
    return found


def warmup_prompt() -> str:
    return function_openings([WARMUP_MODULE])[WARMUP_MODULE]
