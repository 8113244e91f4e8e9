"""Prometheus metrics of hosts, routers and translators (the optional extra ``[metrics]``).

A :class:`MetricsExporter` holds the components to report on and, at each scrape, reads
their counters (nothing is counted twice or kept apart from the components' own state):

* ``pyserval_packets_received_total``: SAL packets a host took in;
* ``pyserval_packet_events_total{event}``: what the host core did with them (forwarded
  SYNs and datagrams, RSTs sent, ICMP errors...), and ``pyserval_forwarded_syns_total``;
* ``pyserval_drops_total{reason}``: packets dropped, by the core's reason;
* ``pyserval_connections{state}``: live connections by state;
* ``pyserval_retransmissions_total``: data segments sent again (live and ended flows);
* ``pyserval_rtt_seconds``: a histogram of the smoothed RTT of every path of the
  established connections, taken at the scrape (the paths as they are, not a history);
* ``pyserval_handshake_rtt_seconds``: a histogram of each connection's first RTT sample
  (its handshake), kept since the host was added: the history;
* ``pyserval_registrations_total{event}``, ``pyserval_instances`` (routers),
  ``pyserval_registration_messages_total{event}``, ``pyserval_services_acknowledged``
  (hosts registering with a router);
* ``pyserval_translator_connections_total{outcome}``, ``pyserval_translator_bytes_total
  {direction}``, ``pyserval_translator_active`` (translators).

Every sample carries ``role`` (host, router, translator) and ``instance`` (a name given to
:meth:`add_host` and friends). :meth:`MetricsExporter.serve` answers ``GET /metrics`` on
an asyncio server of its own, on the event loop the components run on, so reading their
state needs no lock. It does not push anywhere and keeps no history.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Final

from .runtime.host import Host, parse_address
from .sal.inet import Address
from .transport.connection import State
from .transport.events import ConnectionEstablished, Event, IncomingConnection

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from .control.router import Router
    from .translator import Translator

try:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )
except ImportError:  # pragma: no cover - exercised only without the extra
    _MISSING = True
else:
    _MISSING = False

__all__ = ["RTT_BUCKETS", "MetricsExporter", "MetricsUnavailable"]

RTT_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_REQUEST_LIMIT: Final = 8192  # bytes of request head read before answering


class MetricsUnavailable(RuntimeError):
    """``prometheus-client`` is not installed (``pip install 'pyserval[metrics]'``)."""


def _labels(role: str, instance: str) -> list[str]:
    return [role, instance]


class _PyservalCollector:
    """Reads the components' counters at each scrape (a prometheus-client collector)."""

    def __init__(self, exporter: MetricsExporter) -> None:
        self.exporter = exporter

    def collect(self) -> Iterator[Metric]:
        yield from self.exporter.metrics()


class MetricsExporter:
    """Prometheus metrics of the hosts, routers and translators added to it."""

    def __init__(self) -> None:
        if _MISSING:
            raise MetricsUnavailable(
                "metrics need the prometheus-client package: pip install 'pyserval[metrics]'"
            )
        self.hosts: list[tuple[str, str, Host]] = []  # (role, instance, host)
        self._handshakes = _Histogram(
            "pyserval_handshake_rtt_seconds",
            "First RTT sample of each connection (its handshake)",
            ["role", "instance"],
        )
        self.routers: list[tuple[str, Router]] = []
        self.translators: list[tuple[str, Translator]] = []
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_PyservalCollector(self))
        self._server: asyncio.Server | None = None

    # -- what to report on ------------------------------------------------------------
    def add_host(self, host: Host, instance: str = "host", *, role: str = "host") -> None:
        """Report on ``host`` (its packets, drops, connections, registrations)."""
        self.hosts.append((role, instance, host))
        key = [role, instance]

        def on_event(event: Event) -> None:
            core = host.core
            if core is not None and isinstance(event, ConnectionEstablished | IncomingConnection):
                conn = core.connections.get(event.conn_id)
                srtt = conn.primary.rtt.srtt if conn is not None and conn.subflows else None
                if srtt is not None:
                    self._handshakes.observe(key, srtt)

        host.add_event_hook(on_event)

    def add_router(self, router: Router, instance: str = "router") -> None:
        """Report on ``router``: its host's packets and its registry."""
        self.routers.append((instance, router))
        self.add_host(router.host, instance, role="router")

    def add_translator(self, translator: Translator, instance: str = "translator") -> None:
        """Report on ``translator``: its connections and bytes, and its host's packets."""
        self.translators.append((instance, translator))
        self.add_host(translator.host, instance, role="translator")

    # -- exposition -------------------------------------------------------------------
    def render(self) -> bytes:
        """The metrics in the Prometheus text format."""
        data: bytes = generate_latest(self.registry)
        return data

    def metrics(self) -> Iterable[Metric]:
        """Every metric family, read now."""
        names = ["role", "instance"]
        received = CounterMetricFamily(
            "pyserval_packets_received", "SAL packets received", labels=names
        )
        events = CounterMetricFamily(
            "pyserval_packet_events",
            "What the host core did with packets (forwarded, RST sent, ICMP errors...)",
            labels=[*names, "event"],
        )
        syns = CounterMetricFamily(
            "pyserval_forwarded_syns", "SYNs forwarded towards a service instance", labels=names
        )
        drops = CounterMetricFamily(
            "pyserval_drops", "Packets dropped, by reason", labels=[*names, "reason"]
        )
        conns = GaugeMetricFamily(
            "pyserval_connections", "Live connections by state", labels=[*names, "state"]
        )
        retrans = CounterMetricFamily(
            "pyserval_retransmissions", "Data segments sent again", labels=names
        )
        rtt = _Histogram(
            "pyserval_rtt_seconds", "Smoothed RTT of established paths at scrape time", names
        )
        reg_msgs = CounterMetricFamily(
            "pyserval_registration_messages",
            "Registration messages a host's controller sent or received",
            labels=[*names, "event"],
        )
        acknowledged = GaugeMetricFamily(
            "pyserval_services_acknowledged",
            "Services of a host the router last acknowledged",
            labels=names,
        )
        for role, instance, host in self.hosts:
            key = _labels(role, instance)
            core = host.core
            if core is None:
                continue
            received.add_metric(key, core.received)
            for event, n in sorted(core.stats.items()):
                events.add_metric([*key, event], n)
            syns.add_metric(key, core.stats.get("forwarded_syn", 0))
            for reason, n in sorted(core.drops.items()):
                drops.add_metric([*key, reason], n)
            states: dict[str, int] = {}
            resent = core.stats.get("retransmissions_ended", 0)
            for conn in core.connections.values():
                states[conn.state.value] = states.get(conn.state.value, 0) + 1
                established = conn.state is State.ESTABLISHED
                for sf in conn.subflows:
                    resent += sf.retransmissions
                    if established and sf.rtt.srtt is not None:
                        rtt.observe(key, sf.rtt.srtt)
            for state, n in sorted(states.items()):
                conns.add_metric([*key, state], n)
            retrans.add_metric(key, resent)
            controller: Any = host.controller
            ctl_core = getattr(controller, "core", None)
            if ctl_core is not None:
                for event, n in sorted(getattr(ctl_core, "stats", {}).items()):
                    reg_msgs.add_metric([*key, event], n)
                acknowledged.add_metric(key, len(getattr(ctl_core, "accepted", ())))
        yield from (received, events, syns, drops, conns, retrans)
        yield rtt.family()
        yield self._handshakes.family()
        yield from (reg_msgs, acknowledged)
        yield from self._router_metrics()
        yield from self._translator_metrics()

    def _router_metrics(self) -> Iterator[Metric]:
        names = ["role", "instance"]
        regs = CounterMetricFamily(
            "pyserval_registrations",
            "Registrations a router took, refreshed, removed or refused",
            labels=[*names, "event"],
        )
        instances = GaugeMetricFamily(
            "pyserval_instances", "Service instances registered at a router", labels=names
        )
        for instance, router in self.routers:
            key = ["router", instance]
            for event, n in sorted(router.registry.stats.items()):
                regs.add_metric([*key, event], n)
            instances.add_metric(key, len(router.registry))
        yield regs
        yield instances

    def _translator_metrics(self) -> Iterator[Metric]:
        names = ["role", "instance"]
        outcomes = CounterMetricFamily(
            "pyserval_translator_connections",
            "Translated connections by outcome",
            labels=[*names, "outcome"],
        )
        volume = CounterMetricFamily(
            "pyserval_translator_bytes",
            "Bytes relayed over connections that ended",
            labels=[*names, "direction"],
        )
        active = GaugeMetricFamily(
            "pyserval_translator_active", "Connections being translated", labels=names
        )
        for instance, tr in self.translators:
            key = ["translator", instance]
            st = tr.stats
            for outcome in ("accepted", "refused", "failed", "closed", "reset"):
                outcomes.add_metric([*key, outcome], getattr(st, outcome))
            volume.add_metric([*key, "tcp_to_serval"], st.tcp_to_serval)
            volume.add_metric([*key, "serval_to_tcp"], st.serval_to_tcp)
            active.add_metric(key, tr.active)
        yield outcomes
        yield volume
        yield active

    # -- HTTP -------------------------------------------------------------------------
    async def serve(self, address: str | Address) -> Address:
        """Answer ``GET /metrics`` at ``address`` (``"IP:PORT"``; port 0 picks one);
        returns the bound address. Stopped by :meth:`close`."""
        host, port = parse_address(address) if isinstance(address, str) else address
        self._server = await asyncio.start_server(self._handle, host, port)
        bound = self._server.sockets[0].getsockname()
        return str(bound[0]), int(bound[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            writer.close()
            return
        request_line = head[:_REQUEST_LIMIT].split(b"\r\n", 1)[0].split()
        path = request_line[1].split(b"?", 1)[0] if len(request_line) >= 2 else b""
        if request_line[:1] in ([b"GET"], [b"HEAD"]) and path in (b"/metrics", b"/"):
            body = self.render()
            status = b"200 OK"
            ctype = b"text/plain; version=0.0.4; charset=utf-8"
        else:
            body, status, ctype = b"not found\n", b"404 Not Found", b"text/plain"
        writer.write(
            b"HTTP/1.1 "
            + status
            + b"\r\nContent-Type: "
            + ctype
            + b"\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\nConnection: close\r\n\r\n"
            + (body if request_line[:1] != [b"HEAD"] else b"")
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async def close(self) -> None:
        """Stop answering."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None


class _Histogram:
    """Buckets filled at scrape time, per label set (prometheus-client's Histogram keeps
    a history; these are the live paths' RTTs now)."""

    def __init__(self, name: str, documentation: str, labels: list[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = labels
        self.series: dict[tuple[str, ...], tuple[list[int], float]] = {}

    def observe(self, key: list[str], value: float) -> None:
        counts, total = self.series.get(tuple(key), ([0] * (len(RTT_BUCKETS) + 1), 0.0))
        for i, bound in enumerate(RTT_BUCKETS):
            if value <= bound:
                counts[i] += 1
        counts[-1] += 1  # +Inf
        self.series[tuple(key)] = (counts, total + value)

    def family(self) -> Metric:
        fam = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        for key, (counts, total) in self.series.items():
            buckets = [(str(b), counts[i]) for i, b in enumerate(RTT_BUCKETS)]
            buckets.append(("+Inf", counts[-1]))
            fam.add_metric(list(key), buckets, total)
        return fam
