"""Unreachable detection: which tracking errors mean "the server did not answer" (fast, no
TensorFlow): those are retried and spooled, every other error fails the run."""

from __future__ import annotations

import socket

import pytest
import requests

from tfharness.tracking.unreachable import is_unreachable


def refused_error() -> BaseException:
    """What requests raises for a port nobody listens on, caught for real."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    try:
        requests.get(f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/get", timeout=5)
    except requests.RequestException as error:
        return error
    pytest.fail("a closed port answered")


def test_a_refused_connection_is_unreachable():
    assert is_unreachable(refused_error())


def test_mlflows_wrapping_of_a_refused_connection_is_unreachable():
    from mlflow.exceptions import MlflowException

    try:
        try:
            raise refused_error()
        except requests.RequestException as error:
            # What mlflow.utils.rest_utils raises once its HTTP retries are spent.
            raise MlflowException(f"API request to http://127.0.0.1/api/2.0/mlflow/runs/"
                                  f"log-batch failed with exception {error}") from None
    except MlflowException as wrapped:
        assert is_unreachable(wrapped)


@pytest.mark.parametrize("error", [ConnectionRefusedError(111, "refused"), TimeoutError("slow"),
                                   ConnectionResetError(104, "reset")])
def test_os_level_connection_errors_are_unreachable(error):
    assert is_unreachable(error)


def test_a_cause_deep_in_the_chain_counts():
    try:
        try:
            raise ConnectionRefusedError(111, "refused")
        except ConnectionRefusedError as low:
            raise RuntimeError("logging failed") from low
    except RuntimeError as high:
        assert is_unreachable(high)


@pytest.mark.parametrize("error", [
    ValueError("Invalid metric name: 'no good?'"),
    PermissionError("attempt to write a readonly database"),
    RuntimeError("RESOURCE_DOES_NOT_EXIST: Run 'abc' not found"),
])
def test_errors_of_a_store_that_answered_are_not_unreachable(error):
    assert not is_unreachable(error)


def test_a_chain_that_loops_ends():
    first, second = RuntimeError("a"), RuntimeError("b")
    first.__context__, second.__context__ = second, first
    assert not is_unreachable(first)


def test_retrying_is_bounded_and_creates_once():
    from tfharness.tracking.retries import retrying

    calls: list = []

    def flaky() -> str:
        calls.append("call")
        if len(calls) < 3:
            raise ConnectionError("Connection refused")
        return "done"

    assert retrying(flaky, is_unreachable, what="t", attempts=5, first_delay_s=0) == "done"
    assert len(calls) == 3
    # Another kind of error is raised at once; a spent budget raises the last error.
    with pytest.raises(ValueError):
        retrying(lambda: (_ for _ in ()).throw(ValueError("bad")), is_unreachable, what="t",
                 attempts=5, first_delay_s=0)
    calls.clear()
    with pytest.raises(ConnectionError):
        retrying(flaky, is_unreachable, what="t", attempts=2, first_delay_s=0)
    assert len(calls) == 2
    # A call whose answer was lost but which the store carried out is found, not made again.
    made: list = []

    def create() -> str:
        made.append("run")
        raise ConnectionError("Read timed out")

    assert retrying(create, is_unreachable, what="t", deadline_s=5, first_delay_s=0,
                    found=lambda: "run-1" if made else None) == "run-1"
    assert made == ["run"]
