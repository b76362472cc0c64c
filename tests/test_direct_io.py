"""O_DIRECT reads (spac.ops.direct_io): whole files into aligned buffers, a clean fall back where
the file system refuses O_DIRECT, and a paged runtime that reads that way stays lossless."""

import ctypes
import errno
import fcntl
import os

import pytest

from spac.ops import direct_io
from spac.ops.direct_io import ALIGNMENT, DirectReader
from spac.runtime import Runtime


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
