"""A small etcd v3 client over etcd's JSON gateway (``/v3/...``), on httpx.

Only what a router cluster needs: lease grant / keepalive / revoke, a paged range read of a
prefix at one revision, transactions of puts and deletes, and a watch stream of a prefix
from a revision. Keys and values are bytes (the gateway carries them base64-encoded).

Several member URLs may be given: a call that cannot reach one member moves on to the next
(:attr:`EtcdClient.endpoint`), so losing one member of three costs at most one failed call.
A watch does not reconnect by itself: it raises :class:`EtcdUnavailable` and the caller
resynchronises (a full read, then a watch from the revision after it), which is the only
way to be sure nothing was missed.

Why the gateway and not a gRPC client: see the README (section "Router clusters").
This module does no retry policy beyond trying each member once per call.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

import httpx

__all__ = ["EtcdClient", "EtcdError", "EtcdUnavailable", "KeyValue", "WatchEvent", "prefix_end"]

_MAX_TXN_OPS: Final = 128  # etcd's default --max-txn-ops
_PAGE: Final = 5000  # keys per range page (well under the gateway's 4 MiB response limit)
_MAX_LINE: Final = 64 << 20  # longest watch message taken (bounded buffer)


class EtcdError(Exception):
    """etcd answered, but not with success (the message says what it said)."""


class EtcdUnavailable(EtcdError):
    """No member could be reached (or a stream broke off)."""


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One key as read: its value, the revision it was last modified at, its lease."""

    key: bytes
    value: bytes
    mod_revision: int
    lease: int


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """A PUT (``value`` set) or DELETE (``value`` None) of ``key`` at ``revision``."""

    key: bytes
    value: bytes | None
    revision: int


def prefix_end(prefix: bytes) -> bytes:
    """The range end that selects every key starting with ``prefix``."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\x00"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any) -> bytes:
    return base64.b64decode(text) if isinstance(text, str) else b""


def _int(value: Any) -> int:
    # The gateway writes int64 fields as JSON strings (and omits zeros).
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


class EtcdClient:
    """etcd v3 through the JSON gateway of one of ``endpoints`` (``http://IP:PORT``)."""

    def __init__(self, endpoints: Sequence[str], *, timeout: float = 2.0) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint (http://IP:PORT) is needed")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self._current = 0
        self.timeout = timeout
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(timeout))
        self.calls = 0
        self.failovers = 0

    @property
    def endpoint(self) -> str:
        """The member calls go to now."""
        return self.endpoints[self._current]

    def next_endpoint(self) -> None:
        """Move on to the next member (after a broken stream, say)."""
        self._current = (self._current + 1) % len(self.endpoints)
        self.failovers += 1

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self._http.aclose()

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        last: Exception | None = None
        for _ in range(len(self.endpoints)):
            self.calls += 1
            try:
                resp = await self._http.post(self.endpoint + path, json=body)
            except httpx.HTTPError as exc:
                last = exc
                self.next_endpoint()
                continue
            try:
                data = resp.json()
            except ValueError:
                data = {}
            if resp.status_code == 503 or (
                isinstance(data, dict) and "no leader" in str(data.get("message", ""))
            ):
                # A member cut off from the others: another one may have a leader.
                last = EtcdUnavailable(f"{self.endpoint}: {data.get('message', resp.text)}")
                self.next_endpoint()
                continue
            if resp.status_code != 200 or not isinstance(data, dict):
                raise EtcdError(f"{self.endpoint}{path}: HTTP {resp.status_code}: {resp.text}")
            if "error" in data:
                raise EtcdError(f"{self.endpoint}{path}: {data.get('message', data['error'])}")
            return data
        raise EtcdUnavailable(f"no etcd member answered ({', '.join(self.endpoints)}): {last}")

    # -- leases ---------------------------------------------------------------------------
    async def grant(self, ttl: int) -> tuple[int, int]:
        """A new lease of ``ttl`` seconds: ``(id, granted ttl)``."""
        data = await self._call("/v3/lease/grant", {"TTL": ttl})
        return _int(data.get("ID")), _int(data.get("TTL"))

    async def keepalive(self, lease: int) -> int:
        """Refresh ``lease``; its TTL now (0 or less: the lease is gone)."""
        data = await self._call("/v3/lease/keepalive", {"ID": lease})
        result = data.get("result", data)
        return _int(result.get("TTL")) if isinstance(result, dict) else 0

    async def revoke(self, lease: int) -> None:
        """End ``lease`` now: every key attached to it is deleted."""
        await self._call("/v3/lease/revoke", {"ID": lease})

    # -- keys -----------------------------------------------------------------------------
    async def range_prefix(self, prefix: bytes) -> tuple[int, list[KeyValue]]:
        """Every key under ``prefix`` as of one revision: ``(revision, keys)``.

        Read in pages, all at the revision of the first page, so the result is one
        consistent snapshot.
        """
        end = prefix_end(prefix)
        start = prefix
        revision = 0
        out: list[KeyValue] = []
        while True:
            body: dict[str, Any] = {
                "key": _b64(start),
                "range_end": _b64(end),
                "limit": _PAGE,
            }
            if revision:
                body["revision"] = revision
            data = await self._call("/v3/kv/range", body)
            if not revision:
                revision = _int(data.get("header", {}).get("revision"))
            kvs = data.get("kvs", [])
            for kv in kvs:
                out.append(
                    KeyValue(
                        _unb64(kv.get("key")),
                        _unb64(kv.get("value")),
                        _int(kv.get("mod_revision")),
                        _int(kv.get("lease")),
                    )
                )
            if not data.get("more") or not kvs:
                return revision, out
            start = out[-1].key + b"\x00"

    async def txn(self, ops: Sequence[tuple[bytes, bytes | None]], lease: int = 0) -> int:
        """Puts (value bytes) and deletes (value None), in transactions of at most 128;
        the revision after the last."""
        revision = 0
        for i in range(0, len(ops), _MAX_TXN_OPS):
            chunk = ops[i : i + _MAX_TXN_OPS]
            success: list[dict[str, Any]] = []
            for key, value in chunk:
                if value is None:
                    success.append({"request_delete_range": {"key": _b64(key)}})
                else:
                    put: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
                    if lease:
                        put["lease"] = lease
                    success.append({"request_put": put})
            data = await self._call("/v3/kv/txn", {"success": success})
            revision = _int(data.get("header", {}).get("revision"))
        return revision

    # -- watch ----------------------------------------------------------------------------
    async def watch(self, prefix: bytes, start_revision: int) -> AsyncIterator[list[WatchEvent]]:
        """Batches of events under ``prefix`` from ``start_revision`` on, until the stream
        breaks (:class:`EtcdUnavailable`) or etcd cancels it (:class:`EtcdError`, e.g. the
        revision was compacted: read everything again)."""
        body = {
            "create_request": {
                "key": _b64(prefix),
                "range_end": _b64(prefix_end(prefix)),
                "start_revision": start_revision,
            }
        }
        timeout = httpx.Timeout(self.timeout, read=None)  # a quiet prefix is no failure
        try:
            async with self._http.stream(
                "POST", self.endpoint + "/v3/watch", json=body, timeout=timeout
            ) as resp:
                if resp.status_code != 200:
                    raise EtcdError(f"watch: HTTP {resp.status_code}")
                buffer = b""
                async for chunk in resp.aiter_bytes():
                    buffer += chunk
                    if len(buffer) > _MAX_LINE:
                        raise EtcdError("watch: a message larger than 64 MiB")
                    while b"\n" in buffer:
                        line, _, buffer = buffer.partition(b"\n")
                        if line.strip():
                            events = self._watch_message(line)
                            if events:
                                yield events
        except httpx.HTTPError as exc:
            self.next_endpoint()
            raise EtcdUnavailable(f"watch stream broke: {exc!r}") from exc
        self.next_endpoint()
        raise EtcdUnavailable("watch stream ended")

    @staticmethod
    def _watch_message(line: bytes) -> list[WatchEvent]:
        try:
            data = json.loads(line)
        except ValueError:
            raise EtcdError(f"watch: not JSON: {line[:200]!r}") from None
        if "error" in data:
            raise EtcdUnavailable(f"watch: {data['error']}")
        result = data.get("result", {})
        if result.get("canceled") or _int(result.get("compact_revision")):
            raise EtcdError(f"watch canceled by etcd: {result.get('cancel_reason', result)}")
        out: list[WatchEvent] = []
        for ev in result.get("events", []):
            kv = ev.get("kv", {})
            deleted = ev.get("type") == "DELETE"
            out.append(
                WatchEvent(
                    _unb64(kv.get("key")),
                    None if deleted else _unb64(kv.get("value")),
                    _int(kv.get("mod_revision")),
                )
            )
        return out
