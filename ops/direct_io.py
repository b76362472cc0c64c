"""Direct storage reads: O_DIRECT into page-aligned buffers, so that an expert's bytes go from
the disk into the buffer its arrays view, without a copy through the page cache.

On a virtual disk measured here, buffered whole-file reads ran at 0.26 GB/s and O_DIRECT ones at
0.96 GB/s; the page cache also costs memory a cap counts. O_DIRECT is switched on per open file
descriptor (fcntl F_SETFL), so the caller opens files as it always does. A file system that
refuses it (tmpfs, some network and FUSE mounts: EINVAL) makes the reader fall back to plain
pread for good, once, and say so in `direct`.

Each read lands in a fresh buffer whose pages the read itself faults in, and those faults cost
more than the transfer: 19 MiB O_DIRECT reads on that disk ran at 0.74 GB/s into fresh 4 KiB
pages of a shared mapping, 1.0 GB/s into a private one, 1.75 GB/s into transparent 2 MiB pages
(2.0-2.5 GB/s into one buffer reused, faulted once). So a buffer of 2 MiB or more starts on a
2 MiB boundary and asks for huge pages (madvise) for its whole 2 MiB pieces; its tail keeps
4 KiB pages, so it holds no more memory than its size rounded to 4 KiB. A kernel without
transparent huge pages (or set to never) gives small pages and the read works the same. Under a
45 % memory cap on the memory testbed (scripts/bench_memory.py's spac runs, 18.9 MB experts),
this took the storage from 0.96-1.13 to 1.71-1.86 GB/s while busy, and decoding 1.73-1.88x.
Keeping a released buffer for the next read (no faults at all) decoded no faster there: under a
memory limit that buffer is counted, and costs a cache slot.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os

ALIGNMENT = 4096  # O_DIRECT wants offsets, lengths and buffers aligned to the logical block
HUGE_PAGE = 2 << 20  # a transparent huge page on x86-64 (and arm64 with 4 KiB pages)
PRIVATE_ANONYMOUS = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)


def aligned_buffer(size: int) -> memoryview:
    """A private anonymous mapping: page-aligned, zero-filled, freed when its last view goes;
    from HUGE_PAGE on, on a huge page boundary with huge pages asked for (see above)."""
    length = max(ALIGNMENT, -(-size // ALIGNMENT) * ALIGNMENT)
    if length < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return memoryview(mmap.mmap(-1, length, flags=PRIVATE_ANONYMOUS))
    # Room to start on a boundary: the pages before it and after the buffer are never touched,
    # so they take address space, not memory.
    mapping = mmap.mmap(-1, length + HUGE_PAGE - ALIGNMENT, flags=PRIVATE_ANONYMOUS)
    start = -address(mapping) % HUGE_PAGE
    whole = length // HUGE_PAGE * HUGE_PAGE
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE, start, whole)
        if start + whole < len(mapping):  # where the kernel gives huge pages unasked (enabled=always),
            mapping.madvise(mmap.MADV_NOHUGEPAGE, start + whole)  # the rest must not get one
    except OSError:  # a kernel built without transparent huge pages
        pass
    return memoryview(mapping)[start:start + length]


def address(buffer) -> int:
    """Where a writable buffer's first byte lies in memory."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


class DirectReader:
    """read(fd, size) -> the file's first `size` bytes as a buffer (O_DIRECT where possible)."""

    def __init__(self, enabled: bool = True):
        self.direct = enabled and hasattr(os, "O_DIRECT")

    def read(self, fd: int, size: int):
        if self.direct:
            try:
                return self._read_direct(fd, size)
            except OSError as error:
                if error.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                self.direct = False  # this file system does not do O_DIRECT: never try again
        return os.pread(fd, size, 0)

    @staticmethod
    def _read_direct(fd: int, size: int) -> memoryview:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
        view = aligned_buffer(size)
        done = 0
        while done < size:  # the aligned length may pass the end of the file: a short last read
            count = os.preadv(fd, [view[done:]], done)
            if count == 0:
                raise OSError(errno.EIO, f"file ended after {done} of {size} bytes")
            done += count
        return view[:size]
