"""Trying a call to the tracking store again: the one bounded backoff loop of tracking.

Used for a store whose schema another client is creating (:mod:`tfharness.tracking.store`), a
run being opened on a server that does not answer (:mod:`tfharness.tracking.runs`) and a dataset
that lost MLflow's race to insert it (:mod:`tfharness.tracking.jobs`). The delivery thread's
retries while a server is down (:mod:`tfharness.tracking.delivery`) are of another kind: they
wait without a bound of their own, while training goes on.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional, TypeVar

log = logging.getLogger("tfharness")

T = TypeVar("T")


def retrying(call: Callable[[], T], should_retry: Callable[[BaseException], bool], *,
             what: str, attempts: Optional[int] = None, deadline_s: Optional[float] = None,
             found: Optional[Callable[[], Optional[T]]] = None, first_delay_s: float = 0.25,
             max_delay_s: float = 4.0, level: int = logging.WARNING) -> T:
    """``call()``, tried again with a doubling delay while ``should_retry(error)``, up to
    ``attempts`` tries or ``deadline_s`` seconds; the last error is raised.

    ``found``: after a try that failed, it is asked first (and must itself succeed) and returns
    what that try did if the store carried it out although its answer was lost; ``call`` is then
    not made again, so a call that creates something creates it once.
    """
    start, delay, failures = time.time(), first_delay_s, 0
    while True:
        try:
            if failures and found is not None:
                result = found()
                if result is not None:
                    return result
            return call()
        except Exception as error:  # noqa: BLE001 - should_retry sorts them
            failures += 1
            spent = ((attempts is not None and failures >= attempts)
                     or (deadline_s is not None and time.time() - start > deadline_s))
            if spent or not should_retry(error):
                raise
            log.log(level, "%s (%s); trying again", what, type(error).__name__)
        time.sleep(delay)
        delay = min(2 * delay, max_delay_s)
