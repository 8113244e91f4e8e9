"""The one style of configuration object in pyserval: a frozen pydantic dataclass.

``HostConfig``, ``StreamConfig``, ``ControlTimers`` and the simulator's ``LinkConfig`` are
declared alike::

    @dataclass(frozen=True, slots=True, config=CONFIG)   # pydantic.dataclasses.dataclass
    class StreamConfig:
        time_wait: float = Field(default=30.0, ge=0.0)

so they behave alike: built with keyword (or positional) arguments and checked once when
built -- a negative timeout, a wrong type or an unknown field is a
``pydantic.ValidationError``, which is a ``ValueError``, naming the field; never changed
afterwards (``dataclasses.replace`` makes a copy and checks it again); hashable.

Why pydantic *dataclasses* and not ``BaseModel``: the connections read their settings per
packet, and on CPython 3.11 a ``BaseModel`` field read costs about 4 times a slotted
dataclass's (72 ns against 18 ns for ``StreamConfig``, measured with ``timeit``: a model
keeps its fields in a dict it installs itself, which the interpreter's attribute cache does
not specialise). A pydantic dataclass validates in ``__init__`` like a model and is read
like any slotted dataclass. Nothing builds a configuration per packet.

Records that are not configuration (events, statistics, packet headers) stay plain
dataclasses: nothing to validate, built per packet. This module imports nothing from
pyserval, so every layer can use it.
"""

from __future__ import annotations

from typing import Final

from pydantic import ConfigDict

__all__ = ["CONFIG"]

CONFIG: Final = ConfigDict(extra="forbid")
"""The pydantic settings of every configuration dataclass: an unknown field is an error."""
