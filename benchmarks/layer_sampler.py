"""Where a process's user-space CPU goes, by layer (``connect_slices.py --layers``).

A statistical profiler with no dependency: ``ITIMER_VIRTUAL`` sends the process SIGVTALRM
after each ``interval`` of *user* CPU time (time asleep and in the kernel does not count),
and the handler notes the layer of the Python function running (the kernel counts that
time in its ticks, so a sample comes at most once a tick: 250 a second at ``HZ=250``). Two
limits to read the shares with: time in C (a system call's user-space part, ``struct``, a
dict) counts for the Python function that called it; and Python runs a signal handler only
at its next check (a call, a loop's jump back), so a sample that falls in C can land on the
function entered next. Shares of a few percent are within that blur; a layer's share of a
whole run is not.
"""

from __future__ import annotations

import signal
from collections import Counter
from types import FrameType

# The first match wins: pyserval's runtime (sockets, the driver, streams) before the rest
# of pyserval (the sans-I/O core: sal, transport, core, naming). "<string>" is generated
# code: a dataclass's __init__ (pyserval's headers and events) or a namedtuple's __new__
# (asyncio's selector keys), so its own layer.
LAYERS: tuple[tuple[str, str], ...] = (
    ("/pyserval/runtime/", "runtime"),
    ("/pyserval/", "core"),
    ("<string>", "generated"),
    ("/asyncio/", "asyncio"),
    ("/selectors.py", "asyncio"),
    ("/anyio/", "anyio"),
)
OTHER = "other"


def layer_of(filename: str) -> str:
    """The layer a code object's file belongs to."""
    for part, name in LAYERS:
        if part in filename:
            return name
    return OTHER


class LayerSampler:
    """Counts of user-CPU samples by layer since :meth:`start` (cumulative: take
    differences of :meth:`counts`)."""

    def __init__(self, interval: float = 0.001) -> None:
        """Sample every ``interval`` seconds of user CPU (or every kernel tick, where that
        is longer)."""
        self.interval = interval
        self._counts: Counter[str] = Counter()
        # A file's layer, looked up once (the handler runs thousands of times). Keyed by
        # the name, not the code object: code objects compare equal across files.
        self._layer: dict[str, str] = {}

    def _on_signal(self, _signum: int, frame: FrameType | None) -> None:
        if frame is None:
            return
        filename = frame.f_code.co_filename
        name = self._layer.get(filename)
        if name is None:
            name = self._layer[filename] = layer_of(filename)
        self._counts[name] += 1

    def start(self) -> None:
        """Install the handler and start the timer."""
        signal.signal(signal.SIGVTALRM, self._on_signal)
        signal.setitimer(signal.ITIMER_VIRTUAL, self.interval, self.interval)

    def stop(self) -> None:
        """Stop the timer."""
        signal.setitimer(signal.ITIMER_VIRTUAL, 0, 0)

    def counts(self) -> dict[str, int]:
        """Samples so far by layer."""
        return dict(self._counts)


def growth(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The samples taken between two :meth:`LayerSampler.counts`, by layer."""
    return {k: after[k] - before.get(k, 0) for k in after}


def shares(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    """Each layer's share of the samples taken between two :meth:`LayerSampler.counts`."""
    diff = growth(before, after)
    total = sum(diff.values())
    return {k: v / total for k, v in diff.items() if v} if total else {}
