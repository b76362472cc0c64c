"""O_DIRECT reads (spac.ops.direct_io): whole files into aligned buffers, a clean fall back where
the file system refuses O_DIRECT, and a paged runtime that reads that way stays lossless."""

import ctypes
import errno
import fcntl
import os

import numpy as np
import pytest

from spac.ops import direct_io
from spac.ops.direct_io import ALIGNMENT, DirectReader, aligned_buffer
from spac.ops.host_cache import HostCache, PassPosition
from spac.ops.stats import PagingStats
from spac.runtime import Runtime, cli


def read_file(reader, path, size):
    fd = os.open(path, os.O_RDONLY)
    try:
        return reader.read(fd, size)
    finally:
        os.close(fd)


def test_reads_an_unaligned_file_whole_into_an_aligned_buffer(tmp_path):
    data = os.urandom(3 * ALIGNMENT + 123)  # the last block is short: a short read at the end
    (tmp_path / "e.data").write_bytes(data)
    reader = DirectReader()
    got = read_file(reader, tmp_path / "e.data", len(data))
    assert bytes(got) == data and reader.direct
    address = ctypes.addressof(ctypes.c_char.from_buffer(got.obj))
    assert address % ALIGNMENT == 0


def test_a_file_shorter_than_expected_is_an_error_not_zeros(tmp_path):
    (tmp_path / "short.data").write_bytes(b"x" * 100)
    with pytest.raises(OSError, match="ended after 100 of 5000 bytes"):
        read_file(DirectReader(), tmp_path / "short.data", 5000)


def test_falls_back_to_pread_for_good_where_o_direct_is_refused(tmp_path, monkeypatch):
    data = os.urandom(10_000)
    (tmp_path / "e.data").write_bytes(data)
    real = fcntl.fcntl
    refusals = []

    def refuse_direct(fd, command, arg=0):  # injected fault: a file system without O_DIRECT
        if command == fcntl.F_SETFL and arg & os.O_DIRECT:
            refusals.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, command, arg)

    monkeypatch.setattr(direct_io.fcntl, "fcntl", refuse_direct)
    reader = DirectReader()
    assert bytes(read_file(reader, tmp_path / "e.data", len(data))) == data
    assert bytes(read_file(reader, tmp_path / "e.data", len(data))) == data
    assert not reader.direct and len(refusals) == 1


def test_paged_runtime_with_direct_reads_is_lossless(exported):
    package = exported("qwen3_moe").output
    tokens = {}
    for direct in (False, True):
        with Runtime(package, draft_len=3, policy="lru", host_budget=0.25, direct_io=direct) as runtime:
            result = runtime.generate("def fibonacci(n):\n    ", max_new_tokens=16)
            tokens[direct] = result.token_ids
            assert result.stats.as_dict()["bytes_paged"] > 0
            assert runtime.experts.files.reader is None or runtime.experts.files.reader.direct
    assert tokens[True] == tokens[False]


@pytest.mark.parametrize("policy", ["lru", "spac"])
def test_reads_land_in_the_buffers_earlier_reads_left(exported, policy):
    """Once the cache is full a read lands in the buffer of the expert evicted for its room (lru
    keeps every miss), or of a miss computed and not kept (spac keeps few): the same tokens as
    reads into fresh buffers, and no more spare buffers held than the memory limit counts."""
    package = exported("qwen3_moe").output
    tokens = {}
    for direct in (True, False):
        with Runtime(package, draft_len=3, policy=policy, host_budget=0.25, direct_io=direct) as runtime:
            result = runtime.generate("def fibonacci(n):\n    ", max_new_tokens=16)
            tokens[direct] = result.token_ids
            paging, pager = result.stats.experts.paging, runtime.experts
            if direct:
                assert paging.reads_into_used_buffers > paging.storage_reads // 2, paging
                assert len(pager.spare_outside) <= pager.outside_buffers
            else:  # pread gives bytes, which no read can land in
                assert paging.storage_reads > 0 and paging.reads_into_used_buffers == 0
    assert tokens[True] == tokens[False]


def cached_weights(size: int = 8000) -> dict:
    return {"w": np.frombuffer(aligned_buffer(size)[:size], np.float32).reshape(10, -1)}


def test_a_victim_a_draft_looked_at_in_this_pass_keeps_its_bytes():
    """A draft computes from what it looked at (peek) during its pass: that victim's buffer is
    not read into until the next pass; one nobody looked at is."""
    position = PassPosition()
    cache = HostCache("lru", 1, position, PagingStats())
    cache.admit((0, 0), cached_weights(), 0.0)
    assert cache.peek((0, 0)) is not None  # a draft computes from these
    assert cache.make_room((1, 0), 0.0)
    assert cache.spare_buffer((1, 0)) is None

    position.pass_id += 1  # the draft that looked is done
    weights = cached_weights()
    cache.admit((1, 0), weights, 0.0)
    cache.peek((1, 0))
    position.pass_id += 1
    assert cache.make_room((2, 0), 0.0)
    spare = cache.spare_buffer((2, 0))
    assert spare is not None and direct_io.address(spare) == weights["w"].ctypes.data
    assert cache.spare_buffer((2, 0)) is None, "a victim's buffer goes to one read only"


def test_only_a_writable_buffer_every_array_views_is_reused():
    one, other = aligned_buffer(8192), aligned_buffer(8192)
    assert direct_io.read_buffer([np.frombuffer(one, np.uint8)]) is not None
    assert direct_io.read_buffer([np.frombuffer(one, np.uint8), np.frombuffer(other, np.uint8)]) is None
    assert direct_io.read_buffer([np.frombuffer(bytes(8192), np.uint8)]) is None  # pread's bytes
    assert direct_io.aligned_window(one[:5000], 8192) is not None
    assert direct_io.aligned_window(one[:5000], 8192 + ALIGNMENT) is None  # past its mapping
    assert direct_io.aligned_window(one[100:], 4096) is None  # not on a block boundary


HUGE_PAGE = 2 << 20  # a transparent huge page on x86-64 and on arm64 with 4 KiB pages


def transparent_huge_pages() -> bool:
    try:
        setting = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return False
    return "[never]" not in setting


def huge_page_kib(address: int) -> int:
    """AnonHugePages of the mapping that holds `address`, from /proc/self/smaps."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(part, 16) for part in head.split("-"))
            inside = start <= address < end
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    return 0


@pytest.mark.skipif(not transparent_huge_pages(), reason="this kernel gives no transparent huge pages")
def test_a_large_read_lands_in_huge_pages_and_the_tail_in_small_ones(tmp_path):
    # A fresh buffer's pages are faulted in by the read itself: 4 KiB pages of a shared mapping
    # made a 19 MiB O_DIRECT read 2.4x slower here than 2 MiB ones.
    data = os.urandom(5 * HUGE_PAGE + 3 * ALIGNMENT + 7)
    (tmp_path / "e.data").write_bytes(data)
    got = read_file(DirectReader(), tmp_path / "e.data", len(data))
    address = ctypes.addressof(ctypes.c_char.from_buffer(got))
    assert bytes(got) == data
    assert address % HUGE_PAGE == 0
    # (the kernel may fall back to small pages for a piece when it finds no free 2 MiB of memory)
    # whole 2 MiB pieces only: the short tail must not cost a huge page of memory
    assert 0 < huge_page_kib(address) <= 5 * HUGE_PAGE // 1024


def test_a_small_read_takes_no_huge_page(tmp_path):
    data = os.urandom(100 * ALIGNMENT)
    (tmp_path / "e.data").write_bytes(data)
    got = read_file(DirectReader(), tmp_path / "e.data", len(data))
    assert bytes(got) == data and huge_page_kib(ctypes.addressof(ctypes.c_char.from_buffer(got))) == 0


def test_paged_experts_are_read_with_o_direct_by_default(exported):
    # Experts are dropped from the page cache after each read anyway, so buffered reads only add
    # a copy: the testbed's 18.9 MB expert files read at 1.0 GB/s buffered, 1.5 GB/s with O_DIRECT.
    package = exported("qwen3_moe").output
    with Runtime(package, host_budget=0.25) as runtime:
        runtime.generate("def f(x):", max_new_tokens=4)
        reader = runtime.experts.files.reader
        assert reader is not None and reader.direct == takes_o_direct(package)
    command = ["--package", str(package), "--prompt", "x"]
    assert cli.parse_args(command).direct_io and not cli.parse_args([*command, "--no-direct-io"]).direct_io


def takes_o_direct(folder) -> bool:
    """Whether the file system under `folder` takes O_DIRECT reads (tmpfs does not)."""
    (folder.parent / "probe.data").write_bytes(b"x" * ALIGNMENT)
    reader = DirectReader()
    read_file(reader, folder.parent / "probe.data", ALIGNMENT)
    return reader.direct


def test_buffers_of_whole_huge_pages_at_any_address():
    # A size of whole huge pages in a mapping that the kernel placed one small page past a
    # boundary leaves nothing after the buffer (a madvise there was refused: "start out of
    # bounds"). Mappings made one after another lie side by side, each 4 KiB further from a
    # boundary than the last, so 512 of them meet every placement; untouched, they take no memory.
    buffers = [direct_io.aligned_buffer(9 * HUGE_PAGE) for _ in range(520)]
    assert all(len(buffer) == 9 * HUGE_PAGE and direct_io.address(buffer) % HUGE_PAGE == 0 for buffer in buffers)
