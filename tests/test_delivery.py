"""The delivery thread on its own (fast, no MLflow): order, retries through an outage, giving up
after the drain timeout, and errors that are not outages."""

from __future__ import annotations

import threading

from tfharness.tracking.delivery import DeliveryRecord, DeliveryWorker
from tfharness.tracking.jobs import Job


class Store:
    """A store that refuses connections while ``down`` is set and records what it received."""

    def __init__(self) -> None:
        self.down = threading.Event()
        self.received = []

    def deliver(self, job: Job) -> None:
        if self.down.is_set():
            raise ConnectionRefusedError(111, "Connection refused")
        if job.description.startswith("bad"):
            raise ValueError(f"Invalid metric name: {job.description!r}")
        self.received.append(job.description)


def test_jobs_arrive_in_order_and_an_outage_delays_without_losing():
    store, record = Store(), DeliveryRecord()
    worker = DeliveryWorker("http://store", store.deliver, record)
    store.down.set()
    for step in range(3):
        worker.submit(Job(f"metrics at step {step}"))
    threading.Timer(0.5, store.down.clear).start()  # back while calls wait
    worker.drain(timeout_s=60)
    assert store.received == ["metrics at step 0", "metrics at step 1", "metrics at step 2"]
    assert (record.outages, record.delayed, record.undelivered, record.errors) == (1, 1, [], [])
    assert "all delivered late, none lost" in record.outage_tag()


def test_a_store_down_past_the_drain_timeout_leaves_the_rest_undelivered_in_order():
    store, record = Store(), DeliveryRecord()
    worker = DeliveryWorker("http://store", store.deliver, record)
    worker.submit(Job("text config.yaml"))
    worker.submit(Job("metrics at step 0"))  # may or may not be in flight when the store dies
    store.down.set()
    worker.submit(Job("metrics at step 1"))
    worker.drain(timeout_s=0.2)
    delivered = store.received
    undelivered = [job.description for job in record.undelivered]
    assert delivered + undelivered == ["text config.yaml", "metrics at step 0",
                                       "metrics at step 1"]
    assert undelivered and "spooled for `python -m tfharness.sync`" in record.outage_tag()


def test_an_error_that_is_not_an_outage_is_recorded_and_the_next_job_goes_on():
    store, record = Store(), DeliveryRecord()
    worker = DeliveryWorker("http://store", store.deliver, record)
    worker.submit(Job("bad metric"))
    worker.submit(Job("metrics at step 1"))
    worker.drain(timeout_s=5)
    assert store.received == ["metrics at step 1"]
    assert record.errors == ["bad metric: ValueError: Invalid metric name: 'bad metric'"]
    assert record.outage_tag() is None
