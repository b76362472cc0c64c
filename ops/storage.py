"""The storage tier: a package's per-expert .data files, read whole with pread."""

from __future__ import annotations

import os

import numpy as np

from .expert_graph import ExpertTensor, weights_from_buffer


class ExpertFiles:
    """Whole-file preads of expert .data files. After each read the file's pages are dropped from
    the OS page cache (posix_fadvise DONTNEED), so a later read really goes to the disk and the
    page cache cannot silently act as an unbudgeted RAM tier."""

    def __init__(self, manifest, verify=None, reader=None):
        """`reader.read(fd, size)` reads a whole file (spac.ops.direct_io.DirectReader: O_DIRECT);
        None: plain pread."""
        self.root = manifest.root
        self.experts = manifest.target.experts
        self.tensors = [ExpertTensor(t["name"], tuple(t["shape"]), t["offset"], t["nbytes"])
                        for t in self.experts.tensors]
        self.dtype = manifest.dtype
        self.verify = verify  # verify(name, data): checks a file's sha256 the first time it is read
        self.verified: set[str] = set()
        self.reader = reader

    def read(self, layer: int, expert: int) -> dict[str, np.ndarray]:
        name = self.experts.path(layer, expert, ".data")
        fd = os.open(self.root / name, os.O_RDONLY)
        try:
            size = self.experts.bytes_per_expert
            data = self.reader.read(fd, size) if self.reader else os.pread(fd, size, 0)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        if self.verify and name not in self.verified:
            self.verify(name, data)
            self.verified.add(name)
        return weights_from_buffer(data, self.tensors, self.dtype)
