"""What the expert stack counts: calls per provider and the paging between tiers. Counts and
seconds add, so two generations' stats sum with `+`."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields


def add_fields(a, b):
    """A dataclass whose every field is the sum of `a`'s and `b`'s (counts and seconds add)."""
    return type(a)(**{f.name: getattr(a, f.name) + getattr(b, f.name) for f in fields(a)})


@dataclass
class PagingStats:
    """What moving experts between the tiers cost in one generation."""

    host_hits: int = 0
    host_misses: int = 0
    storage_reads: int = 0
    storage_bytes_read: int = 0
    reads_into_used_buffers: int = 0  # reads that landed in an earlier read's buffer (no page to fault in)
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_dropped: int = 0
    stall_seconds: float = 0.0
    read_seconds: float = 0.0  # storage reads' own durations, summed over the threads that read
    busy_seconds: float = 0.0  # wall time with at least one storage read in flight
    device_hits: int = 0
    device_fetches: int = 0
    device_bytes_copied: int = 0

    __add__ = add_fields

    def as_dict(self) -> dict:
        lookups = self.host_hits + self.host_misses
        return {
            "tiers": {"device": {"hits": self.device_hits, "fetches": self.device_fetches,
                                 "bytes_copied": self.device_bytes_copied},
                      "host": {"hits": self.host_hits, "misses": self.host_misses},
                      "storage": {"reads": self.storage_reads, "bytes_read": self.storage_bytes_read,
                                  "reads_into_used_buffers": self.reads_into_used_buffers,
                                  "read_seconds": self.read_seconds, "busy_seconds": self.busy_seconds}},
            "expert_hit_rate": self.host_hits / lookups if lookups else 1.0,
            "bytes_paged": self.storage_bytes_read,
            "prefetch": {"issued": self.prefetch_issued, "used": self.prefetch_used,
                         "dropped": self.prefetch_dropped},
            "stall_seconds": self.stall_seconds,
        }


@dataclass
class DraftExpertStats:
    """What a self-drafting pass found: routed (token, expert) slots and those whose expert was
    not held, so the draft substituted or dropped it."""

    routed: int = 0
    substituted: int = 0

    __add__ = add_fields

    @property
    def substitution_rate(self) -> float:
        return self.substituted / self.routed if self.routed else 0.0


# Every expert resident: no miss, no paging.
RESIDENT_PAGING = {"expert_hit_rate": 1.0, "bytes_paged": 0, "stall_seconds": 0.0}


@dataclass
class ExpertStats:
    calls: Counter = field(default_factory=Counter)  # per provider ("cpu", "cuda")
    tokens: Counter = field(default_factory=Counter)
    paging: PagingStats | None = None  # None: every expert resident, nothing paged

    def __add__(self, other: "ExpertStats") -> "ExpertStats":
        if self.paging is None or other.paging is None:
            paging = self.paging or other.paging
        else:
            paging = self.paging + other.paging
        return ExpertStats(self.calls + other.calls, self.tokens + other.tokens, paging)

    def paging_dict(self) -> dict:
        return RESIDENT_PAGING if self.paging is None else self.paging.as_dict()
