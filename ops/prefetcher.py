"""The prefetcher: a queue of experts wanted in the host cache for the next pass and one worker
thread that reads them from storage while the draft runs.

A queued request whose layer has already started in the current pass is stale and dropped. An
exception in the worker is kept and raised to the caller at its next layer (`raise_error`), once;
the worker is then restarted; a bad package file (PackageFileError) is raised as it is, any other
error as a RuntimeError. stop() waits for the worker a moment only: one stuck in a read (a hung
disk) is a daemon thread, left behind. Python threads suffice for overlap: os.pread, numpy and ONNX
Runtime release the GIL.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

from .stats import PagingStats
from .host_cache import HostCache, PassPosition
from .storage import PackageFileError


@dataclass(order=True)
class PrefetchRequest:
    # (layer, -utility): the next pass needs its first layer first, so the queue serves layers
    # in order and, within a layer, the highest utility first.
    order: tuple
    utility: float = field(compare=False)
    pass_id: int = field(compare=False)
    layer: int = field(compare=False)
    expert: int = field(compare=False)


STOP_WAIT_S = 1.0  # a read takes milliseconds; a worker still reading after this is stuck
STOP = PrefetchRequest((float("-inf"),), 0.0, -1, -1, -1)  # served before any real request


class Prefetcher:
    def __init__(self, cache: HostCache, read, position: PassPosition, paging: PagingStats):
        """`read(layer, expert)` gets weights from storage; they are offered to the cache at the
        request's utility."""
        self.cache, self.read, self.position, self.paging = cache, read, position, paging
        self.requests: queue.PriorityQueue = queue.PriorityQueue()
        self.error: BaseException | None = None
        self.closed = False
        self.worker: threading.Thread | None = None
        self.start()

    def start(self) -> None:
        self.worker = threading.Thread(target=self._loop, name="spac-prefetch", daemon=True)
        self.worker.start()

    def replace(self, wanted: list[tuple[tuple[int, int], float]]) -> None:
        """Queue `wanted` ((layer, expert), utility) for the pass about to start; requests still
        queued from the last round are stale and dropped."""
        while not self.requests.empty():
            try:
                self.requests.get_nowait()
                with self.cache.lock:
                    self.paging.prefetch_dropped += 1
            except queue.Empty:
                break
        self.add(wanted)

    def add(self, wanted: list[tuple[tuple[int, int], float]]) -> None:
        """Queue `wanted` ((layer, expert), utility) for the pass about to start or under way,
        beside what is queued (a draft's lookahead, the pager's guesses of later layers)."""
        for (layer, expert), utility in wanted:
            self.requests.put(PrefetchRequest((layer, -utility), utility, self.position.pass_id, layer, expert))
            self.paging.prefetch_issued += 1

    def _stale(self, request: PrefetchRequest) -> bool:
        return (self.position.pass_id, self.position.layer) >= (request.pass_id, request.layer)

    def _loop(self) -> None:
        try:
            while True:
                request = self.requests.get()
                if request is STOP or self.closed:
                    return
                key = (request.layer, request.expert)
                if self._stale(request):
                    with self.cache.lock:  # the main thread counts too: keep += whole
                        self.paging.prefetch_dropped += 1
                    continue
                if not self.cache.reserve(key, request.utility):
                    continue
                try:
                    if not self.cache.admit(key, self.read(*key), request.utility, prefetched=True):
                        with self.cache.lock:
                            self.paging.prefetch_dropped += 1
                finally:
                    self.cache.release(key)
        except BaseException as error:  # surfaced to the caller at its next layer
            self.error = error

    def raise_error(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            self.start()  # the caller hears of the failure once; later rounds prefetch again
            if isinstance(error, PackageFileError):  # already one line naming the file
                raise error
            raise RuntimeError(f"the expert prefetch worker failed: {error}") from error

    def stop(self) -> None:
        self.closed = True
        self.requests.put(STOP)
        self.worker.join(timeout=STOP_WAIT_S)
