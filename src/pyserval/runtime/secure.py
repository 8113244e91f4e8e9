"""Secure channels named by serviceID: TLS 1.3 where the name is the key.

``host.listen(sid, key=key, secure=True)`` serves TLS 1.3 with a certificate for the
service's Ed25519 key (or, with ``delegation=``, for an instance key the service key
delegated to); ``host.connect(sid, secure=True)`` accepts the handshake only if the key the
server proved certifies ``sid`` -- directly (the 160-bit hash check of
:meth:`ServicePublicKey.certifies <pyserval.naming.keys.ServicePublicKey.certifies>`) or
through a valid :class:`~pyserval.naming.delegation.Delegation` carried in the certificate.
No certificate authority, no host name, no pinning file: the serviceID the client asked for
is the only thing it trusts.

Why a check after the handshake is sound
----------------------------------------
Python's ``ssl`` cannot call back into Python while OpenSSL verifies a certificate, so the
client context verifies nothing (``CERT_NONE``, no host name) and :func:`check_peer`
examines the peer's certificate (``getpeercert(binary_form=True)``) once the handshake is
complete, before :meth:`Host.connect` returns -- so before the application can send or read
a single byte. That is as strong as checking during the handshake because of what a
completed TLS 1.3 handshake already guarantees whatever the verify mode (RFC 8446 4.4.3):

* the server's CertificateVerify is a signature, by the private key of the certificate it
  sent, over the transcript hash of the handshake so far -- this ClientHello with its random
  nonce and key share, and the server's key share. OpenSSL checks that signature in every
  verify mode (the mode only governs the chain of issuers, which we do not use); a server
  that cannot sign with the certificate's key cannot complete the handshake;
* the Finished messages confirm both sides saw the same transcript, and the traffic keys
  come from the (EC)DHE exchange that transcript contains.

(``tests/test_secure_delegation.py`` shows the installed OpenSSL refusing, under this very
client context, a server that presents a certificate but signs with another key.) So after
the handshake the certificate's public key is proven to belong to whoever holds
the session keys. What remains is exactly the question a CA would answer -- may this key
speak for the name? -- and :func:`check_peer` answers it from the serviceID itself: the
key's hash is the ID's low 160 bits, or the certificate carries a delegation, signed by a
key whose hash is, naming this key, valid now. The certificate's own signature, its subject
and its validity dates are deliberately ignored: they prove nothing here. Things that would
make the late check unsound are switched off: TLS below 1.3 (no CertificateVerify of this
kind; refused), session resumption (no certificate in a resumed handshake; servers issue no
tickets and clients offer none), and 0-RTT data (never enabled). Data a server sends right
after its Finished (TLS 1.3 allows it) waits in the TLS buffer: the stream reaches the
application only after the check.

The server does not authenticate the client (TLS without client certificates), just as a
web server does not: the channel proves the service to the client.

What this module does not do: revocation (a delegation ends by expiring; a leaked service
key can only be retired by moving to a new serviceID), hide who talks to which serviceID
(the SAL header carries it in clear, and sizes and timing show through), or secure IDs
made from names (``ServiceID.from_name``): no key hashes to them, so ``secure=True``
refuses them and ``ssl_context=`` takes a context of your own PKI instead.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import enum
import functools
import logging
import os
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import anyio
import anyio.abc
from anyio.streams.tls import TLSStream
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

from ..errors import ConnectionStateError, ServalConnectError, ServalConnectTimeout
from ..naming.delegation import Delegation, DelegationProblem, InvalidDelegation
from ..naming.keys import ServiceKey, ServicePublicKey
from ..naming.service_id import ServiceID, ServiceLike, as_service_id
from ..sal.inet import Address
from ..transport.connection import Connection
from .streams import ServalListener, ServalStream

__all__ = [
    "DELEGATION_OID",
    "HandshakeFailure",
    "PeerIdentity",
    "SecureListener",
    "SecureStream",
    "SecurityReason",
    "ServalSecurityError",
    "certificate_for",
    "check_peer",
    "check_securable",
    "client_context",
    "secure_client",
    "server_context",
]

LOGGER = logging.getLogger("pyserval.secure")

# The X.509 extension that carries a Delegation (its 149-byte encoding as the extension's
# value). An OID under 2.25 is a UUID (ITU-T X.667): unique without registering an arc.
DELEGATION_OID: Final = x509.ObjectIdentifier("2.25.61688400350514821781129649240350287048")
_HANDSHAKE_TIMEOUT: Final = 10.0


class SecurityReason(enum.Enum):
    """Why a secure channel was refused."""

    NOT_SELF_CERTIFYING = "not_self_certifying"  # a name: no key hashes to it
    HANDSHAKE_FAILED = "handshake_failed"  # no TLS 1.3 handshake (a plaintext peer, ...)
    NO_CERTIFICATE = "no_certificate"
    BAD_CERTIFICATE = "bad_certificate"  # unparsable, or not an Ed25519 key
    WRONG_KEY = "wrong_key"  # the key does not certify the ID and has no delegation
    DELEGATION_MALFORMED = "delegation_malformed"
    DELEGATION_WRONG_SERVICE = "delegation_wrong_service"
    DELEGATION_FORGED = "delegation_forged"
    DELEGATION_WRONG_INSTANCE = "delegation_wrong_instance"
    DELEGATION_NOT_YET_VALID = "delegation_not_yet_valid"
    DELEGATION_EXPIRED = "delegation_expired"


class HandshakeFailure(enum.Enum):
    """How a server-side handshake failed (the keys of ``SecureListener.failures``)."""

    TIMEOUT = "timeout"  # no complete handshake within handshake_timeout
    TLS_ERROR = "tls_error"  # not TLS 1.3 (a plaintext client), or a TLS alert
    PEER_CLOSED = "peer_closed"  # the client reset or closed mid-handshake
    OTHER = "other"


_BY_PROBLEM: Final = {
    DelegationProblem.MALFORMED: SecurityReason.DELEGATION_MALFORMED,
    DelegationProblem.WRONG_SERVICE: SecurityReason.DELEGATION_WRONG_SERVICE,
    DelegationProblem.BAD_SIGNATURE: SecurityReason.DELEGATION_FORGED,
    DelegationProblem.WRONG_INSTANCE: SecurityReason.DELEGATION_WRONG_INSTANCE,
    DelegationProblem.NOT_YET_VALID: SecurityReason.DELEGATION_NOT_YET_VALID,
    DelegationProblem.EXPIRED: SecurityReason.DELEGATION_EXPIRED,
}


class ServalSecurityError(ServalConnectError):
    """A secure channel could not be set up: the peer did not prove the serviceID (or the
    ID cannot be secured). ``reason`` says why; the message says it in words."""

    def __init__(self, reason: SecurityReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class PeerIdentity:
    """What the server proved: its key, and the delegation that lets it act for the ID
    (None when the key is the service key itself)."""

    key: ServicePublicKey
    delegation: Delegation | None = None


def check_securable(service: ServiceLike) -> ServiceID:
    """The serviceID of ``service``; :class:`ServalSecurityError` if it is a name."""
    if isinstance(service, str):
        text = service.strip()
        if not (len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text)):
            raise ServalSecurityError(
                SecurityReason.NOT_SELF_CERTIFYING,
                f"{service!r} is a name, hashed to a serviceID that no key certifies, so a "
                "secure channel cannot prove it: use a self-certifying ID "
                "(ServiceKey.service_id()), or pass ssl_context= for your own PKI",
            )
    return as_service_id(service)


# -- certificates and contexts ---------------------------------------------------------
def certificate_for(key: ServiceKey, delegation: Delegation | None = None) -> x509.Certificate:
    """A self-signed X.509 certificate for ``key``, carrying ``delegation`` if given.

    Only its public key and the delegation extension mean anything to a client (see the
    module docstring); the validity dates follow the delegation for people reading it.
    """
    private = Ed25519PrivateKey.from_private_bytes(key.private_bytes())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, key.public_key.raw.hex())])
    utc = datetime.UTC
    if delegation is not None:
        start = datetime.datetime.fromtimestamp(delegation.not_before, utc)
        end = datetime.datetime.fromtimestamp(delegation.not_after, utc)
    else:
        start = datetime.datetime(2000, 1, 1, tzinfo=utc)
        end = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
    )
    if delegation is not None:
        ext = x509.UnrecognizedExtension(DELEGATION_OID, delegation.encode())
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(private, None)


def _tls13_only(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    # A stream cut short by its carrier (a Serval FIN without close_notify) must read as
    # broken, not as a complete stream a man in the middle could truncate.
    ctx.options &= ~getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    return ctx


def server_context(key: ServiceKey, delegation: Delegation | None = None) -> ssl.SSLContext:
    """The TLS 1.3 server context presenting :func:`certificate_for` ``(key, delegation)``."""
    if delegation is not None and delegation.instance_key != key.public_key:
        raise InvalidDelegation(
            DelegationProblem.WRONG_INSTANCE,
            f"the delegation is for instance key {delegation.instance_key.raw.hex()}, "
            f"not for key {key.public_key.raw.hex()}",
        )
    ctx = _tls13_only(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.num_tickets = 0  # no resumption: every handshake shows the certificate
    cert = certificate_for(key, delegation).public_bytes(serialization.Encoding.PEM)
    private = Ed25519PrivateKey.from_private_bytes(key.private_bytes()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _load_chain(ctx, cert, private)
    return ctx


def _load_chain(ctx: ssl.SSLContext, cert: bytes, private: bytes) -> None:
    """``load_cert_chain`` from memory: through pipes where /dev/fd exists (the private key
    never touches a file system), else through a private temporary directory."""
    if Path("/dev/fd").is_dir():
        fds: list[int] = []
        try:
            paths = []
            for data in (cert, private):  # a few hundred bytes: fits any pipe buffer
                r, w = os.pipe()
                fds += [r, w]
                os.write(w, data)
                os.close(w)
                fds.remove(w)
                paths.append(f"/dev/fd/{r}")
            ctx.load_cert_chain(paths[0], paths[1])
        finally:
            for fd in fds:
                os.close(fd)
        return
    with tempfile.TemporaryDirectory() as tmp:  # pragma: no cover - not Linux
        for name, data in (("cert.pem", cert), ("key.pem", private)):
            fd = os.open(os.path.join(tmp, name), os.O_WRONLY | os.O_CREAT, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        ctx.load_cert_chain(os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem"))


@functools.cache
def client_context() -> ssl.SSLContext:
    """The client context: TLS 1.3 only, no CA and no host name (the serviceID is checked
    after the handshake: see the module docstring). One per process; never changed."""
    ctx = _tls13_only(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def check_peer(der: bytes | None, service_id: ServiceID, now: float) -> PeerIdentity:
    """Whether the certificate ``der`` (whose key the handshake proved) may speak for
    ``service_id`` at Unix time ``now``; :class:`ServalSecurityError` if not."""
    if not der:
        raise ServalSecurityError(
            SecurityReason.NO_CERTIFICATE, "the server presented no certificate"
        )
    try:
        cert = x509.load_der_x509_certificate(der)
        public = cert.public_key()
    except ValueError as exc:
        raise ServalSecurityError(
            SecurityReason.BAD_CERTIFICATE, f"the server's certificate cannot be read: {exc}"
        ) from None
    if not isinstance(public, Ed25519PublicKey):
        raise ServalSecurityError(
            SecurityReason.BAD_CERTIFICATE,
            f"the server's certificate has a {type(public).__name__}, not an Ed25519 key",
        )
    key = ServicePublicKey(
        public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    if key.certifies(service_id):
        return PeerIdentity(key)
    try:
        ext = cert.extensions.get_extension_for_oid(DELEGATION_OID)
    except x509.ExtensionNotFound:
        raise ServalSecurityError(
            SecurityReason.WRONG_KEY,
            f"the server proved key {key.raw.hex()}, which does not certify serviceID "
            f"{service_id.hex}, and showed no delegation: a man in the middle, another "
            "service, or a replica with a key of its own",
        ) from None
    except ValueError as exc:  # duplicate extensions and the like
        raise ServalSecurityError(
            SecurityReason.BAD_CERTIFICATE, f"the server's certificate is malformed: {exc}"
        ) from None
    value = ext.value
    raw = value.value if isinstance(value, x509.UnrecognizedExtension) else b""
    try:
        delegation = Delegation.decode(raw)
        delegation.check(service_id, key, now)
    except InvalidDelegation as exc:
        raise ServalSecurityError(
            _BY_PROBLEM[exc.problem],
            f"the server's key {key.raw.hex()} does not certify serviceID {service_id.hex} "
            f"and its delegation does not hold: {exc}",
        ) from None
    return PeerIdentity(key, delegation)


# -- the stream ------------------------------------------------------------------------
@dataclass(eq=False)
class SecureStream(TLSStream):
    """A TLS 1.3 stream over a :class:`~pyserval.ServalStream` (an ``anyio.abc.ByteStream``,
    an anyio ``TLSStream``). Migration, multipath and the flow's addresses are the Serval
    stream's (``serval``): TLS sits above the flow, so a moving flow keeps its session.

    Differences from anyio's ``TLSStream``: ``send_eof`` works (TLS 1.3 closes each
    direction on its own, RFC 8446 6.1: close_notify, then the Serval FIN; the peer may go
    on sending); ``aclose`` sends close_notify and the FIN without waiting for the peer's
    (which may never come); TLS errors after the handshake are ``BrokenResourceError``.

    One task may send while another receives (the translator's relay does): with no
    session tickets and no key updates, reading never produces records to send, so the two
    never write to the Serval stream at once. Two tasks sending at once are not supported.
    """

    peer: PeerIdentity | None = field(default=None, init=False)
    _eof_sent: bool = field(default=False, init=False)

    @classmethod
    async def handshake(
        cls, stream: ServalStream, *, server_side: bool, ssl_context: ssl.SSLContext
    ) -> SecureStream:
        """Run the TLS handshake on ``stream`` (``TLSStream.wrap`` with our settings)."""
        tls = await cls.wrap(
            stream, server_side=server_side, ssl_context=ssl_context, standard_compatible=True
        )
        assert isinstance(tls, SecureStream)
        return tls

    # -- the Serval stream underneath ------------------------------------------------------
    @property
    def serval(self) -> ServalStream:
        """The Serval stream carrying the TLS records."""
        stream = self.transport_stream
        assert isinstance(stream, ServalStream)
        return stream

    @property
    def connection(self) -> Connection:
        """The sans-I/O connection underneath."""
        return self.serval.connection

    @property
    def service_id(self) -> ServiceID:
        """The serviceID this stream was connected to (or accepted on)."""
        return self.serval.service_id

    @property
    def local_address(self) -> Address:
        """Our address on the (first) subflow."""
        return self.serval.local_address

    @property
    def remote_address(self) -> Address | None:
        """The peer's address on the (first) subflow."""
        return self.serval.remote_address

    @property
    def local_flowid(self) -> int:
        """Our flowID of the (first) subflow."""
        return self.serval.local_flowid

    @property
    def remote_flowid(self) -> int:
        """The peer's flowID of the (first) subflow."""
        return self.serval.remote_flowid

    @property
    def paths(self) -> list[tuple[Address, Address | None]]:
        """(local, remote) address pair of each subflow."""
        return self.serval.paths

    async def migrate(self, local_address: str | Address, *, timeout: float = 10.0) -> None:
        """Move the flow to another interface (see :meth:`ServalStream.migrate`)."""
        await self.serval.migrate(local_address, timeout=timeout)

    async def add_path(
        self, local_address: str | Address, remote_address: str | Address, *, timeout: float = 10.0
    ) -> None:
        """Open another subflow (see :meth:`ServalStream.add_path`)."""
        await self.serval.add_path(local_address, remote_address, timeout=timeout)

    # -- anyio.abc.ByteStream ------------------------------------------------------------
    async def receive(self, max_bytes: int = 65536) -> bytes:
        """The next decrypted bytes; ``EndOfStream`` after the peer's close_notify."""
        try:
            return await super().receive(max_bytes)
        except ssl.SSLZeroReturnError:
            # The peer's close_notify after our own (Python returns b"" only when ours
            # was not sent yet).
            raise anyio.EndOfStream from None
        except ssl.SSLError as exc:  # a bad record: tampering on the path, or a broken peer
            raise anyio.BrokenResourceError(f"TLS error: {exc}") from exc

    async def send(self, item: bytes) -> None:
        """Encrypt and send all of ``item`` (waits while the Serval send buffer is full)."""
        if self._eof_sent:
            raise anyio.ClosedResourceError("send_eof() was called on this stream")
        try:
            await super().send(item)
        except ssl.SSLError as exc:
            raise anyio.BrokenResourceError(f"TLS error: {exc}") from exc

    async def _send_close_notify(self) -> None:
        if self._eof_sent or self._broken:
            return
        self._eof_sent = True
        # One SSL_shutdown: it writes close_notify and would then wait for the peer's,
        # which the receiving side reads in its own time (OpenSSL reads on after it).
        with contextlib.suppress(ssl.SSLWantReadError):
            self._ssl_object.unwrap()
        await self._flush_write_bio()

    async def send_eof(self) -> None:
        """Half-close: close_notify, then the Serval FIN; reading goes on."""
        try:
            await self._send_close_notify()
        except ssl.SSLError as exc:
            raise anyio.BrokenResourceError(f"TLS error: {exc}") from exc
        await self.serval.send_eof()

    async def aclose(self) -> None:
        """Send close_notify (unless sent) and close the Serval stream; does not wait for
        the peer's close_notify."""
        closed = (ssl.SSLError, anyio.BrokenResourceError, anyio.ClosedResourceError)
        if self.connection.fin_offset is None:  # else our FIN went already: nothing to add
            with contextlib.suppress(*closed, ConnectionStateError):
                await self._send_close_notify()
        await self.serval.aclose()

    async def abort(self) -> None:
        """Reset the Serval connection at once."""
        self._broken = True
        await self.serval.abort()


async def secure_client(
    stream: ServalStream,
    service_id: ServiceID,
    *,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = _HANDSHAKE_TIMEOUT,
    clock: Callable[[], float] = time.time,
) -> SecureStream:
    """Run the client handshake on ``stream`` and check the server proved ``service_id``
    (see the module docstring); the stream is reset and :class:`ServalSecurityError`
    raised if not. With ``ssl_context`` (your own PKI) that context's checks apply instead.
    """
    try:
        async with asyncio.timeout(timeout):
            tls = await SecureStream.handshake(
                stream, server_side=False, ssl_context=ssl_context or client_context()
            )
    except TimeoutError:
        await stream.abort()
        raise ServalConnectTimeout(
            f"the TLS handshake with service {service_id.hex} timed out after {timeout} s"
        ) from None
    except (ssl.SSLError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
        await stream.abort()
        cause = exc.__cause__ or exc
        raise ServalSecurityError(
            SecurityReason.HANDSHAKE_FAILED,
            f"no TLS 1.3 handshake with service {service_id.hex}: "
            f"{type(cause).__name__}: {cause} (a plaintext service, or one that refused us)",
        ) from None
    except BaseException:
        await stream.abort()
        raise
    if ssl_context is None:
        try:
            tls.peer = check_peer(tls._ssl_object.getpeercert(True), service_id, clock())
        except ServalSecurityError:
            await tls.abort()  # not one byte of ours went to this peer
            raise
    return tls


# -- the listener ----------------------------------------------------------------------
class SecureListener:
    """Accepts TLS streams to a service: ``async for stream in listener`` or
    ``serve(handler)``, like :class:`~pyserval.ServalListener`.

    Handshakes run concurrently in the background, at most ``backlog`` at a time (together
    with the finished ones not yet accepted), each limited to ``handshake_timeout``
    seconds, so a slow or silent client holds up nobody. Failed handshakes are counted by
    :class:`HandshakeFailure` in ``failures`` and their streams reset.
    """

    def __init__(
        self,
        listener: ServalListener,
        context: ssl.SSLContext,
        *,
        backlog: int = 128,
        handshake_timeout: float = _HANDSHAKE_TIMEOUT,
    ) -> None:
        self._listener = listener
        self._context = context
        self.handshake_timeout = handshake_timeout
        self.failures: collections.Counter[HandshakeFailure] = collections.Counter()
        self._ready: collections.deque[SecureStream] = collections.deque()
        self._slots = asyncio.Semaphore(max(1, backlog))
        self._wake = asyncio.Event()
        self._handshakes: set[asyncio.Task[None]] = set()
        self._pump: asyncio.Task[None] | None = None
        self._closed = False
        self._start()  # handshakes begin at once, not at the first accept()

    @property
    def service_id(self) -> ServiceID:
        """The service listened on."""
        return self._listener.service_id

    @property
    def serval(self) -> ServalListener:
        """The Serval listener underneath."""
        return self._listener

    def renew(self, key: ServiceKey, delegation: Delegation | None = None) -> None:
        """Present ``key`` (with ``delegation``) in handshakes from now on: a replica
        renews its delegation before it expires without closing the listener."""
        self._context = server_context(key, delegation)

    def _start(self) -> None:
        if self._pump is None and not self._closed:
            self._pump = asyncio.ensure_future(self._accept_raw())
            self._pump.add_done_callback(lambda _: self._wake.set())

    async def _accept_raw(self) -> None:
        async for raw in self._listener:
            await self._slots.acquire()
            task = asyncio.ensure_future(self._handshake(raw))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, raw: ServalStream) -> None:
        queued = False
        try:
            async with asyncio.timeout(self.handshake_timeout):
                tls = await SecureStream.handshake(raw, server_side=True, ssl_context=self._context)
            if not self._closed:
                self._ready.append(tls)
                queued = True
                self._wake.set()
            else:
                await tls.abort()
        except Exception as exc:  # a failed handshake costs this stream, nothing else
            self.failures[_failure(exc)] += 1
            LOGGER.debug("handshake on %s failed: %r", self.service_id.hex, exc)
            await raw.abort()
        except BaseException:
            await raw.abort()
            raise
        finally:
            if not queued:
                self._slots.release()

    async def accept(self) -> SecureStream:
        """The next stream whose handshake completed."""
        self._start()
        while True:
            if self._ready:
                self._slots.release()
                return self._ready.popleft()
            if self._closed or (self._pump is not None and self._pump.done()):
                raise anyio.ClosedResourceError("the listener was closed")
            self._wake.clear()
            await self._wake.wait()

    def __aiter__(self) -> AsyncIterator[SecureStream]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[SecureStream]:
        while True:
            try:
                yield await self.accept()
            except anyio.ClosedResourceError:
                return

    async def serve(self, handler: Callable[[SecureStream], Awaitable[object]]) -> None:
        """Run ``handler(stream)`` in its own task for every incoming stream."""
        async with anyio.create_task_group() as tg:
            async for stream in self:
                tg.start_soon(_run_handler, handler, stream)

    async def aclose(self) -> None:
        """Stop listening; reset handshakes in progress and streams not yet accepted."""
        if self._closed:
            return
        self._closed = True
        await self._listener.aclose()
        tasks = [t for t in (self._pump, *self._handshakes) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        while self._ready:
            await self._ready.popleft().abort()
        self._wake.set()


def _failure(exc: Exception) -> HandshakeFailure:
    if isinstance(exc, TimeoutError):
        return HandshakeFailure.TIMEOUT
    if isinstance(exc, ssl.SSLError) or isinstance(exc.__cause__, ssl.SSLError):
        return HandshakeFailure.TLS_ERROR
    if isinstance(exc, anyio.BrokenResourceError | anyio.EndOfStream | anyio.ClosedResourceError):
        return HandshakeFailure.PEER_CLOSED
    return HandshakeFailure.OTHER


async def _run_handler(
    handler: Callable[[SecureStream], Awaitable[object]], stream: SecureStream
) -> None:
    async with stream:
        await handler(stream)
