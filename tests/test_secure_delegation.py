"""Delegations and certificates without any network: the 149-byte layout the module
docstring specifies, every way a delegation is refused, that the installed OpenSSL really
does TLS 1.3 with the Ed25519 certificates we make (memory BIOs), and that it refuses a
server whose CertificateVerify is not by its certificate's key even though the client
context verifies no certificate (a rogue server built with tlslite-ng, over a socketpair)."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import ssl
import struct
import threading
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from pyserval.naming import ServiceKey
from pyserval.naming.delegation import Delegation, DelegationProblem, InvalidDelegation
from pyserval.runtime.secure import (
    DELEGATION_OID,
    SecurityReason,
    ServalSecurityError,
    certificate_for,
    check_peer,
    check_securable,
    client_context,
    server_context,
)

DER = Encoding.DER
NOW = 1_800_000_000  # a fixed Unix time: these tests read no clock


def test_delegation_bytes_follow_the_documented_layout_and_signature() -> None:
    service, instance = ServiceKey.generate(), ServiceKey.generate()
    d = service.delegate(instance, valid_for=3600, now=NOW + 0.7)
    raw = d.encode()
    assert len(raw) == 149
    assert raw[:5] == b"SVDL\x01"
    assert raw[5:37] == service.public_key.raw and raw[37:69] == instance.public_key.raw
    assert struct.unpack(">QQ", raw[69:85]) == (NOW, NOW + 3600)
    # The signature is Ed25519 by the service key over the domain string and bytes 0..84,
    # checked here with cryptography directly, not with the code under test.
    Ed25519PublicKey.from_public_bytes(service.public_key.raw).verify(
        raw[85:], b"pyserval/delegation/v1\x00" + raw[:85]
    )
    assert Delegation.decode(raw) == d


def _problem(d: Delegation, sid: object, instance: ServiceKey, now: float) -> DelegationProblem:
    with pytest.raises(InvalidDelegation) as info:
        d.check(sid, instance.public_key, now)  # type: ignore[arg-type]
    return info.value.problem


def test_every_refusal_names_its_problem() -> None:
    service, instance, other = ServiceKey.generate(), ServiceKey.generate(), ServiceKey.generate()
    sid = service.service_id("0a0b/16")
    d = service.delegate(instance.public_key, valid_for=600, now=NOW)
    d.check(sid, instance.public_key, NOW + 1)  # holds
    d.check(service.service_id("cc/8"), instance.public_key, NOW)  # any ID the key certifies
    assert (
        _problem(d, other.service_id("0a0b/16"), instance, NOW) is DelegationProblem.WRONG_SERVICE
    )
    assert _problem(d, sid, other, NOW) is DelegationProblem.WRONG_INSTANCE
    assert _problem(d, sid, instance, NOW + 600) is DelegationProblem.EXPIRED  # end excluded
    assert _problem(d, sid, instance, NOW - 61) is DelegationProblem.NOT_YET_VALID
    d.check(sid, instance.public_key, NOW - 59)  # within the clock-skew allowance
    longer = dataclasses.replace(d, not_after=NOW + 10**6)  # altered after signing
    assert _problem(longer, sid, instance, NOW) is DelegationProblem.BAD_SIGNATURE
    # A forger signs with its own key but names the service key as the delegator.
    forged = dataclasses.replace(
        other.delegate(instance.public_key, valid_for=600, now=NOW),
        service_key=service.public_key,
    )
    assert _problem(forged, sid, instance, NOW) is DelegationProblem.BAD_SIGNATURE
    for bad in (b"", d.encode()[:-1], b"XXXX" + d.encode()[4:], b"SVDL\x02" + d.encode()[5:]):
        with pytest.raises(InvalidDelegation) as info:
            Delegation.decode(bad)
        assert info.value.problem is DelegationProblem.MALFORMED
    with pytest.raises(ValueError, match="positive"):
        service.delegate(instance, valid_for=0)


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> tuple[ssl.SSLObject, ...]:
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_side=False)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(6):
        for side in (c, s):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    return c, s


def test_installed_openssl_does_tls13_with_our_ed25519_certificates() -> None:
    key = ServiceKey.generate()
    c, s = _handshake(server_context(key), client_context())
    assert c.version() == "TLSv1.3" and s.version() == "TLSv1.3"
    der = c.getpeercert(True)
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    assert cert.public_key().public_bytes_raw() == key.public_key.raw  # type: ignore[union-attr]
    assert s.getpeercert(True) is None  # the server asks the client for nothing


def test_a_client_offering_only_tls12_gets_no_handshake() -> None:
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):
        _handshake(server_context(ServiceKey.generate()), old)


def test_check_peer_accepts_the_key_or_a_delegation_and_nothing_else() -> None:
    service, instance, other = ServiceKey.generate(), ServiceKey.generate(), ServiceKey.generate()
    sid = service.service_id("0a0b/16")
    der = certificate_for(service).public_bytes(DER)
    assert check_peer(der, sid, NOW).key == service.public_key

    def cert(key: ServiceKey, d: Delegation | None) -> bytes:
        return certificate_for(key, d).public_bytes(DER)

    good = service.delegate(instance, valid_for=60, now=NOW)
    peer = check_peer(cert(instance, good), sid, NOW)
    assert peer.key == instance.public_key and peer.delegation == good
    cases = {
        SecurityReason.WRONG_KEY: (cert(other, None), NOW),
        SecurityReason.DELEGATION_EXPIRED: (cert(instance, good), NOW + 60),
        SecurityReason.DELEGATION_WRONG_SERVICE: (
            cert(instance, other.delegate(instance, valid_for=60, now=NOW)),
            NOW,
        ),
        SecurityReason.DELEGATION_WRONG_INSTANCE: (cert(other, good), NOW),
        SecurityReason.NO_CERTIFICATE: (None, NOW),
        SecurityReason.BAD_CERTIFICATE: (b"\x30\x03junk", NOW),
    }
    for reason, (data, now) in cases.items():
        with pytest.raises(ServalSecurityError) as info:
            check_peer(data, sid, now)
        assert info.value.reason is reason, (reason, info.value)
    # The extension really is under our OID, with the encoding as its value.
    ext = x509.load_der_x509_certificate(cert(instance, good)).extensions.get_extension_for_oid(
        DELEGATION_OID
    )
    assert ext.value.value == good.encode()  # type: ignore[attr-defined]


def test_names_cannot_be_secured_but_hex_ids_can() -> None:
    with pytest.raises(ServalSecurityError) as info:
        check_securable("echo")
    assert info.value.reason is SecurityReason.NOT_SELF_CERTIFYING
    assert "ssl_context" in str(info.value)
    sid = ServiceKey.generate().service_id()
    assert check_securable(sid.hex) == sid and check_securable(sid) == sid


def _rogue_server(cert_key: ServiceKey, signing_key: ServiceKey) -> tuple[socket.socket, Any]:
    """A TLS 1.3 server (tlslite-ng, pure Python, which does not check that its key matches
    its certificate) presenting ``cert_key``'s certificate and signing CertificateVerify
    with ``signing_key``; returns the client's socket and the server's thread."""
    tlslite = pytest.importorskip("tlslite.api")
    private = Ed25519PrivateKey.from_private_bytes(signing_key.private_bytes()).private_bytes(
        Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()
    )
    chain = tlslite.X509CertChain(
        [tlslite.X509().parse(certificate_for(cert_key).public_bytes(Encoding.PEM).decode())]
    )
    key = tlslite.parsePEMKey(private.decode(), private=True, implementations=["python"])
    server_sock, client_sock = socket.socketpair()
    for s in (server_sock, client_sock):
        s.settimeout(10)

    def serve() -> None:
        settings = tlslite.HandshakeSettings()
        settings.minVersion = settings.maxVersion = (3, 4)  # TLS 1.3
        conn = tlslite.TLSConnection(server_sock)
        with contextlib.suppress(Exception):  # the client's alert ends it when refused
            conn.handshakeServer(certChain=chain, privateKey=key, settings=settings)
            conn.write(b"hello")
        server_sock.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return client_sock, thread


def test_openssl_refuses_a_certificate_verify_not_made_with_the_certificates_key() -> None:
    """The soundness of checking after the handshake rests on this: even with CERT_NONE,
    the handshake fails unless the server signs with the key in its certificate."""
    service, other = ServiceKey.generate(), ServiceKey.generate()
    sid = service.service_id()
    # The harness itself works: the same rogue server with the right key is accepted.
    sock, thread = _rogue_server(service, service)
    with client_context().wrap_socket(sock) as tls:
        assert tls.version() == "TLSv1.3"
        assert check_peer(tls.getpeercert(True), sid, NOW).key == service.public_key
        assert tls.recv(5) == b"hello"
    thread.join(10)
    # The service's certificate, CertificateVerify signed by another key: refused.
    sock, thread = _rogue_server(service, other)
    with pytest.raises(ssl.SSLError, match="BAD_SIGNATURE"):
        client_context().wrap_socket(sock)
    sock.close()
    thread.join(10)
