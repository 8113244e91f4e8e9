"""The flow manager and what it is built from (see :mod:`.manager`).

* :mod:`.manager`: :class:`FlowManager`, the subflows of one connection (JOIN, migration,
  address checks, scheduling, reinjection, the ``paths`` view);
* :mod:`.migration`: the RSYN and address-check state of one subflow;
* :mod:`.multipath`: keys and tokens, the per-subflow receive tracker, coupled congestion
  control (LIA) and the schedulers.

``transport.migration`` and ``transport.multipath`` re-export the last two under their
old names.
"""

from .manager import FlowManager
from .migration import Challenge, MigrationState
from .multipath import (
    Lia,
    LiaGroup,
    MultipathState,
    RedundantScheduler,
    Scheduler,
    SeqTracker,
    get_scheduler,
    register_scheduler,
)

__all__ = [
    "Challenge",
    "FlowManager",
    "Lia",
    "LiaGroup",
    "MigrationState",
    "MultipathState",
    "RedundantScheduler",
    "Scheduler",
    "SeqTracker",
    "get_scheduler",
    "register_scheduler",
]
