"""Control-plane messages (wire encoding, validation, signing) and the router's checks."""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyserval.control import (
    CONTROL_SERVICE,
    MAX_MESSAGE_BYTES,
    MAX_REGISTRATIONS,
    PROTOCOL_VERSION,
    REFUSAL_REASONS,
    TABLE_PAGE,
    AckMessage,
    BadControlMessage,
    ControlMessage,
    FlowInfo,
    FlowsReply,
    FlowsRequest,
    MessageKind,
    MessageTooLarge,
    PathInfo,
    RegisterMessage,
    Registration,
    RegistrationGuard,
    RegistrationRefused,
    RegistrationResult,
    TableEntryInfo,
    TableReply,
    TableRequest,
    TargetInfo,
    UnregisterMessage,
    decode_message,
    encode_message,
    format_instance_address,
    parse_instance_address,
)
from pyserval.naming import ServiceID, ServiceKey, ServicePrefix

NOW = 1_700_000_000.0
REG = MessageKind.REGISTER
UNREG = MessageKind.UNREGISTER
HERE = ("192.0.2.7", 40000)
ELSEWHERE = ("198.51.100.9", 40000)


def nonce() -> bytes:
    return os.urandom(16)


def plain(service: str | ServiceID | ServicePrefix = "echo", **kw: object) -> Registration:
    """An unsigned registration made at NOW."""
    args: dict[str, object] = {"now": NOW, "nonce": nonce()}
    args.update(kw)
    return Registration.make(service, **args)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def owner() -> ServiceKey:
    return ServiceKey.generate()


@pytest.fixture(scope="module")
def attacker() -> ServiceKey:
    return ServiceKey.generate()


def test_control_service_is_the_well_known_name() -> None:
    assert ServiceID.from_name("pyserval.control") == CONTROL_SERVICE
    assert PROTOCOL_VERSION == 1


# -- round trips ------------------------------------------------------------------------------


def sample_messages() -> list[ControlMessage]:
    key = ServiceKey.generate()
    signed = Registration.make(
        key.service_id(),
        address="10.0.0.1:5000",
        weight=7,
        priority=-3,
        ttl=2.5,
        now=NOW,
        nonce=nonce(),
        key=key,
    )
    unsigned = plain("00004001/32", address="[2001:db8::1]:80")
    return [
        RegisterMessage(seq=0, registrations=[signed, unsigned]),
        UnregisterMessage(seq=(1 << 63) - 1, registrations=[plain()]),
        AckMessage(
            seq=5,
            results=[RegistrationResult(ok=True), RegistrationResult(ok=False, reason="stale")],
        ),
        AckMessage(seq=6),
        TableRequest(seq=9, offset=200),
        TableReply(
            seq=9,
            offset=200,
            total=201,
            entries=[
                TableEntryInfo(
                    prefix="00004001/32",
                    action="forward",
                    targets=[
                        TargetInfo(address="10.0.0.1:5000", weight=2, priority=0, expires_in=0.7),
                        TargetInfo(address="router.example:54325", weight=1, priority=5),
                    ],
                    hits=12,
                ),
                TableEntryInfo(prefix=str(ServicePrefix.default()), action="drop"),
            ],
            counters={"registered": 3, "refused.stale": 1},
        ),
        FlowsRequest(seq=10, offset=3, pad="  "),
        FlowsReply(
            seq=10,
            offset=3,
            total=4,
            flows=[
                FlowInfo(
                    service=ServiceID.from_name("echo").hex,
                    kind="stream",
                    role="server",
                    state="established",
                    bytes_received=5000,
                    paths=[
                        PathInfo(
                            local="10.0.0.2:54325",
                            remote="10.0.0.1:40000",
                            local_flowid=7,
                            remote_flowid=0xFFFFFFFF,
                            rtt=0.012,
                            rttvar=0.003,
                            rto=0.2,
                            cwnd=14080,
                            in_flight=1408,
                            bytes_sent=9000,
                            bytes_acked=7592,
                            retransmissions=2,
                        )
                    ],
                ),
                FlowInfo(
                    service="ab" * 32,
                    kind="datagram",
                    role="client",
                    state="syn_sent",
                    paths=[PathInfo(local="10.0.0.1:1", local_flowid=1, remote_flowid=0)],
                    error="",
                ),
            ],
        ),
    ]


@pytest.mark.parametrize("msg", sample_messages(), ids=lambda m: type(m).__name__)
def test_every_kind_round_trips(msg: ControlMessage) -> None:
    data = encode_message(msg)
    assert data[:2] == b"SV"
    assert data[2] == PROTOCOL_VERSION
    assert data[3] == msg.kind
    assert json.loads(data[4:]) == json.loads(msg.model_dump_json())
    back = decode_message(data)
    assert type(back) is type(msg)
    assert back == msg
    assert encode_message(back) == data


def test_every_kind_has_a_model() -> None:
    kinds = {type(m).kind for m in sample_messages()}
    assert kinds == set(MessageKind)


def test_body_is_compact_json() -> None:
    data = encode_message(TableRequest(seq=1))
    assert data[4:] == b'{"seq":1,"offset":0,"pad":""}'


def test_signed_registration_survives_the_wire(owner: ServiceKey) -> None:
    reg = Registration.make(owner.service_id(), now=NOW + 0.123456789, nonce=nonce(), key=owner)
    back = decode_message(encode_message(RegisterMessage(seq=1, registrations=[reg])))
    assert isinstance(back, RegisterMessage)
    assert back.registrations[0].verify_signature(REG)


hex_ids = st.integers(0, (1 << 256) - 1)
ipv4 = st.integers(0, (1 << 32) - 1).map(lambda v: str(ipaddress.IPv4Address(v)))
ipv6 = st.integers(0, (1 << 128) - 1).map(lambda v: f"[{ipaddress.IPv6Address(v)}]")
addresses = st.one_of(
    st.none(),
    st.builds(lambda ip, port: f"{ip}:{port}", st.one_of(ipv4, ipv6), st.integers(1, 65535)),
)
registrations = st.builds(
    lambda value, length, address, weight, priority, ttl, ts, n: Registration.make(
        ServicePrefix(value, length),
        address=address,
        weight=weight,
        priority=priority,
        ttl=ttl,
        now=ts,
        nonce=n,
    ),
    hex_ids,
    st.integers(0, 256),
    addresses,
    st.integers(1, 65535),
    st.integers(-1000, 1000),
    st.floats(0.05, 86400.0),
    st.floats(0.0, 1e11),
    st.binary(min_size=16, max_size=16),
)
register_messages = st.builds(
    lambda cls, seq, regs: cls(seq=seq, registrations=regs),
    st.sampled_from([RegisterMessage, UnregisterMessage]),
    st.integers(0, (1 << 63) - 1),
    st.lists(registrations, min_size=1, max_size=MAX_REGISTRATIONS),
)


@given(register_messages)
def test_registration_messages_round_trip(msg: RegisterMessage | UnregisterMessage) -> None:
    data = encode_message(msg)
    assert len(data) <= MAX_MESSAGE_BYTES
    assert decode_message(data) == msg


# -- field validation ----------------------------------------------------------------------------


def test_prefix_text_is_canonical() -> None:
    reg = plain("00004001/32")
    assert reg.service == "00004001" + "0" * 56 + "/32"
    assert reg.prefix == ServicePrefix.parse("00004001/32")
    upper = Registration(service="ABCD/16", timestamp=NOW, nonce="AB" * 16)
    assert upper.service == "abcd" + "0" * 60 + "/16"
    assert upper.nonce == "ab" * 16
    sid = ServiceID.from_name("echo")
    assert plain(sid).service == f"{sid.hex}/256"
    assert plain("echo").prefix == ServicePrefix(sid, 256)


@pytest.mark.parametrize(
    "field",
    [
        {"service": "00ff/4"},  # bits past the length
        {"service": "zz/8"},
        {"service": "00/300"},
        {"service": "0" * 64},  # an ID without /len
        {"service": "00/\u0663"},  # a non-ASCII digit
        {"address": "localhost:80"},
        {"address": "10.0.0.1"},
        {"address": "10.0.0.1:0"},
        {"address": "10.0.0.1:65536"},
        {"address": "::1:80"},
        {"address": "[10.0.0.1]:80"},
        {"weight": 0},
        {"weight": 65536},
        {"weight": True},
        {"weight": 1.0},
        {"priority": 1001},
        {"priority": -1001},
        {"ttl": 0.01},
        {"ttl": 86401.0},
        {"ttl": float("nan")},
        {"timestamp": -1.0},
        {"timestamp": float("inf")},
        {"nonce": "ab" * 15},
        {"nonce": "zz" * 16},
        {"public_key": "ab" * 31},
        {"signature": "ab" * 64},  # without a public key
        {"surprise": 1},
    ],
)
def test_registration_fields_are_bounded(field: dict[str, object]) -> None:
    data: dict[str, object] = {"service": "00/8", "timestamp": NOW, "nonce": "00" * 16}
    data.update(field)
    with pytest.raises(ValueError):
        Registration.model_validate(data)


def test_models_are_frozen() -> None:
    reg = plain()
    with pytest.raises(ValueError):
        setattr(reg, "weight", 5)  # noqa: B010  (the assignment itself is the test)


def test_instance_addresses() -> None:
    assert parse_instance_address("10.0.0.1:80") == ("10.0.0.1", 80)
    assert parse_instance_address("[2001:DB8::0:1]:80") == ("2001:db8::1", 80)
    assert format_instance_address(("2001:db8::1", 80)) == "[2001:db8::1]:80"
    assert plain(address="[2001:DB8::0:1]:0080").address == "[2001:db8::1]:80"
    assert plain(address="10.0.0.1:80").instance_address == ("10.0.0.1", 80)
    assert plain().instance_address is None


@pytest.mark.parametrize(
    "make",
    [
        lambda: RegisterMessage(seq=1, registrations=[]),
        lambda: RegisterMessage(seq=1, registrations=[plain()] * (MAX_REGISTRATIONS + 1)),
        lambda: RegisterMessage(seq=-1, registrations=[plain()]),
        lambda: RegisterMessage(seq=1 << 63, registrations=[plain()]),
        lambda: TableRequest(seq=1, offset=-1),
        lambda: TableReply(seq=1, entries=[TableEntryInfo(prefix="/0", action="drop")] * 101),
        lambda: TableEntryInfo(prefix="/0", action="explode"),  # type: ignore[arg-type]
        lambda: TargetInfo(address="10.0.0.1:1", weight=0, priority=0),
        lambda: TargetInfo(address="10.0.0.1:1", weight=1, priority=0, expires_in=-1.0),
        lambda: TargetInfo(address="no port", weight=1, priority=0),
        lambda: TableReply(seq=1, counters={"": 1}),
        lambda: TableReply(seq=1, counters={"x": -1}),
        lambda: RegistrationResult(ok=True, reason="x" * 201),
    ],
)
def test_message_fields_are_bounded(make: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        make()


def test_table_page_fits_a_datagram() -> None:
    entry = TableEntryInfo(
        prefix=f"{'f' * 64}/256",
        action="forward",
        targets=[TargetInfo(address="[2001:db8::1234:5678]:65535", weight=65535, priority=-5)],
        hits=(1 << 63) - 1,
    )
    page = TableReply(seq=1, total=10**6, entries=[entry] * TABLE_PAGE, counters={"a": 1})
    assert len(encode_message(page)) <= MAX_MESSAGE_BYTES


def test_encode_refuses_an_oversized_message() -> None:
    targets = [
        TargetInfo(address=f"10.0.{i // 250}.{i % 250}:80", weight=1, priority=0)
        for i in range(256)
    ]
    entry = TableEntryInfo(prefix="/0", action="forward", targets=targets)
    with pytest.raises(MessageTooLarge, match="fewer"):
        encode_message(TableReply(seq=1, entries=[entry] * 10))


def test_maximal_register_message_fits_a_datagram() -> None:
    key = ServiceKey.generate()
    reg = Registration.make(
        key.service_id(),
        address="[ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe%interface-name0]:65535",
        weight=65535,
        priority=-1000,
        ttl=86399.123456789,
        now=99_999_999_999.12345,
        nonce=nonce(),
        key=key,
    )
    msg = RegisterMessage(seq=(1 << 63) - 1, registrations=[reg] * MAX_REGISTRATIONS)
    assert len(encode_message(msg)) <= MAX_MESSAGE_BYTES


# -- decode errors --------------------------------------------------------------------------------


def envelope(kind: int, body: bytes, *, version: int = PROTOCOL_VERSION) -> bytes:
    return b"SV" + bytes((version, kind)) + body


@pytest.mark.parametrize(
    ("data", "reason", "words"),
    [
        (b"", "too_short", "shorter"),
        (b"SV\x01", "too_short", "shorter"),
        (b"XY\x01\x04{}", "bad_magic", "magic"),
        (envelope(4, b'{"seq":1}', version=2), "bad_version", "version 2"),
        (envelope(4, b'{"seq":1}', version=0), "bad_version", "version 0"),
        (envelope(0, b"{}"), "unknown_kind", "kind 0"),
        (envelope(8, b"{}"), "unknown_kind", "kind 8"),
        (envelope(255, b"{}"), "unknown_kind", "kind 255"),
        (envelope(4, b""), "bad_json", "JSON"),
        (envelope(4, b'{"seq":1'), "bad_json", "JSON"),
        (envelope(4, b'{"seq":1} x'), "bad_json", "JSON"),
        (envelope(4, b"[" * 5000), "bad_json", "JSON"),
        (envelope(4, b'{"seq":"\xff"}'), "bad_json", "UTF-8"),
        (envelope(4, b'{"seq":"1"}'), "invalid", "seq"),
        (envelope(4, b'{"seq":1.0}'), "invalid", "seq"),
        (envelope(4, b'{"seq":-1}'), "invalid", "seq"),
        (envelope(4, b'{"seq":1,"extra":2}'), "invalid", "extra"),
        (envelope(4, b"[]"), "invalid", "TABLE_REQUEST"),
        (envelope(4, b"null"), "invalid", "TABLE_REQUEST"),
        (envelope(1, b'{"seq":1,"registrations":[]}'), "invalid", "registrations"),
        (envelope(1, b'{"seq":1,"registrations":[{"service":"1/1"}]}'), "invalid", "nonce"),
        (envelope(3, b'{"seq":1,"results":[{"ok":1}]}'), "invalid", "ok"),
        (envelope(4, b'{"seq":1,"offset":NaN}'), "invalid", "offset"),
        (envelope(4, b" " * (MAX_MESSAGE_BYTES - 3)), "too_big", "exceeds"),
    ],
)
def test_decode_errors_are_typed_and_explained(data: bytes, reason: str, words: str) -> None:
    with pytest.raises(BadControlMessage, match=words) as info:
        decode_message(data)
    assert info.value.reason == reason
    assert isinstance(info.value, ValueError)


def test_decode_accepts_a_message_at_the_size_limit() -> None:
    body = b'{"seq":1}'
    data = envelope(4, body + b" " * (MAX_MESSAGE_BYTES - 4 - len(body)))
    assert len(data) == MAX_MESSAGE_BYTES
    assert decode_message(data) == TableRequest(seq=1)


def test_decode_takes_bytearray_and_memoryview() -> None:
    data = encode_message(TableRequest(seq=3))
    assert decode_message(bytearray(data)) == TableRequest(seq=3)
    assert decode_message(memoryview(data)) == TableRequest(seq=3)


def decodes_or_refuses(data: bytes) -> None:
    try:
        msg = decode_message(data)
    except BadControlMessage as exc:
        assert exc.reason in {
            "too_short",
            "too_big",
            "bad_magic",
            "bad_version",
            "unknown_kind",
            "bad_json",
            "invalid",
        }
        assert str(exc)
    else:
        assert decode_message(encode_message(msg)) == msg


@given(st.binary(max_size=2000))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    decodes_or_refuses(data)


@given(st.integers(0, 255), st.binary(max_size=500))
def test_fuzz_valid_header_arbitrary_body(kind: int, body: bytes) -> None:
    decodes_or_refuses(envelope(kind, body))


FUZZ_SEEDS = [encode_message(m) for m in sample_messages()]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(FUZZ_SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "dup"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.sampled_from(b'0129af"{}[],:-.eE\\ \x00\xff'))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[pos:]
        elif op == "dup":
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 40))]
    return bytes(data)


@given(mutated())
def test_fuzz_mutated_valid_messages(data: bytes) -> None:
    decodes_or_refuses(data)


@given(st.sampled_from(FUZZ_SEEDS), st.text(max_size=30))
def test_fuzz_json_text_spliced_into_valid_messages(seed: bytes, text: str) -> None:
    body = seed[4:].decode()
    cut = len(body) // 2
    decodes_or_refuses(seed[:4] + (body[:cut] + text + body[cut:]).encode())


# -- signing --------------------------------------------------------------------------------------


def test_signed_bytes_are_domain_op_and_sorted_json(owner: ServiceKey) -> None:
    reg = Registration.make(owner.service_id(), now=NOW, nonce=nonce(), key=owner)
    signed = reg.signed_bytes(REG)
    domain = b"pyserval/registration/v1\x00"
    assert signed.startswith(domain + bytes([REG]))
    body = json.loads(signed[len(domain) + 1 :])
    assert "signature" not in body
    assert list(body) == sorted(body)
    assert body["public_key"] == owner.public_key.raw.hex()
    assert (
        signed[len(domain) + 1 :]
        == json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    )
    assert reg.signed_bytes(UNREG)[len(domain)] == UNREG


def test_signed_bytes_test_vector() -> None:
    """Pinned: another implementation must produce exactly these bytes to sign."""
    reg = Registration(
        service="00004001/32",
        address="10.0.0.1:80",
        ttl=2,
        timestamp=1_700_000_000,
        nonce="AB" * 16,
    )
    assert reg.signed_bytes(UNREG) == (
        b"pyserval/registration/v1\x00\x02"
        b'{"address":"10.0.0.1:80","nonce":"abababababababababababababababab","priority":0,'
        b'"public_key":null,"service":"00004001000000000000000000000000000000000000000000000000'
        b'00000000/32","timestamp":1700000000.0,"ttl":2.0,"weight":1}'
    )


def test_sign_and_verify(owner: ServiceKey, attacker: ServiceKey) -> None:
    reg = Registration.make(
        owner.service_id(), address="10.0.0.1:80", now=NOW, nonce=nonce(), key=owner
    )
    assert reg.public_key == owner.public_key.raw.hex()
    assert reg.signature is not None and len(reg.signature) == 128
    assert reg.verify_signature(REG)
    assert not reg.verify_signature(UNREG)
    assert not reg.model_copy(update={"weight": 2}).verify_signature(REG)
    assert not reg.model_copy(update={"address": None}).verify_signature(REG)
    assert not reg.model_copy(
        update={"public_key": attacker.public_key.raw.hex()}
    ).verify_signature(REG)
    assert not reg.model_copy(update={"signature": None}).verify_signature(REG)
    unreg = Registration.make(owner.service_id(), now=NOW, nonce=nonce(), key=owner, op=UNREG)
    assert unreg.verify_signature(UNREG)
    assert not unreg.verify_signature(REG)
    assert not plain().verify_signature(REG)


def test_make_refuses_what_it_cannot_sign(owner: ServiceKey, attacker: ServiceKey) -> None:
    with pytest.raises(ValueError, match="/256"):
        Registration.make(owner.service_id().prefix(96), now=NOW, nonce=nonce(), key=owner)
    with pytest.raises(ValueError, match="not certified"):
        Registration.make(owner.service_id(), now=NOW, nonce=nonce(), key=attacker)
    with pytest.raises(ValueError, match="16 random bytes"):
        Registration.make("echo", now=NOW, nonce=b"short")
    with pytest.raises(ValueError, match="REGISTER or UNREGISTER"):
        Registration.make("echo", now=NOW, nonce=nonce(), op=MessageKind.ACK)


# -- the router's checks ----------------------------------------------------------------------


def signed(key: ServiceKey, op: MessageKind = REG, **kw: object) -> Registration:
    args: dict[str, object] = {"now": NOW, "nonce": nonce(), "key": key, "op": op}
    args.update(kw)
    service = args.pop("service", key.service_id())
    return Registration.make(service, **args)  # type: ignore[arg-type]


def refused(
    guard: RegistrationGuard,
    reg: Registration,
    reason: str,
    *,
    op: MessageKind = REG,
    observed: tuple[str, int] = HERE,
    now: float = NOW,
) -> RegistrationRefused:
    before = guard.stats[reason]
    with pytest.raises(RegistrationRefused) as info:
        guard.check(reg, op, observed, now)
    assert info.value.reason == reason
    assert reason in REFUSAL_REASONS
    assert guard.stats[reason] == before + 1
    return info.value


def test_accepts_and_returns_the_observed_address() -> None:
    guard = RegistrationGuard()
    assert guard.check(plain(), REG, HERE, NOW) == HERE
    assert guard.check(plain(address="192.0.2.7:40000"), REG, HERE, NOW + 5) == HERE
    assert guard.check(plain(), UNREG, HERE, NOW - 5) == HERE
    assert not guard.stats


def test_stale_either_way() -> None:
    guard = RegistrationGuard(max_skew=30.0)
    exc = refused(guard, plain(), "stale", now=NOW + 30.5)
    assert "30" in str(exc)
    refused(guard, plain(), "stale", now=NOW - 31)
    assert guard.check(plain(), REG, HERE, NOW + 30.0) == HERE
    with pytest.raises(ValueError, match="finite"):
        guard.check(plain(), REG, HERE, float("nan"))


def test_replay_at_the_edge_of_the_window() -> None:
    guard = RegistrationGuard(max_skew=30.0)
    reg = plain()
    assert guard.check(reg, REG, HERE, NOW) == HERE
    refused(guard, reg.model_copy(update={"weight": 3}), "replay", now=NOW + 30.0)
    refused(guard, reg.model_copy(update={"weight": 3}), "stale", now=NOW + 30.001)


def test_address_mismatch() -> None:
    guard = RegistrationGuard()
    exc = refused(guard, plain(address="192.0.2.7:40001"), "address_mismatch")
    assert "192.0.2.7:40001" in str(exc)
    refused(guard, plain(address="192.0.2.8:40000"), "address_mismatch")
    v6 = plain(address="[2001:db8::1]:80")
    assert guard.check(v6, REG, ("2001:db8:0::1", 80), NOW) == ("2001:db8:0::1", 80)


def test_replay_refused_but_identical_retransmission_accepted(owner: ServiceKey) -> None:
    guard = RegistrationGuard()
    captured = signed(owner, address="192.0.2.7:40000")
    assert guard.check(captured, REG, HERE, NOW) == HERE
    # The ack was lost: the sender retransmits the very same registration.
    assert guard.check(captured, REG, HERE, NOW + 2) == HERE
    assert guard.check(captured, REG, HERE, NOW + 29) == HERE
    # The same nonce with other content is a replay.
    changed = captured.model_copy(update={"weight": 9})
    refused(guard, changed, "replay", now=NOW + 3)
    unsigned = plain(nonce=bytes.fromhex(captured.nonce))
    refused(guard, unsigned, "replay", now=NOW + 3)
    # And so is the same message from another source (replayed by whoever captured it).
    anywhere = signed(owner)
    assert guard.check(anywhere, REG, HERE, NOW) == HERE
    refused(guard, anywhere, "replay", observed=ELSEWHERE, now=NOW + 1)
    # Once the window has passed, the captured message is stale, not accepted.
    refused(guard, captured, "stale", now=NOW + 31)


def test_register_signature_replayed_as_unregister_refused(owner: ServiceKey) -> None:
    guard = RegistrationGuard()
    reg = signed(owner)
    assert guard.check(reg, REG, HERE, NOW) == HERE
    refused(guard, reg, "replay", op=UNREG, now=NOW + 1)
    # Even to a router that never saw the registration, its signature does not unregister.
    refused(RegistrationGuard(), reg, "bad_signature", op=UNREG)
    unreg = signed(owner, op=UNREG)
    assert guard.check(unreg, UNREG, HERE, NOW + 1) == HERE


def test_refused_registration_does_not_burn_its_nonce() -> None:
    guard = RegistrationGuard()
    n = nonce()
    refused(guard, plain(address="192.0.2.7:1", nonce=n), "address_mismatch")
    assert guard.nonce_count == 0
    assert guard.check(plain(address="192.0.2.7:40000", nonce=n), REG, HERE, NOW) == HERE
    assert guard.nonce_count == 1


def test_bad_signatures(owner: ServiceKey) -> None:
    guard = RegistrationGuard()
    reg = signed(owner)
    refused(guard, reg.model_copy(update={"priority": 5}), "bad_signature")
    refused(guard, reg.model_copy(update={"signature": None}), "bad_signature")
    refused(guard, reg.model_copy(update={"signature": "00" * 64}), "bad_signature")
    assert guard.nonce_count == 0
    assert guard.check(reg, REG, HERE, NOW) == HERE


def test_not_certified(owner: ServiceKey, attacker: ServiceKey) -> None:
    guard = RegistrationGuard()
    # The attacker signs a registration for the owner's ID with its own key.
    reg = plain(owner.service_id())
    forged_unsigned = reg.model_copy(update={"public_key": attacker.public_key.raw.hex()})
    forged = forged_unsigned.model_copy(
        update={"signature": attacker.sign(forged_unsigned.signed_bytes(REG)).hex()}
    )
    assert forged.verify_signature(REG)
    refused(guard, forged, "not_certified")
    # A key only certifies a /256.
    prefix = plain(owner.service_id().prefix(96))
    keyed = prefix.model_copy(update={"public_key": owner.public_key.raw.hex()})
    refused(guard, keyed, "not_certified")


def test_certified_prefixes_need_the_certifying_key(
    owner: ServiceKey, attacker: ServiceKey
) -> None:
    block = ServicePrefix.parse("00004001/32")
    guard = RegistrationGuard(certified_prefixes=[block, "abcd/16"])
    victim = owner.service_id(block)
    # No key at all.
    exc = refused(guard, plain(victim), "key_required")
    assert str(block) in str(exc)
    # The attacker's own key (whose ID under the block is a different one).
    forged = plain(victim).model_copy(update={"public_key": attacker.public_key.raw.hex()})
    forged = forged.model_copy(update={"signature": attacker.sign(forged.signed_bytes(REG)).hex()})
    refused(guard, forged, "not_certified")
    # Prefixes inside the block, or covering it, cannot be registered either.
    refused(guard, plain(victim.prefix(128)), "key_required")
    refused(guard, plain(block), "key_required")
    refused(guard, plain("00/8"), "key_required")
    refused(guard, plain(ServicePrefix.default()), "key_required")
    # Outside the blocks, unsigned registrations are fine.
    assert guard.check(plain("00004002/32"), REG, HERE, NOW) == HERE
    assert guard.check(plain("echo"), REG, HERE, NOW) == HERE
    # The owner, signing, is accepted; so is an attacker for its own ID.
    assert guard.check(signed(owner, service=victim), REG, HERE, NOW) == HERE
    mine = attacker.service_id(block)
    assert guard.check(signed(attacker, service=mine), REG, HERE, NOW) == HERE
    assert guard.certified_block(ServicePrefix(victim, 256)) == block
    assert guard.certified_block(ServicePrefix.parse("00/8")) == block


def test_key_pinning_on_first_use(owner: ServiceKey, attacker: ServiceKey) -> None:
    guard = RegistrationGuard()
    sid = owner.service_id()
    # An unsigned unregistration of an ID never seen with a key does not pin anything.
    assert guard.check(plain(sid), UNREG, HERE, NOW) == HERE
    assert guard.pinned_key(sid) is None
    assert guard.check(signed(owner), REG, HERE, NOW) == HERE
    assert guard.pinned_key(sid) == owner.public_key.raw
    exc = refused(guard, plain(sid), "key_mismatch")
    assert "no key" in str(exc)
    refused(guard, plain(sid), "key_mismatch", op=UNREG)
    assert guard.check(signed(owner, op=UNREG), UNREG, HERE, NOW) == HERE
    assert guard.check(signed(owner), REG, HERE, NOW) == HERE
    # Prefixes are not pinned: only the exact ID.
    assert guard.check(plain(sid.prefix(200)), REG, HERE, NOW) == HERE
    assert guard.check(plain(attacker.service_id()), REG, HERE, NOW) == HERE


def test_pins_are_bounded_least_recently_used_first() -> None:
    guard = RegistrationGuard(max_pinned=2)
    keys = [ServiceKey.generate() for _ in range(3)]
    for key in keys[:2]:
        guard.check(signed(key), REG, HERE, NOW)
    guard.check(signed(keys[0]), REG, HERE, NOW)  # keys[0] is now the most recent
    guard.check(signed(keys[2]), REG, HERE, NOW)  # evicts keys[1]
    assert guard.pinned_count == 2
    assert guard.pinned_key(keys[1].service_id()) is None
    assert guard.check(plain(keys[1].service_id()), REG, HERE, NOW) == HERE
    refused(guard, plain(keys[0].service_id()), "key_mismatch")
    assert RegistrationGuard(max_pinned=0).check(plain(keys[0].service_id()), REG, HERE, NOW)


def test_nonce_store_is_bounded_by_age_and_per_source() -> None:
    guard = RegistrationGuard(max_skew=10.0, max_nonces=3, max_nonces_per_source=2)
    for i in range(2):
        guard.check(plain(now=NOW + i), REG, HERE, NOW + i)
    # HERE used its share: it is refused, and nobody else is.
    refused(guard, plain(now=NOW + 2), "quota", now=NOW + 2)
    guard.check(plain(now=NOW + 2), REG, ELSEWHERE, NOW + 2)
    assert guard.nonce_count == 3
    # Full: the oldest nonce is forgotten to make room (eviction by age), not everyone refused.
    third = ("203.0.113.5", 40000)
    guard.check(plain(now=NOW + 3), REG, third, NOW + 3)
    assert guard.nonce_count == 3 and guard.stats["nonce_evicted"] == 1
    guard.check(plain(now=NOW + 3), REG, HERE, NOW + 3)  # HERE's oldest left: room again
    # An identical retransmission needs no new slot.
    first = plain(now=NOW + 3)
    full = RegistrationGuard(max_skew=10.0, max_nonces=1)
    full.check(first, REG, HERE, NOW + 3)
    assert full.check(first, REG, HERE, NOW + 4) == HERE
    guard.purge(NOW + 100)
    assert guard.nonce_count == 0


def test_one_source_flooding_registrations_cannot_starve_others() -> None:
    guard = RegistrationGuard(max_skew=5.0, max_nonces=50)  # 5 per source by default
    quota = 0
    for i in range(2000):
        now = NOW + i * 0.05
        try:
            guard.check(plain(now=now), REG, ELSEWHERE, now)  # the flooder
        except RegistrationRefused as exc:
            assert exc.reason == "quota"
            quota += 1
        assert guard.nonce_count <= 50
        if i % 40 == 0:  # an honest host refreshing every 2 s is never refused
            assert guard.check(plain(now=now), REG, HERE, now) == HERE
    assert quota > 0 and guard.stats["quota"] == quota


def test_guard_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        RegistrationGuard(max_skew=0)
    with pytest.raises(ValueError):
        RegistrationGuard(max_skew=float("nan"))
    with pytest.raises(ValueError):
        RegistrationGuard(max_nonces=0)
    with pytest.raises(ValueError):
        RegistrationGuard(max_pinned=-1)
    with pytest.raises(ValueError, match="REGISTER or UNREGISTER"):
        RegistrationGuard().check(plain(), MessageKind.ACK, HERE, NOW)


def test_full_exchange_through_the_wire(owner: ServiceKey) -> None:
    """A router decodes a REGISTER, checks each registration and acks each one."""
    guard = RegistrationGuard(certified_prefixes=["00004001/32"])
    regs = [
        signed(owner, service=owner.service_id("00004001/32")),
        plain(owner.service_id("00004001/32")),
        plain("echo", address="192.0.2.7:40000"),
    ]
    msg = decode_message(encode_message(RegisterMessage(seq=42, registrations=regs)))
    assert isinstance(msg, RegisterMessage)
    results = []
    for reg in msg.registrations:
        try:
            guard.check(reg, msg.kind, HERE, NOW + 1)
        except RegistrationRefused as exc:
            results.append(RegistrationResult(ok=False, reason=exc.reason))
        else:
            results.append(RegistrationResult(ok=True))
    ack = decode_message(encode_message(AckMessage(seq=msg.seq, results=results)))
    assert ack == AckMessage(
        seq=42,
        results=[
            RegistrationResult(ok=True),
            RegistrationResult(ok=False, reason="key_required"),
            RegistrationResult(ok=True),
        ],
    )
