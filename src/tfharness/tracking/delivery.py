"""Delivering a run's logging calls in order on a background thread, through server outages.

The training loop only queues a :class:`~tfharness.tracking.jobs.Job`. When the tracking server
stops answering, the thread keeps the call that failed and retries it with backoff, in order,
while training goes on; :meth:`DeliveryWorker.drain` waits for a server that is down up to a
timeout and hands back what it could not deliver (for the spool). A call that fails for another
reason is recorded and the thread goes on with the next one.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

from tfharness.tracking.jobs import Job
from tfharness.tracking.unreachable import is_unreachable

log = logging.getLogger("tfharness")

# The retry delay grows from this to MAX_RETRY_DELAY_S while the server stays down.
FIRST_RETRY_DELAY_S = 0.25
MAX_RETRY_DELAY_S = 2.0


@dataclass
class DeliveryRecord:
    """What became of a run's logging calls: what the end of the run reports."""

    errors: List[str] = field(default_factory=list)
    undelivered: List[Job] = field(default_factory=list)
    outages: int = 0  # outages the run saw and got through
    delayed: int = 0  # calls delivered late or not at all because of an outage

    def failed(self, description: str, error: BaseException) -> None:
        self.errors.append(f"{description}: {type(error).__name__}: {error}")

    def outage_tag(self) -> Optional[str]:
        """The ``tfharness.tracking_outage`` tag, when the run saw an outage."""
        if not (self.outages or self.undelivered):
            return None
        spooled = (f", {len(self.undelivered)} spooled for `python -m tfharness.sync`"
                   if self.undelivered else ", all delivered late, none lost")
        return (f"store unreachable {self.outages + bool(self.undelivered)} time(s); "
                f"{self.delayed} logging call(s) delayed" + spooled)


class DeliveryWorker:
    """Delivers jobs in the order they were submitted, retrying while the store is unreachable.

    Args:
        uri: the store, for the log lines.
        deliver: delivers one job (raises what the store raised).
        record: where errors, outages and undelivered calls go.
    """

    def __init__(self, uri: str, deliver: Callable[[Job], None], record: DeliveryRecord):
        self.uri = uri
        self._deliver = deliver
        self.record = record
        self._queue: "queue.Queue[Optional[Job]]" = queue.Queue()
        self._abandon = threading.Event()
        self._outage_since: Optional[float] = None
        self._thread = threading.Thread(target=self._work, name="tfharness-tracking",
                                        daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            self._deliver_with_retries(job)

    def _deliver_with_retries(self, job: Job) -> None:
        delayed = False
        while not self._abandon.is_set():
            try:
                self._deliver(job)
            except Exception as exc:  # reported when the run ends, never raised into training
                if not is_unreachable(exc):
                    self.record.failed(job.description, exc)
                    return
                if not delayed:
                    delayed = True
                    self.record.delayed += 1
                self._wait_for_store()
                continue
            self._store_is_back()
            return
        self.record.undelivered.append(job)

    def _wait_for_store(self) -> None:
        if self._outage_since is None:
            self._outage_since = time.time()
            log.warning("MLflow store %s unreachable; training goes on, logging calls are "
                        "kept and retried", self.uri)
        waited = time.time() - self._outage_since
        self._abandon.wait(min(FIRST_RETRY_DELAY_S * 2 ** min(waited, 4), MAX_RETRY_DELAY_S))

    def _store_is_back(self) -> None:
        if self._outage_since is not None:
            self._outage_since = None
            self.record.outages += 1
            log.warning("MLflow store %s is back; delivering the calls kept meanwhile",
                        self.uri)

    def drain(self, timeout_s: float) -> None:
        """Waits for every job; gives up on a store that stays down longer than ``timeout_s``
        (what is left goes to ``record.undelivered``)."""
        self._queue.put(None)
        while self._thread.is_alive():
            self._thread.join(0.2)
            since = self._outage_since
            if since is not None and time.time() - since > timeout_s:
                self._abandon.set()
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if job is not None:
                self.record.undelivered.append(job)
