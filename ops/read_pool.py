"""Storage reads on daemon threads, each waited for at most READ_TIMEOUT_S.

A read can hang in the kernel (a dead disk, a network or FUSE file system); a thread stuck there
cannot be stopped. So the readers are daemon threads (a stuck one never keeps the process alive
at exit), close() does not wait for them, and the caller's wait has a timeout that turns a hung
read into one clear error. concurrent.futures' ThreadPoolExecutor cannot do this: its workers
are joined at interpreter exit.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent import futures
from concurrent.futures import Future

from .storage import ExpertFileError

READ_TIMEOUT_S = 120  # a read of one expert takes milliseconds; two minutes means it hangs
# A Ctrl-C that the kernel hands to another thread does not wake the main thread's wait; the
# main thread sees it when it next wakes, so its waits wake this often.
WAKE_S = 0.1


class ReadPool:
    def __init__(self, threads: int, name: str):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(threads)]
        for thread in self.threads:
            thread.start()

    def submit(self, read, *args) -> Future:
        future = Future()
        self.jobs.put((future, read, args))
        return future

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            self._run(*job)
            # An idle reader must not keep its last read's future, hence the expert's buffer,
            # alive: four idle readers held four buffers the memory limit does not count.
            job = None

    @staticmethod
    def _run(future: Future, read, args) -> None:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(read(*args))
            except BaseException as error:  # the caller's result() raises it
                future.set_exception(error)

    def close(self) -> None:
        """Ask every reader to stop once its current read ends; never waits for a stuck one."""
        for _ in self.threads:
            self.jobs.put(None)


def wait(done, timeout: float) -> bool:
    """Wait until `done(seconds)` (a wait of at most that long) says True, for at most
    `timeout` seconds; False when it never did."""
    deadline = time.monotonic() + timeout
    while not done(max(0.0, min(WAKE_S, deadline - time.monotonic()))):
        if time.monotonic() >= deadline:
            return False
    return True


def result(future: Future, what) -> object:
    """The read's result, or an ExpertFileError naming `what` once it took READ_TIMEOUT_S."""
    if not wait(lambda seconds: bool(futures.wait([future], timeout=seconds).done), READ_TIMEOUT_S):
        raise ExpertFileError(f"reading {what} took more than {READ_TIMEOUT_S} s (a hung disk or network file "
                              "system?); giving up")
    return future.result()
