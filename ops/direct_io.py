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
Keeping one released buffer beside the cache for the next read decoded no faster there: under a
memory limit that buffer is counted, and costs a cache slot. A buffer the memory limit counts
already costs nothing: the one of the expert evicted to make the read's room
(spac.ops.host_cache.HostCache.spare_buffer), or of a miss computed and not kept
(spac.ops.pager.PagedExperts.spare_outside). The reader reads into such a buffer (`into`) where
the caller has one: the same cap, interleaved A/B of 3 runs each, spac 25.4 against 23.2 tok/s,
lru 18.6 against 16.5, spac+SD 19.5 against 16.7, the storage 1.7-1.9 GB/s while busy against
1.3-1.7.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os

import numpy as np

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


def aligned_window(buffer: memoryview, length: int) -> memoryview | None:
    """`length` bytes from where `buffer` (a view of an aligned_buffer) starts, inside its
    mapping: a read returns its file's bytes, the aligned tail past them is the mapping's too.
    None where the mapping is too short or the start is not aligned."""
    mapping = buffer.obj
    if not isinstance(mapping, mmap.mmap) or buffer.readonly:
        return None
    start = address(buffer) - address(mapping)
    if start % ALIGNMENT or start + length > len(mapping):
        return None
    return memoryview(mapping)[start:start + length]


def read_buffer(arrays) -> memoryview | None:
    """The writable buffer that every one of `arrays` views from its start (numpy gives each
    array from np.frombuffer a memoryview of its own over the whole buffer), or None."""
    views = []
    for array in arrays:
        while isinstance(array, np.ndarray):  # a reshape's base is the array it reshaped
            array = array.base
        if not isinstance(array, memoryview) or array.readonly:
            return None
        views.append(array)
    if not views or any(view.obj is not views[0].obj or address(view) != address(views[0]) for view in views):
        return None
    return views[0]


def address(buffer) -> int:
    """Where a writable buffer's first byte lies in memory."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


class DirectReader:
    """read(fd, size) -> the file's first `size` bytes as a buffer (O_DIRECT where possible)."""

    def __init__(self, enabled: bool = True):
        self.direct = enabled and hasattr(os, "O_DIRECT")

    def read(self, fd: int, size: int, into: memoryview | None = None):
        """`into`: a buffer an earlier read returned, whose bytes nobody needs any more, to read
        into instead of a fresh one (where its mapping has room for the aligned length)."""
        if self.direct:
            try:
                return self._read_direct(fd, size, into)
            except OSError as error:
                if error.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                self.direct = False  # this file system does not do O_DIRECT: never try again
        return os.pread(fd, size, 0)

    @staticmethod
    def _read_direct(fd: int, size: int, into: memoryview | None) -> memoryview:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
        length = -(-size // ALIGNMENT) * ALIGNMENT
        view = (into is not None and aligned_window(into, length)) or aligned_buffer(size)
        done = 0
        while done < size:  # the aligned length may pass the end of the file: a short last read
            count = os.preadv(fd, [view[done:]], done)
            if count == 0:
                raise OSError(errno.EIO, f"file ended after {done} of {size} bytes")
            done += count
        return view[:size]
