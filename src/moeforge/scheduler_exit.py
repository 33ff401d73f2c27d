"""Let the Snakemake process end as soon as the workflow has.

Snakemake's job-rate limiter (``--max-jobs-per-timespan``, default 100/1s) starts a re-scheduling
timer after every pass of its scheduler: a ``threading.Timer``, which is not a daemon thread, so
Python waits for the last one before the process exits, up to a second after the last job ended
(measured: 1.5 s from the last job to the exit of a two-job workflow, 0.3 s with the timers
cancelled). The option cannot take a shorter span ("100ms" parses as 100 minutes). Once the
workflow's success or error hook runs, no job is left to schedule, so the timers have nothing
left to wake; cancelling them ends the process without that wait.
"""

from __future__ import annotations

import threading


def cancel_rescheduling_timers() -> int:
    """Cancel every pending ``threading.Timer`` of this process; return how many there were."""
    timers = [thread for thread in threading.enumerate() if isinstance(thread, threading.Timer)]
    for timer in timers:
        timer.cancel()
    return len(timers)
