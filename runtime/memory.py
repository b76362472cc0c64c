"""A memory limit for the whole runtime: how many bytes it may hold, and how much of that the
host expert cache may have once everything else is counted.

`--memory-limit auto` reads the limit of the memory cgroup this process is in (cgroup v1:
memory.limit_in_bytes of the group /proc/self/cgroup names, the smallest along its ancestors;
cgroup v2: memory.max likewise), else /proc/meminfo's MemAvailable. The runtime loads its trunk
and draft sessions first, measures its resident set, and gives the host cache what remains after
the KV caches at full context, the read buffers in flight and a margin for ONNX Runtime's arenas
and activations. Page cache also counts against a cgroup, but it is reclaimable (and the pager
reads around it), so it cannot get the process killed; anonymous memory can, and that is what
is budgeted. Other processes of the same group are not counted: give the runtime its own group.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from pathlib import Path

UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a huge page-rounded number
MARGIN_BYTES = 48 << 20  # ORT arenas, activations, the Python heap's growth while generating
MARGIN_FRACTION = 0.05


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 1 << 20


def return_freed_buffers_to_the_kernel() -> None:
    """Make glibc map every block of 1 MB or more on its own, so that freeing it shrinks the
    resident set. By default glibc raises that threshold to the largest block freed (up to 32 MB);
    expert-sized buffers then come from heap arenas and stay resident after they are freed (with
    8 MB int4 experts at a 322 MB limit: a 323 MB peak against 231 MB with the threshold fixed,
    measured). Without glibc (mallopt missing) nothing changes."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


class MemoryLimitError(ValueError):
    """A limit that cannot be met: the trunk alone does not fit it."""


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _smallest_limit(group_dir: Path, stop: Path, file_name: str) -> int | None:
    """The smallest limit in `file_name` from `group_dir` up to `stop` (a child cannot use more
    than its ancestors allow)."""
    limits = []
    directory = group_dir
    while True:
        text = _read(directory / file_name)
        if text and text != "max" and text.isdigit() and int(text) < UNLIMITED:
            limits.append(int(text))
        if directory == stop or stop not in directory.parents:
            break
        directory = directory.parent
    return min(limits) if limits else None


def cgroup_limit(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The memory limit of this process's cgroup (v1 memory controller or v2), None if unlimited."""
    text = _read(proc_cgroup) or ""
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        relative = path.lstrip("/")
        if "memory" in controllers.split(","):  # v1
            base = root / "memory"
            limit = _smallest_limit(base / relative, base, "memory.limit_in_bytes")
            if limit is not None:
                return limit
        elif hierarchy == "0" and controllers == "":  # v2 unified
            limit = _smallest_limit(root / relative, root, "memory.max")
            if limit is not None:
                return limit
    return None


def available_memory(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    for line in (_read(meminfo) or "").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def resolve_limit(value) -> int:
    """`value`: bytes (int) or "auto"."""
    if value == "auto":
        limit = cgroup_limit() or available_memory()
        if limit is None:
            raise MemoryLimitError("--memory-limit auto: this system reports neither a cgroup memory limit nor "
                                   "MemAvailable; give the limit in bytes")
        return limit
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise MemoryLimitError(f"memory limit must be a positive number of bytes or 'auto', got {value!r}")
    return value


def resident_bytes() -> int:
    """This process's resident set (anonymous and file pages it maps)."""
    for line in (_read(Path("/proc/self/status")) or "").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    import resource  # not Linux: the peak is the best there is

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def kv_cache_bytes(section, context: int, itemsize: int) -> int:
    """A model's KV cache at `context` positions, twice: extending it copies the old arrays (each
    step, or, appended in place, when a buffer doubles: spac.runtime.kv_cache)."""
    per_position = sum(math.prod(d for axis, d in enumerate(shape) if axis != 2)
                       for layer in section.layers for shape in layer.kv_shapes)
    return 2 * per_position * context * itemsize


@dataclass(frozen=True)
class MemoryPlan:
    limit: int
    resident: int  # measured after the trunk and draft were loaded (and what is about to load)
    kv_cache: int
    read_buffers: int
    margin: int
    slot_bytes: int  # what one cached expert holds (a prepared one: its session)

    @property
    def host_budget(self) -> int:
        return self.limit - self.resident - self.kv_cache - self.read_buffers - self.margin

    @property
    def cache_slots(self) -> int:
        return self.host_budget // self.slot_bytes

    def as_dict(self) -> dict:
        return {"limit": self.limit, "resident": self.resident, "kv_cache": self.kv_cache,
                "read_buffers": self.read_buffers, "margin": self.margin, "host_budget": self.host_budget,
                "slot_bytes": self.slot_bytes, "cache_slots": self.cache_slots}


def plan_memory(limit: int, kv_cache: int, read_buffers: int, slot_bytes: int, loading: int = 0) -> MemoryPlan:
    """The host cache's share of `limit`, measured now, in slots of `slot_bytes` (one cached
    expert as it is held); refuses a limit that leaves less than one slot (the pager then could
    not hold even the expert it computes). `loading`: bytes about to be loaded (the draft copies
    of the experts), counted as resident, so a limit they would not fit is refused before they load."""
    resident = resident_bytes()
    plan = MemoryPlan(limit, resident + loading, kv_cache, read_buffers,
                      MARGIN_BYTES + int(MARGIN_FRACTION * limit), slot_bytes)
    if plan.cache_slots < 1:
        copies = f" and the draft copies of the experts {loading / 1e6:.0f} MB" if loading else ""
        raise MemoryLimitError(
            f"memory limit {limit / 1e6:.0f} MB is too small: the loaded trunk and draft take {resident / 1e6:.0f} MB"
            f"{copies}, KV caches {kv_cache / 1e6:.0f} MB, read buffers {read_buffers / 1e6:.0f} MB and the margin "
            f"{plan.margin / 1e6:.0f} MB, leaving less than one {slot_bytes / 1e6:.1f} MB expert slot; give at least "
            f"{(limit - plan.host_budget + slot_bytes) / 1e6:.0f} MB")
    return plan

