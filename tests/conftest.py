"""Shared test settings: hypothesis profiles (CI runs more examples)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("default", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "ci", deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ci" if os.environ.get("CI") else "default")


_SIM_MODULES: dict[str, bool] = {}


def _uses_the_sim(path: Path) -> bool:
    """Whether a test module drives hosts through the simulated network (by its source)."""
    key = str(path)
    found = _SIM_MODULES.get(key)
    if found is None:
        text = path.read_text(encoding="utf-8")
        found = _SIM_MODULES[key] = "SimNetwork" in text or "simhelpers" in text
    return found


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests of modules that use the simulated network ``sim`` (``dev.py test``
    runs them a second time with ``PYSERVAL_SIM_BATCHES=1``)."""
    for item in items:
        if _uses_the_sim(Path(item.path)):
            item.add_marker(pytest.mark.sim)
