#!/usr/bin/env python3
"""What the integrity check of paged experts costs per read, measured in one run, interleaved:

  read          open + fstat + pread + posix_fadvise(DONTNEED) of one expert file, no check
  read+verify   the same through spac.ops.storage.ReadVerifier after the file's first read:
                the fstat identity and an xxh3 of the bytes (the runtime's per-read check)
  read+crc32    the same with zlib's crc32 instead (the per-read check before xxh3)
  read+sha256   the same with a sha256 of every read instead
  read+blake2b  the same with blake2b

    python scripts/bench_read_verify.py [--mib 6] [--reads 50] [--rounds 7] [--out results/bench_read_verify.json]

The file is a temporary one of --mib MiB (6 MiB: a Qwen3-30B-A3B expert in bf16 is ~4.5 MiB, in
fp32 ~9 MiB). Prints milliseconds per read (median over rounds) and the ratio to `read`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import stat
import tempfile
import time
import zlib
from pathlib import Path

from spac.ops.storage import OPEN_FLAGS, ReadVerifier


def read_file(path: Path, size: int) -> tuple[os.stat_result, bytes]:
    """ExpertFiles.read's system calls, without the weights' parsing."""
    fd = os.open(path, OPEN_FLAGS)
    try:
        info = os.fstat(fd)
        assert stat.S_ISREG(info.st_mode)
        data = os.pread(fd, size, 0)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return info, data


def contenders(path: Path, size: int) -> dict:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()

    def verify_first(name, data):
        assert hashlib.sha256(data).hexdigest() == digest

    verifier = ReadVerifier(verify_first)
    verifier.check("expert", path, *read_file(path, size))  # the first read: sha256, remembered

    return {
        "read": lambda: read_file(path, size),
        "read+verify": lambda: verifier.check("expert", path, *read_file(path, size)),
        "read+crc32": lambda: zlib.crc32(read_file(path, size)[1]),  # the check xxh3 replaced
        "read+sha256": lambda: hashlib.sha256(read_file(path, size)[1]).digest(),
        "read+blake2b": lambda: hashlib.blake2b(read_file(path, size)[1]).digest(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=float, default=6.0, help="expert file size in MiB (default: 6)")
    parser.add_argument("--reads", type=int, default=50, help="reads per contender per round (default: 50)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default: 7)")
    parser.add_argument("--out", type=Path, default=Path("results/bench_read_verify.json"))
    args = parser.parse_args()
    size = int(args.mib * (1 << 20))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "expert.data"
        path.write_bytes(os.urandom(size))
        runs = contenders(path, size)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                started = time.perf_counter()
                for _ in range(args.reads):
                    run()
                times[name].append((time.perf_counter() - started) / args.reads * 1e3)
    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians["read"]
    for name, ms in medians.items():
        print(f"{name:13s} {ms:7.3f} ms/read  x{ms / base:.2f}  (+{ms - base:.3f} ms)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"mib": args.mib, "reads": args.reads, "rounds": args.rounds,
                                    "ms_per_read": medians, "ratio_to_read": {n: m / base for n, m in medians.items()},
                                    "samples_ms": times}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
