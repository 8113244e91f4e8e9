"""How every benchmark hands over its result: one JSON document on stdout, and in a file.

Kept apart from :mod:`baselines` (which imports pyserval) so that any benchmark can use it
without changing which pyserval tree it measures (see :mod:`treepath`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(report: Any, out: str | Path | None, *, indent: int = 2) -> str:
    """Print ``report`` as JSON and, when ``out`` is given, write the same text there
    (creating its directory); return the text."""
    text = json.dumps(report, indent=indent)
    print(text, flush=True)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return text
