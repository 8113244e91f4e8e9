"""Configuration objects share one style (``pyserval.config``): frozen pydantic dataclasses
checked when built, with keyword construction and ``dataclasses.replace`` as before."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pydantic
import pytest

from pyserval.runtime.host import HostConfig
from pyserval.sal.control import ControlTimers
from pyserval.testing import LinkConfig
from pyserval.transport.config import StreamConfig

from .simhelpers import exchange, make_pair

PER_PACKET: list[type[Any]] = [StreamConfig, ControlTimers, LinkConfig]
CONFIGS: list[type[Any]] = [*PER_PACKET, HostConfig]


@pytest.mark.parametrize(
    ("cls", "field", "value"),
    [
        (StreamConfig, "time_wait", -1.0),
        (StreamConfig, "delayed_ack", -0.04),
        (StreamConfig, "initial_rto", 0.0),
        (StreamConfig, "min_rto", -0.2),
        (StreamConfig, "max_rto", -60.0),
        (StreamConfig, "keepalive", -15.0),
        (StreamConfig, "keepalive_interval", -5.0),
        (StreamConfig, "user_timeout", -60.0),
        (StreamConfig, "idle_timeout", -1.0),
        (StreamConfig, "max_retransmissions", -1),
        (StreamConfig, "ack_every", 0),
        (StreamConfig, "max_half_open", -1),
        (ControlTimers, "initial_rto", -1.0),
        (ControlTimers, "min_rto", 0.0),
        (ControlTimers, "max_retries", -1),
        (LinkConfig, "delay", -0.001),
        (LinkConfig, "loss", 1.5),
        (HostConfig, "connect_timeout", -30.0),
        (HostConfig, "close_timeout", -2.0),
    ],
)
def test_out_of_range_values_are_refused_naming_the_field(
    cls: type[Any], field: str, value: float
) -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        cls(**{field: value})
    assert isinstance(info.value, ValueError)  # what callers caught before
    assert field in str(info.value)


@pytest.mark.parametrize("cls", CONFIGS)
def test_unknown_fields_and_wrong_types_are_refused(cls: type[Any]) -> None:
    with pytest.raises(pydantic.ValidationError, match="tme_wait"):
        cls(tme_wait=1.0)  # a misspelt name is not silently ignored
    first = dataclasses.fields(cls)[0].name
    with pytest.raises(pydantic.ValidationError, match=first):
        cls(**{first: "not a number"})


@pytest.mark.parametrize("cls", CONFIGS)
def test_configs_are_frozen_slotted_dataclasses(cls: type[Any]) -> None:
    config = cls()
    assert dataclasses.is_dataclass(config) and hasattr(cls, "__slots__")
    assert not hasattr(config, "__dict__")  # read like any slotted dataclass
    first = dataclasses.fields(cls)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(config, first, getattr(config, first))
    assert config == cls()
    if cls in PER_PACKET:  # HostConfig holds lists: equal, but not hashable
        assert hash(config) == hash(cls())


def test_keyword_construction_and_replace_still_work_and_replace_checks() -> None:
    config = StreamConfig(mss=1200, time_wait=1.0, control=ControlTimers(initial_rto=0.5))
    assert (config.mss, config.time_wait, config.control.initial_rto) == (1200, 1.0, 0.5)
    changed = dataclasses.replace(config, mss=1000)
    assert changed.mss == 1000 and changed.time_wait == 1.0 and config.mss == 1200
    with pytest.raises(pydantic.ValidationError, match="time_wait"):
        dataclasses.replace(config, time_wait=-1.0)
    with pytest.raises(pydantic.ValidationError, match="min_rto must not exceed max_rto"):
        StreamConfig(min_rto=5.0, max_rto=1.0)


def test_no_configuration_is_built_per_packet(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[str] = []
    for cls in PER_PACKET:
        original = cls.__init__

        def counting(self: Any, *args: Any, __init: Any = original, **kwargs: Any) -> None:
            built.append(type(self).__name__)
            __init(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", counting)
    pair = make_pair(seed=3)
    pair.connect()
    built.clear()
    data = random.Random(1).randbytes(300_000)
    exchange(pair, data, data)  # hundreds of packets each way
    assert built == []


@pytest.mark.parametrize(
    "size",
    [1408, 0xFFFF, 0x10000, 0x10001, 0x1FFFF, 0x20000, 1 << 20, (1 << 20) + 1, 0x3FFFFFFF],
)
def test_window_scale_is_the_smallest_shift_that_fits(size: int) -> None:
    # RFC 7323 2.3: the window field holds (buffer >> shift); the smallest shift that
    # makes it fit 16 bits, found here by trying shifts in turn.
    shift = next(s for s in range(31) if size >> s <= 0xFFFF)
    assert StreamConfig(receive_buffer=size).window_scale == shift
