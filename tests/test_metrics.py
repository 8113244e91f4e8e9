"""Prometheus metrics of hosts, routers and translators (issue 16), scraped over HTTP.

The scrape is parsed with prometheus-client's own text parser, and each value is checked
against what the test did (connections made, junk packets sent), not recomputed.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys

import anyio
import pytest

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families

import pyserval
from pyserval.control import Router
from pyserval.metrics import MetricsExporter
from pyserval.runtime.host import Host
from pyserval.runtime.streams import ServalStream
from pyserval.translator import Translator

from .helpers.processes import ROOT, child_env

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def _get(address: tuple[str, int], path: str = "/metrics") -> tuple[str, str]:
    reader, writer = await asyncio.open_connection(*address)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    return head.split("\r\n", 1)[0], body


def _samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def _echo(stream: ServalStream) -> None:
    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
        while True:
            await stream.send(await stream.receive())


def test_scrape_counts_what_the_network_did() -> None:
    async def main() -> None:
        exporter = MetricsExporter()
        async with Router("127.0.0.1:0") as router:
            r = router.address_text
            async with (
                Host(["127.0.0.1:0"], router=r) as server,
                Host(["127.0.0.1:0"], router=r) as client,
            ):
                exporter.add_router(router)
                exporter.add_host(server, "server")
                exporter.add_host(client, "client")
                address = await exporter.serve("127.0.0.1:0")
                listener = await server.listen("metrics-echo")
                serving = asyncio.ensure_future(listener.serve(_echo))
                async with asyncio.timeout(5):
                    while not len(router.registry):
                        await asyncio.sleep(0.01)
                for _ in range(2):  # two connections made and closed
                    s = await client.connect("metrics-echo", timeout=5)
                    await s.send(b"x")
                    await s.receive()
                    await s.aclose()
                live = await client.connect("metrics-echo", timeout=5)
                await live.send(b"hello")
                assert await live.receive() == b"hello"
                junk = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                for _ in range(3):
                    junk.sendto(b"\x01\x02\x03", router.address)
                junk.close()
                async with asyncio.timeout(5):
                    while router.host.core is not None and not router.host.core.drops:
                        await asyncio.sleep(0.01)
                status, body = await _get(address)
                assert status == "HTTP/1.1 200 OK"
                m = _samples(body)
                rl = {"role": "router", "instance": "router"}
                sl = {"role": "host", "instance": "server"}
                cl = {"role": "host", "instance": "client"}
                assert _value(m, "pyserval_forwarded_syns_total", **rl) == 3
                assert _value(m, "pyserval_drops_total", **rl, reason="short_header") == 3
                assert _value(m, "pyserval_instances", **rl) == 1
                assert _value(m, "pyserval_registrations_total", **rl, event="registered") == 1
                assert _value(m, "pyserval_services_acknowledged", **sl) == 1
                assert _value(m, "pyserval_connections", **cl, state="established") == 1
                assert _value(m, "pyserval_retransmissions_total", **cl) == 0
                assert _value(m, "pyserval_packets_received_total", **rl) >= 3 + 3
                # One live path at the client: its RTT is in every bucket from its own up.
                assert _value(m, "pyserval_rtt_seconds_count", **cl) == 1
                assert _value(m, "pyserval_rtt_seconds_bucket", **cl, le="+Inf") == 1
                assert _value(m, "pyserval_rtt_seconds_bucket", **cl, le="1.0") == 1
                assert 0 < _value(m, "pyserval_rtt_seconds_sum", **cl) < 1.0
                # Every connection's handshake RTT was kept: 3 at the client (the first two
                # have ended), 3 at the server.
                assert _value(m, "pyserval_handshake_rtt_seconds_count", **cl) == 3
                assert _value(m, "pyserval_handshake_rtt_seconds_count", **sl) == 3
                assert _value(m, "pyserval_handshake_rtt_seconds_bucket", **cl, le="1.0") == 3
                status, _ = await _get(address, "/other")
                assert status == "HTTP/1.1 404 Not Found"
                await live.aclose()
                serving.cancel()
                await exporter.close()

    asyncio.run(main())


def test_translator_metrics() -> None:
    async def main() -> None:
        exporter = MetricsExporter()
        translator = Translator(
            "tcp:127.0.0.1:0", "service:metrics-t", routes={"metrics-t": "127.0.0.1:9"}
        )
        async with translator:
            exporter.add_translator(translator, "t1")
            assert translator.tcp_address is not None
            _, writer = await asyncio.open_connection(*translator.tcp_address)
            async with asyncio.timeout(5):
                while translator.stats.accepted == 0:
                    await asyncio.sleep(0.01)
            m = _samples(exporter.render().decode())
            tl = {"role": "translator", "instance": "t1"}
            assert _value(m, "pyserval_translator_connections_total", **tl, outcome="accepted") == 1
            assert _value(m, "pyserval_translator_active", **tl) in (0, 1)
            assert ("pyserval_packets_received_total", frozenset(tl.items())) in m
            writer.close()

    asyncio.run(main())


def test_router_metrics_option_on_the_command_line() -> None:
    async def main() -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pyserval", "router", "--listen", "127.0.0.1:0",
            "--metrics", "127.0.0.1:0",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=child_env(), cwd=ROOT,
        )  # fmt: skip
        assert proc.stdout is not None
        try:
            lines = [(await asyncio.wait_for(proc.stdout.readline(), 15)).decode()]
            lines.append((await asyncio.wait_for(proc.stdout.readline(), 15)).decode())
            (url,) = [x.split()[-1] for x in lines if x.startswith("metrics at ")]
            hostport = url.removeprefix("http://").removesuffix("/metrics")
            ip, port = hostport.rsplit(":", 1)
            status, body = await _get((ip, int(port)))
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 10)
        assert status == "HTTP/1.1 200 OK"
        m = _samples(body)
        assert _value(m, "pyserval_instances", role="router", instance="router") == 0

    asyncio.run(main())


def test_library_is_quiet_by_default() -> None:
    import logging

    handlers = logging.getLogger("pyserval").handlers
    assert any(isinstance(h, logging.NullHandler) for h in handlers)
    assert pyserval.__name__ == "pyserval"
