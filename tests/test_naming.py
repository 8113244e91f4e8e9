"""ServiceID, ServicePrefix, self-certifying keys and flowIDs."""

from __future__ import annotations

import pickle
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyserval import FlowID, ServiceID, ServiceKey, ServicePrefix
from pyserval.naming import (
    FlowIDsExhausted,
    InvalidFlowID,
    InvalidServiceID,
    NotCertified,
    allocate_flow_id,
    as_service_prefix,
    parse_service,
)
from pyserval.naming.flow_id import FLOW_ID_MAX

ids = st.integers(min_value=0, max_value=(1 << 256) - 1)


@given(ids)
def test_service_id_forms_round_trip(value: int) -> None:
    sid = ServiceID(value)
    assert ServiceID.from_bytes(sid.to_bytes()) == sid
    assert ServiceID.from_hex(sid.hex) == sid
    assert ServiceID(sid.hex) == sid
    assert ServiceID.from_int(int(sid)) == sid
    assert bytes(sid) == value.to_bytes(32, "big")
    assert pickle.loads(pickle.dumps(sid)) == sid
    assert hash(ServiceID(value)) == hash(sid)


@given(ids, ids)
def test_ordering_matches_integers(a: int, b: int) -> None:
    assert (ServiceID(a) < ServiceID(b)) == (a < b)
    assert (ServiceID(a) <= ServiceID(b)) == (a <= b)
    assert sorted([ServiceID(a), ServiceID(b)]) == [ServiceID(x) for x in sorted([a, b])]


def test_service_id_is_immutable() -> None:
    sid = ServiceID(5)
    with pytest.raises(AttributeError):
        sid._value = 6


def test_from_name_is_stable_and_distinct() -> None:
    assert ServiceID.from_name("echo") == ServiceID.from_name("echo")
    assert ServiceID.from_name("echo") != ServiceID.from_name("Echo")
    # Pinned: the derivation is part of the protocol between hosts and must never change.
    assert ServiceID.from_name("echo").hex == ServiceID("echo").hex
    assert len(ServiceID.from_name("echo").hex) == 64


@pytest.mark.parametrize("bad", [b"short", -1, 1 << 256, "", "zz/8", "00/300", 3.5, True])
def test_bad_service_ids_raise_with_the_offending_value(bad: object) -> None:
    with pytest.raises(InvalidServiceID) as info:
        if isinstance(bad, str) and "/" in bad:
            ServicePrefix.parse(bad)
        else:
            ServiceID(bad)  # type: ignore[arg-type]
    if isinstance(bad, str) and bad:
        assert bad in str(info.value)


def test_text_forms() -> None:
    hex64 = "ab" * 32
    assert parse_service(hex64) == ServiceID(bytes.fromhex(hex64))
    assert parse_service("00004001/32") == ServicePrefix(
        ServiceID(bytes.fromhex("00004001") + bytes(28)), 32
    )
    assert parse_service("echo") == ServiceID.from_name("echo")
    with pytest.raises(InvalidServiceID, match="prefix"):
        ServiceID.parse("00004001/32")
    with pytest.raises(InvalidServiceID, match="bits set past"):
        ServicePrefix.parse("ff/4")
    assert as_service_prefix("echo") == ServicePrefix(ServiceID.from_name("echo"), 256)


@given(ids, st.integers(min_value=0, max_value=256), ids)
def test_prefix_normalises_and_contains(value: int, length: int, probe: int) -> None:
    p = ServicePrefix(ServiceID(value), length)
    shift = 256 - length
    assert p.value == (value >> shift) << shift
    assert p == ServicePrefix(ServiceID(p.value), length)
    assert p.contains(ServiceID(value))
    assert p.contains(ServiceID(probe)) == ((probe >> shift) == (value >> shift))
    assert ServicePrefix.parse(str(p)) == p
    assert ServiceID(value).common_prefix_length(ServiceID(value)) == 256


def test_prefix_contains_prefix_and_default() -> None:
    default = ServicePrefix.default()
    assert str(default) == "0" * 64 + "/0"
    outer = ServicePrefix.parse("0a/8")
    inner = ServicePrefix.parse("0a0b/16")
    assert outer.contains(inner) and not inner.contains(outer)
    assert default.contains(inner)
    assert ServiceID((0x0A0B << 240) | 7) in inner
    assert ServiceID(0).bit(0) == 0 and ServiceID(1 << 255).bit(0) == 1


def test_self_certifying_ids() -> None:
    key = ServiceKey.generate()
    sid = key.service_id("0a0b/16")
    assert sid.value >> 240 == 0x0A0B
    assert key.verify(sid) and key.public_key.certifies(sid)
    assert not ServiceKey.generate().verify(sid)
    with pytest.raises(NotCertified, match=sid.hex):
        ServiceKey.generate().public_key.check_certifies(sid)
    with pytest.raises(NotCertified):
        key.sign_for(ServiceID.from_name("not mine"), b"x")
    with pytest.raises(ValueError, match="96"):
        key.service_id(ServicePrefix.parse("0/97"))
    restored = ServiceKey.from_private_bytes(key.private_bytes())
    assert restored.service_id("0a0b/16") == sid


@given(st.binary(max_size=200), st.integers(min_value=0, max_value=159))
def test_signatures_and_certification(data: bytes, flip: int) -> None:
    key = ServiceKey.generate()
    sid = key.service_id()
    sig = key.sign_for(sid, data)
    assert key.public_key.verify_signature(data, sig)
    assert not key.public_key.verify_signature(data + b"x", sig)
    forged = ServiceID(sid.value ^ (1 << flip))  # any change in the certified bits
    assert not key.verify(forged)


def test_flow_ids() -> None:
    assert FlowID(1) == 1 and FlowID(0xFFFFFFFF) == 0xFFFFFFFF
    for bad in (0, -1, 1 << 32):
        with pytest.raises(InvalidFlowID):
            FlowID(bad)
    for wrong in (True, 1.0, "1"):  # a bool is an int, but no flowID
        with pytest.raises(InvalidFlowID):
            FlowID(wrong)  # type: ignore[arg-type]
    assert FlowID(FlowID(7)) == 7 and type(FlowID(FlowID(7))) is FlowID
    rng = random.Random(3)
    in_use: set[int] = set()
    drawn = [allocate_flow_id(in_use, rng) for _ in range(1000)]
    assert len(set(drawn)) > 990  # random, not a counter
    assert drawn != sorted(drawn)


def test_flow_id_allocation_avoids_used_ids() -> None:
    rng = random.Random(1)
    first = allocate_flow_id(set(), random.Random(1))
    # The same draw sequence, with the first draw taken: a different, free ID comes out.
    assert allocate_flow_id({first}, rng) != first

    class All:
        def __contains__(self, x: object) -> bool:
            return True

    with pytest.raises(FlowIDsExhausted):
        allocate_flow_id(All(), random.Random(1))


class _Edge(random.Random):
    """Its first 32-bit draws are the ones the rejection loop must skip (FLOW_ID_MAX and
    up), then it draws as random.Random does."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.forced = [0xFFFFFFFF, 0xFFFFFFFF]

    def getrandbits(self, k: int) -> int:
        return self.forced.pop() if self.forced else super().getrandbits(k)


@pytest.mark.parametrize("seed", [1, 2, 3, 99])
def test_flow_id_allocation_draws_what_randint_draws(seed: int) -> None:
    # The seeded simulator's flowIDs (and so its traces) are random.Random's
    # randint(1, FLOW_ID_MAX) values, whatever allocate_flow_id does to draw them.
    ours, reference = random.Random(seed), random.Random(seed)
    drawn = [allocate_flow_id(set(), ours) for _ in range(200)]
    assert drawn == [reference.randint(1, FLOW_ID_MAX) for _ in range(200)]
    assert all(type(f) is FlowID for f in drawn)
    edge, edge_reference = _Edge(seed), _Edge(seed)
    assert allocate_flow_id(set(), edge) == edge_reference.randint(1, FLOW_ID_MAX)
    assert not edge.forced  # both out-of-range draws were skipped
