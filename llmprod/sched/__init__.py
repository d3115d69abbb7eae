"""CPU bookkeeping of a step: requests, the scheduler and its fair queue (no torch)."""

from llmprod.sched.fair_queue import FairQueue
from llmprod.sched.request import Request, RequestStatus
from llmprod.sched.scheduler import (
    ScheduledRequest,
    Scheduler,
    SchedulerOutput,
    SchedulerStats,
)

__all__ = [
    "FairQueue",
    "Request",
    "RequestStatus",
    "ScheduledRequest",
    "Scheduler",
    "SchedulerOutput",
    "SchedulerStats",
]
