"""The measuring loop of the paging benchmarks: generate from every prompt in one Runtime and
sum the generations' typed stats."""

from __future__ import annotations

import time
from functools import reduce
from operator import add

# The contenders of the paging benchmarks: (name, speculative, policy, estimator).
CONFIGS = (
    ("lru", False, "lru", None),
    ("static+SD", True, "static", None),
    ("lru+SD", True, "lru", None),
    ("spac+SD (spac-counter)", True, "spac", "spac-counter"),
    ("spac+SD (decayed)", True, "spac", "decayed"),
)
SPAC = ("spac+SD (spac-counter)", "spac+SD (decayed)")
# How the benchmarks keep the OS page cache from acting as an unbudgeted RAM tier.
PAGE_CACHE = ("O_DIRECT, the runtime's default (where the file system refuses it: os.pread + "
              "posix_fadvise(POSIX_FADV_DONTNEED) after each read), os.sync() before the runs")


def generate_all(runtime, texts: list[str], speculative: bool, max_new_tokens: int) -> dict:
    """Generate from every prompt; the totals over all of them, flat (the benchmarks' JSON)."""
    started = time.perf_counter()
    results = [runtime.generate(text, max_new_tokens=max_new_tokens, speculative=speculative) for text in texts]
    seconds = time.perf_counter() - started
    stats = reduce(add, (r.stats for r in results))
    paging = stats.experts.paging
    hits, misses = (paging.host_hits, paging.host_misses) if paging else (0, 0)
    return {
        "tokens_per_second": stats.tokens_per_second,
        "end_to_end_tokens_per_second": stats.new_tokens / seconds,
        "hit_rate": hits / (hits + misses) if hits + misses else 1.0,
        "acceptance_rate": stats.decode.acceptance_rate if stats.decode.proposed else None,
        "new_tokens": stats.new_tokens, "decode_tokens": stats.decoded_tokens,
        "decode_seconds": stats.decode_seconds, "seconds": seconds, "hits": hits, "misses": misses,
        "bytes_read": paging.storage_bytes_read if paging else 0,
        "reads": paging.storage_reads if paging else 0,
        "reads_into_used_buffers": paging.reads_into_used_buffers if paging else 0,
        "stall_seconds": paging.stall_seconds if paging else 0.0,
        "read_seconds": paging.read_seconds if paging else 0.0,
        "busy_seconds": paging.busy_seconds if paging else 0.0,
        "issued": paging.prefetch_issued if paging else 0, "used": paging.prefetch_used if paging else 0,
        "dropped": paging.prefetch_dropped if paging else 0,
        "proposed": stats.decode.proposed, "accepted": stats.decode.accepted,
        "token_ids": [r.token_ids for r in results],
    }
