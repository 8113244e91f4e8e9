"""Hypothesis strategies for SAL packets (shared by the codec tests)."""

from __future__ import annotations

from hypothesis import strategies as st

from pyserval.naming import ServiceID
from pyserval.sal import (
    AddAddrExt,
    AddressExt,
    ControlExt,
    DssExt,
    Extension,
    JoinExt,
    MpCapableExt,
    PadExt,
    RelayExt,
    SalPacket,
    ServiceExt,
    SourceExt,
    SourcePortsExt,
    TcpHeader,
    TcpOption,
    UdpHeader,
    UnknownExt,
)

u32 = st.integers(min_value=0, max_value=0xFFFFFFFF)
u16 = st.integers(min_value=0, max_value=0xFFFF)
ipv4 = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))
service_ids = st.integers(min_value=0, max_value=(1 << 256) - 1).map(ServiceID)

control_exts = st.builds(
    ControlExt,
    st.integers(0, 255),
    u32,
    u32,
    st.binary(min_size=8, max_size=8),
    st.integers(0, 255),
)
service_exts = st.builds(ServiceExt, service_ids, u16)
address_exts = st.builds(AddressExt, u32, u32, st.lists(ipv4, max_size=5).map(tuple), u16)
source_exts = st.builds(SourceExt, st.lists(ipv4, min_size=2, max_size=20).map(tuple), u16)
source_ports_exts = st.builds(SourcePortsExt, st.lists(u16, min_size=2, max_size=20).map(tuple))
u64 = st.integers(min_value=0, max_value=2**64 - 1)
multipath_exts = st.one_of(
    st.builds(MpCapableExt, u64),
    st.builds(DssExt, st.integers(0, 3), u64, u64),
    st.builds(JoinExt, u32, st.binary(min_size=8, max_size=8)),
    st.builds(AddAddrExt, st.tuples(ipv4, u16)),
    st.builds(RelayExt, st.tuples(ipv4, u16), st.binary(min_size=8, max_size=8)),
)
unknown_exts = st.builds(
    lambda t, body: UnknownExt(t, bytes((t << 4, 2 + len(body))) + body),
    st.sampled_from([10, 11, 13, 14]),  # 12 is RELAY, 15 is IP6
    st.binary(max_size=30),
)
extensions: st.SearchStrategy[Extension] = st.one_of(
    control_exts,
    service_exts,
    address_exts,
    source_exts,
    source_ports_exts,
    multipath_exts,
    unknown_exts,
    st.just(PadExt()),
)

tcp_options = st.one_of(
    st.just(TcpOption.nop()),
    st.integers(0, 0xFFFF).map(TcpOption.mss),
    st.integers(0, 14).map(TcpOption.window_scale),
    st.just(TcpOption.sack_permitted()),
    st.lists(st.tuples(u32, u32), min_size=1, max_size=3).map(TcpOption.sack),
    st.tuples(u32, u32).map(lambda t: TcpOption.timestamps(*t)),
    st.just(TcpOption.compact_close()),
    # RFC 6994's experimental kind with another ExID (or none): not the compact close.
    st.binary(max_size=4).map(lambda data: TcpOption(253, data)),
)


@st.composite
def tcp_headers(draw: st.DrawFn) -> TcpHeader:
    opts: list[TcpOption] = []
    size = 0
    for opt in draw(st.lists(tcp_options, max_size=6)):
        if size + opt.length <= 40:
            opts.append(opt)
            size += opt.length
    if size % 4:
        pad = 4 - size % 4
        opts.append(TcpOption.eol())
        padding = bytes(pad - 1)
    else:
        padding = b""
    return TcpHeader(
        seq=draw(u32),
        ack=draw(u32),
        flags=draw(st.integers(0, 0xFFF)),
        window=draw(u16),
        checksum=draw(u16),
        urgent=draw(u16),
        options=opts,
        option_padding=padding,
    )


@st.composite
def packets(draw: st.DrawFn) -> SalPacket:
    exts: list[Extension] = []
    counted = 0
    for ext in draw(st.lists(extensions, max_size=12)):
        if not isinstance(ext, PadExt):
            if counted == 10:
                continue
            counted += 1
        exts.append(ext)
    protocol = draw(st.sampled_from([6, 17]))
    with_transport = draw(st.booleans())
    if not with_transport:
        return SalPacket(draw(u32), draw(u32), protocol, exts, None, b"")
    transport: TcpHeader | UdpHeader = (
        draw(tcp_headers()) if protocol == 6 else UdpHeader(checksum=draw(u16))
    )
    payload = draw(st.binary(max_size=300))
    return SalPacket(draw(u32), draw(u32), protocol, exts, transport, payload)
