"""A real memory cap for one command: a child group of this process's cgroup-v1 memory group,
with memory.limit_in_bytes set, the command's process put into it, removed afterwards. Page
cache counts against the cap, as it does on a device. Root only; `available()` says whether
this machine can do it (and why not).

    with MemoryCap(700_000_000) as cap:
        result = cap.run(["spac-run", ...])
        cap.oom_kills, cap.peak_bytes
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

V1_ROOT = Path("/sys/fs/cgroup/memory")


def own_group() -> Path | None:
    """This process's cgroup-v1 memory group directory, or None."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return V1_ROOT / path.lstrip("/")
    return None


def available() -> str | None:
    """None when caps can be made here, else why not."""
    group = own_group()
    if group is None or not (group / "memory.limit_in_bytes").exists():
        return "no cgroup-v1 memory controller for this process"
    if os.geteuid() != 0 or not os.access(group, os.W_OK):
        return f"cannot create memory groups under {group} (needs root)"
    return None


def drop_page_cache() -> None:
    """Write back and drop the page cache, so that every run starts from the disk."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def run_worker(script: Path, config: dict, cap: int) -> dict:
    """`python script --worker CONFIG` (a benchmark's own run) in a fresh process inside a cap of
    `cap` bytes, the page cache dropped first: the JSON its last line printed, with the group's
    oom_kills and peak_bytes; or {"failed": why, "oom_kills": n} when it did not exit 0."""
    drop_page_cache()
    with MemoryCap(cap) as group:
        done = group.run([sys.executable, str(script), "--worker", json.dumps(config)], capture_output=True, text=True)
        oom, peak = group.oom_kills, group.peak_bytes
    if done.returncode != 0:
        last_line = (done.stderr.strip().splitlines() or [""])[-1][-400:]  # an error's own line, not its traceback
        return {"failed": f"exit {done.returncode}, oom kills {oom}: {last_line}", "oom_kills": oom}
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "oom_kills": oom, "peak_bytes": peak}


class MemoryCap:
    def __init__(self, limit_bytes: int):
        self.limit = int(limit_bytes)
        self.group = own_group() / f"spac-cap-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> "MemoryCap":
        self.group.mkdir()
        (self.group / "memory.limit_in_bytes").write_text(str(self.limit))
        return self

    def __exit__(self, *exc) -> None:
        for _ in range(50):  # the group can only go once its last process has been reaped
            try:
                self.group.rmdir()
                return
            except OSError:
                time.sleep(0.1)

    def run(self, command: list[str], **options) -> subprocess.CompletedProcess:
        """Run `command` inside the cap (the shell joins the group, then execs it)."""
        procs = self.group / "cgroup.procs"
        wrapped = ["sh", "-c", f'echo $$ > "{procs}" && exec "$@"', "sh", *command]
        return subprocess.run(wrapped, **options)

    def _read(self, name: str) -> str:
        return (self.group / name).read_text()

    @property
    def oom_kills(self) -> int:
        for line in self._read("memory.oom_control").splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    @property
    def peak_bytes(self) -> int:
        return int(self._read("memory.max_usage_in_bytes"))
