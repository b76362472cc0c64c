"""Routing counts: how often each MoE layer's router picked each expert over some text. They are
what the `static` policy keeps resident (its most routed experts), and the one way to give it a
good set: without them it keeps the first experts of the first layers.

A run records them (`spac-run --save-routing FILE`, `Runtime.count_routing()`), every target
pass counted (prefill, and with speculative decoding the verify passes, rejected rows included:
what the pager reads for); a later run under a memory limit reads them (`--routing FILE`,
`Runtime(static_frequencies=...)`). Record them on text like what the model will serve: on the
memory testbed's held-out prompts, a set calibrated on other prompts read the fewest bytes of
every policy at every cap (README, A model larger than memory).

The file is JSON, written atomically and added to when it exists:
    {"format": "spac-routing", "version": 1, "num_layers": L, "num_experts": E,
     "counts": [[c_0_0, ..., c_0_E-1], ..., [c_L-1_0, ...]]}
(rows of layers without experts stay zero). It may come from a stranger: it is read with a size
bound, and every field is checked against the package it is used with; it only ever chooses
which experts stay in memory, never what is computed.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from .manifest import excerpt, read_bounded, write_atomic

FORMAT, VERSION = "spac-routing", 1
log = logging.getLogger("spac")

MAX_FILE_BYTES = 64 << 20  # a million experts' counts; a real file is a few KB
MAX_COUNT = 2**53  # exact in JSON readers that use doubles


class RoutingFileError(ValueError):
    """A routing file that cannot be used with this package."""


def package_shape(manifest) -> tuple[int, int]:
    """(layers, experts): the counts' shape for a package, indexed by layer index."""
    moe = manifest.target
    return moe.dims["num_layers"], moe.dims["num_experts"]


class RoutingCounts:
    """[layer, expert] routing counts of one package's target; `add` is a ModelRunner's on_routing hook."""

    def __init__(self, counts: np.ndarray):
        self.counts = counts

    @classmethod
    def empty(cls, manifest) -> "RoutingCounts":
        return cls(np.zeros(package_shape(manifest), dtype=np.int64))

    def add(self, layer: int, topk_ids: np.ndarray) -> None:
        row = self.counts[layer]
        row += np.bincount(topk_ids.reshape(-1), minlength=len(row))

    def merged(self, other: "RoutingCounts") -> "RoutingCounts":
        return RoutingCounts(self.counts + other.counts)

    def as_dict(self) -> dict:
        layers, experts = self.counts.shape
        return {"format": FORMAT, "version": VERSION, "num_layers": layers, "num_experts": experts,
                "counts": self.counts.tolist()}

    def save(self, path: str | os.PathLike) -> None:
        write_atomic(path, (json.dumps(self.as_dict()) + "\n").encode())


class RoutingRecord:
    """What --save-routing keeps: the file's counts so far (read, and checked against the package,
    when the record is made, before the runtime loads) and, once started, what the runtime's
    target routes."""

    def __init__(self, path: str | os.PathLike, manifest):
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise RoutingFileError(f"routing file {self.path}: the folder {self.path.parent} does not exist")
        exists = self.path.exists() or self.path.is_symlink()
        self.before = load_routing(self.path, manifest) if exists else RoutingCounts.empty(manifest)
        self.counts = RoutingCounts.empty(manifest)

    def start(self, runtime) -> None:
        """Count what `runtime` routes from now on."""
        self.counts = runtime.count_routing()

    def save(self) -> None:
        """The file's counts plus the recorded ones, written atomically."""
        try:
            self.before.merged(self.counts).save(self.path)
        except OSError as error:
            raise RoutingFileError(f"routing file {self.path}: cannot be written: {error.strerror}") from None
        log.info("routing counts added to %s", self.path)


def load_routing(path: str | os.PathLike, manifest) -> RoutingCounts:
    """The counts in `path`, checked against `manifest`'s shape; RoutingFileError names what is wrong."""
    raw = read_bounded(path, MAX_FILE_BYTES, RoutingFileError, f"routing file {path}",
                       "a routing file is a few KB of JSON")
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as error:
        raise RoutingFileError(f"routing file {path}: not JSON ({excerpt(str(error))}); "
                               "write one with spac-run --save-routing") from None
    return routing_from_dict(data, manifest, str(path))


def routing_from_dict(data, manifest, source: str) -> RoutingCounts:
    def invalid(field: str, what: str) -> RoutingFileError:
        return RoutingFileError(f"routing file {source}: {field}: {what}")

    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise invalid("format", f"expected {FORMAT!r} (a file written by spac-run --save-routing)")
    if data.get("version") != VERSION:
        raise invalid("version", f"expected {VERSION}, got {_shown(data.get('version'))}")
    layers, experts = package_shape(manifest)
    for field, expected in (("num_layers", layers), ("num_experts", experts)):
        if data.get(field) != expected or isinstance(data.get(field), bool):
            raise invalid(field, f"this package's target has {expected}, the file says {_shown(data.get(field))} "
                                 "(counts recorded with another model)")
    rows = data.get("counts")
    if not isinstance(rows, list) or len(rows) != layers:
        raise invalid("counts", f"expected a list of {layers} rows (one per layer)")
    for index, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != experts:
            raise invalid(f"counts[{index}]", f"expected a list of {experts} counts (one per expert)")
        bad = next((value for value in row
                    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_COUNT), None)
        if bad is not None:
            raise invalid(f"counts[{index}]", f"expected whole numbers from 0 to 2^53, got {_shown(bad)}")
    return RoutingCounts(np.array(rows, dtype=np.int64).reshape(layers, experts))


def checked_frequencies(frequencies, manifest) -> np.ndarray | None:
    """`Runtime(static_frequencies=...)`: a routing file's path, or [layer, expert] counts; None stays None."""
    if frequencies is None:
        return None
    if isinstance(frequencies, (str, os.PathLike)):
        return load_routing(frequencies, manifest).counts
    counts = np.asarray(frequencies, dtype=np.float64)
    layers, experts = package_shape(manifest)
    rows = range(max(manifest.target.moe_layers) + 1, layers + 1)  # rows past the last MoE layer may be left out
    if counts.ndim != 2 or counts.shape[0] not in rows or counts.shape[1] != experts \
            or not np.isfinite(counts).all() or (counts < 0).any():
        raise ValueError(f"static_frequencies must be {layers} x {experts} finite counts >= 0 "
                         f"(layers x experts), got {counts.shape}")
    return counts


def _no_constant(name: str):
    raise ValueError(f"{name} is not a count")


def _shown(value) -> str:
    return excerpt(repr(value))
