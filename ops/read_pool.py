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
from concurrent.futures import Future

from .storage import ExpertFileError

READ_TIMEOUT_S = 120  # a read of one expert takes milliseconds; two minutes means it hangs


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
            future, read, args = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(read(*args))
                except BaseException as error:  # the caller's result() raises it
                    future.set_exception(error)

    def close(self) -> None:
        """Ask every reader to stop once its current read ends; never waits for a stuck one."""
        for _ in self.threads:
            self.jobs.put(None)


def result(future: Future, what) -> object:
    """The read's result, or an ExpertFileError naming `what` once it took READ_TIMEOUT_S."""
    try:
        return future.result(timeout=READ_TIMEOUT_S)
    except TimeoutError:
        raise ExpertFileError(f"reading {what} took more than {READ_TIMEOUT_S} s (a hung disk or network file "
                              "system?); giving up") from None
