"""The storage tier: a package's per-expert .data files, read whole (pread, or O_DIRECT through
spac.ops.direct_io), and the checks that make every read's bytes the ones the manifest lists.

Integrity model of paged experts (the package may come from a stranger, and its files may change
while the runtime runs): a file's first read is checked against the manifest's sha256; the
verifier then remembers the file's identity (inode, size, mtime in ns) and a 64-bit xxh3 digest
of the verified bytes. Every later read checks the identity of the open file (fstat) and the
xxh3 of the bytes read: a file replaced or touched since is hashed with sha256 again (the same
bytes pass), a file whose bytes changed in place is refused. A refused file is never used. xxh3
is not a cryptographic hash: it catches corruption and edits behind the runtime's back, not a
forger who already writes the package's files while it runs (and could equally edit the graphs).
It replaced zlib's crc32, which hashed an 18.9 MB expert in 5.3 ms on one core here (xxh3: 1.1
ms), CPU time that a 2-core machine takes from the layer being computed.
scripts/bench_read_verify.py measures the cost of each check per read.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import numpy as np
import xxhash

from .expert_graph import ExpertTensor, weights_from_buffer

# O_NONBLOCK: opening a FIFO put in a file's place returns at once (and fstat then refuses it)
# instead of waiting for a writer forever; O_NOFOLLOW: a symbolic link put there is not followed.
OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)


class PackageFileError(Exception):
    """A package file is missing, malformed, corrupt or unreadable; the message is one line that
    names the file (and the field). The commands print it and exit 2."""


class ExpertFileError(PackageFileError):
    """An expert's weights file cannot be read, or is no longer the file that was verified."""


class ReadVerifier:
    """The integrity model above: sha256 on a file's first read (`verify_first(name, data)`
    raises when the bytes are not the manifest's), identity and xxh3 on every later read."""

    def __init__(self, verify_first):
        self.verify_first = verify_first
        self.verified: dict[str, tuple[tuple[int, int, int], int]] = {}  # name -> (identity, xxh3)
        self.lock = threading.Lock()  # reads run on several threads

    def check(self, name: str, path, info: os.stat_result, data: bytes) -> None:
        identity = (info.st_ino, info.st_size, info.st_mtime_ns)
        with self.lock:
            known = self.verified.get(name)
        if known is not None and known[0] == identity:
            if xxhash.xxh3_64_intdigest(data) != known[1]:
                raise ExpertFileError(f"expert file {path} changed after it was verified (same inode, size and "
                                      "mtime, other bytes); refusing it (restore the package or re-export it)")
            return
        self.verify_first(name, data)  # first read, or the file was replaced or touched since
        with self.lock:
            self.verified[name] = (identity, xxhash.xxh3_64_intdigest(data))


class ExpertFiles:
    """Whole-file preads of expert .data files. After each read the file's pages are dropped from
    the OS page cache (posix_fadvise DONTNEED), so a later read really goes to the disk and the
    page cache cannot silently act as an unbudgeted RAM tier."""

    def __init__(self, manifest, verify=None, reader=None):
        """`verify(name, data)` checks a file's bytes against the manifest (its sha256);
        `reader.read(fd, size)` reads a whole file (spac.ops.direct_io.DirectReader: O_DIRECT
        into an aligned buffer, which the verifier checks like any other); None: plain pread."""
        self.root = manifest.root
        self.experts = manifest.target.experts
        self.tensors = [ExpertTensor(t["name"], tuple(t["shape"]), t["offset"], t["nbytes"], t["dtype"])
                        for t in self.experts.tensors]
        self.verifier = ReadVerifier(verify) if verify else None
        self.reader = reader

    def path(self, layer: int, expert: int):
        return self.root / self.experts.path(layer, expert, ".data")

    def read(self, layer: int, expert: int, into=None) -> dict[str, np.ndarray]:
        """The expert's tensors, viewing the bytes read; `into`: a buffer an earlier read gave
        whose bytes nobody needs any more, for the reader to read into (DirectReader.read)."""
        name = self.experts.path(layer, expert, ".data")
        path = self.root / name
        try:
            fd = os.open(path, OPEN_FLAGS)
        except OSError as error:
            raise ExpertFileError(f"expert file {path} cannot be opened: {_reason(error)}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ExpertFileError(f"expert file {path} is no longer a regular file (a FIFO, device or folder "
                                      "took its place); refusing it")
            size = self.experts.bytes_per_expert
            data = self.reader.read(fd, size, into) if self.reader else os.pread(fd, size, 0)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as error:
            raise ExpertFileError(f"expert file {path} cannot be read: {_reason(error)}") from None
        finally:
            os.close(fd)
        if self.verifier:
            self.verifier.check(name, path, info, data)
        return weights_from_buffer(data, self.tensors)


def _reason(error: OSError) -> str:
    if error.errno == errno.ELOOP:  # what O_NOFOLLOW reports for a link
        return "it is a symbolic link; a package holds its files itself"
    return error.strerror or str(error)
