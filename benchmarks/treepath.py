"""Which pyserval a benchmark imports: the one on ``PYTHONPATH`` when set, else this checkout's.

``benchmarks/suite.py`` compares two source trees by running the same benchmark scripts
with ``PYTHONPATH=<tree>/src``; for that, a script must import pyserval from there and not
from the ``src/`` beside it. :func:`pin` imports pyserval (from ``PYTHONPATH`` or the
installed package first, this checkout's ``src/`` only as the fallback) and puts the
directory it came from first on ``sys.path``, where processes spawned by
:mod:`multiprocessing` find it too (they start with the parent's ``sys.path``). It imports
:mod:`baselines` in between, which puts this checkout's ``src/`` first on import: call it
before importing pyserval or baselines.

It does not isolate anything else: both trees run on the same interpreter and packages.
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
CHECKOUT_SRC = BENCHMARKS.parent / "src"


def pin() -> Path:
    """Import pyserval (``PYTHONPATH`` first) and keep its directory first on ``sys.path``;
    return that directory (the ``src/`` of the tree under test)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    try:
        import pyserval
    except ImportError:
        sys.path.insert(0, str(CHECKOUT_SRC))
        import pyserval
    src = Path(pyserval.__file__).resolve().parents[1]
    import baselines  # noqa: F401  (it inserts this checkout's src/: undone just below)

    first = str(src)
    sys.path[:] = [first, *(p for p in sys.path if p != first)]
    return src
