"""
Tests for L{pfo3.tlsid}: reading the CA certificates of C{--tls-client-ca},
requiring client certificates on C{ssl:} endpoints, and the identity of a
verified client (in process, over real loopback sockets).
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any, Optional

import pytest
import pytest_twisted
from twisted.internet import endpoints
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python import usage

from pfo3.tap import Options
from pfo3.tlsid import (
    NotATLSEndpoint,
    ProxyHeaderThenTLS,
    is_tls,
    load_authorities,
    peer_certificate_identity,
    proxy_header_before_tls,
    require_client_certificates,
)

from .conftest import TLSFiles


@pytest.fixture
def files(tmp_path: Path) -> TLSFiles:
    return TLSFiles(tmp_path)


def test_is_tls() -> None:
    """
    ssl: endpoints are TLS, also inside haproxy: and in any letter case;
    tcp:, unix: and haproxy:tcp: are not.
    """
    assert is_tls("ssl:9443:privateKey=k") and is_tls("SSL:9443")
    assert is_tls("haproxy:ssl:9443:privateKey=k")
    assert not any(is_tls(d) for d in ("tcp:9000", "unix:/tmp/s", "haproxy:tcp:9001", "tls"))


def test_load_authorities_reads_a_folder_or_a_file(files: TLSFiles, tmp_path: Path) -> None:
    """
    The CA folder pfo3-certs makes, or a PEM file holding several CA
    certificates, gives every certificate in it.
    """
    assert len(load_authorities(files.ca_dir)) == 1
    (tmp_path / "other").mkdir()
    other = TLSFiles(tmp_path / "other")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(files.ca.read_bytes() + other.ca.read_bytes())
    found = load_authorities(bundle)
    assert [c.digest() for c in found] == [
        load_authorities(files.ca)[0].digest(), load_authorities(other.ca)[0].digest()]


def test_load_authorities_refuses_what_is_not_a_ca(files: TLSFiles, tmp_path: Path) -> None:
    """
    A server's certificate (not a CA), a missing file, a file that is not
    PEM and an empty folder are each refused with a message naming them.
    """
    with pytest.raises(ValueError, match="not a certificate authority"):
        load_authorities(files.cert)
    with pytest.raises(ValueError, match="cannot read"):
        load_authorities(tmp_path / "missing.pem")
    with pytest.raises(ValueError, match="cannot read"):
        load_authorities(files.key)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no CA certificates"):
        load_authorities(tmp_path / "empty")


def test_option_needs_an_ssl_port_and_a_ca(files: TLSFiles) -> None:
    """
    twistd pfo3 --tls-client-ca is a usage error without any ssl: --port,
    or when PATH holds no CA certificate; with an ssl: port and the CA
    folder it is accepted (a tcp: port beside it is allowed).
    """
    ssl_port = files.endpoint(0)
    with pytest.raises(usage.UsageError, match="needs at least one ssl: --port"):
        Options().parseOptions(["--port", "tcp:0", "--tls-client-ca", str(files.ca_dir)])
    with pytest.raises(usage.UsageError, match="--tls-client-ca: .*not a certificate auth"):
        Options().parseOptions(["--port", ssl_port, "--tls-client-ca", str(files.cert)])
    options = Options()
    options.parseOptions(["--port", ssl_port, "--port", "tcp:0",
                          "--tls-client-ca", str(files.ca_dir)])
    assert len(options["client-authorities"]) == 1


def test_require_client_certificates_needs_tls(files: TLSFiles) -> None:
    """
    Asking client certificates of a tcp: endpoint (also inside haproxy:)
    raises NotATLSEndpoint instead of silently listening without them.
    """
    from twisted.internet import reactor

    authorities = load_authorities(files.ca_dir)
    for description in ("tcp:0", "haproxy:tcp:0"):
        with pytest.raises(NotATLSEndpoint):
            require_client_certificates(
                endpoints.serverFromString(reactor, description), authorities)


def test_no_identity_without_tls() -> None:
    """
    A plain (not TLS) transport, and no transport at all, have no identity.
    """
    assert peer_certificate_identity(StringTransport()) is None
    assert peer_certificate_identity(None) is None


class WhoAmI(LineOnlyReceiver):
    """
    Answers each line with the identity of the client, as its repr, and the
    address it connects from.
    """

    delimiter = b"\n"

    def lineReceived(self, line: bytes) -> None:
        assert self.transport is not None
        identity = peer_certificate_identity(self.transport)
        self.sendLine(f"{identity!r} {self.transport.getPeer().host}".encode())


class WhoAmIFactory:
    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass

    def buildProtocol(self, addr: Any) -> WhoAmI:
        return WhoAmI()


def ask(
    port: int, files: TLSFiles, identity: Optional[str], inside: bytes = b"",
    clear: bytes = b"",
) -> bytes:
    """
    Connect, send C{clear} before the TLS handshake, then over TLS (trusting
    C{files}' CA, presenting C{identity}'s certificate when given) send
    C{inside} then a line, and read the answer.
    """
    ctx = ssl.create_default_context(cafile=str(files.ca))
    if identity is not None:
        client = files.client(identity)
        ctx.load_cert_chain(str(client.cert), str(client.key))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(clear)
        with ctx.wrap_socket(raw, server_hostname="localhost") as conn:
            conn.sendall(inside + b"who\n")
            answer = b""
            while not answer.endswith(b"\n"):
                chunk = conn.recv(4096)
                assert chunk, answer
                answer += chunk
    return answer.rstrip(b"\n")


PROXY = b"PROXY TCP4 192.0.2.7 127.0.0.1 4444 9443\r\n"


@pytest.mark.integration
@pytest.mark.parametrize("wrapper, reorder, inside, clear, peer", [
    ("", False, b"", b"", "127.0.0.1"),
    ("haproxy:", False, PROXY, b"", "192.0.2.7"),
    ("haproxy:", True, b"", PROXY, "192.0.2.7"),
], ids=["ssl", "haproxy-header-inside-tls", "haproxy-header-before-tls"])
@pytest_twisted.inlineCallbacks
def test_identity_of_a_verified_client(
    files: TLSFiles, wrapper: str, reorder: bool, inside: bytes, clear: bytes, peer: str,
) -> Any:
    """
    On an ssl: endpoint that requires client certificates, bare or inside
    haproxy: (Twisted's nesting, the PROXY header inside TLS; or pfo3's,
    proxy_header_before_tls, the header in clear first as HAProxy sends it),
    the identity of a client is the subject CN of its certificate: 'alice'
    for alice's, 'bob' for bob's, on separate connections to the same port;
    and the peer address is the one the PROXY header gave.
    """
    from twisted.internet import reactor

    endpoint = endpoints.serverFromString(reactor, wrapper + files.endpoint(0))
    require_client_certificates(endpoint, load_authorities(files.ca_dir))
    if reorder:
        endpoint = proxy_header_before_tls(endpoint)
        assert isinstance(endpoint, ProxyHeaderThenTLS)
    port = yield endpoint.listen(WhoAmIFactory())
    try:
        number = port.getHost().port
        for identity in ("alice", "bob"):
            answer = yield deferToThread(ask, number, files, identity, inside, clear)
            assert answer == f"'{identity}' {peer}".encode()
    finally:
        yield port.stopListening()


def test_only_haproxy_ssl_is_reordered(files: TLSFiles) -> None:
    """
    proxy_header_before_tls changes haproxy:ssl: only: ssl:, tcp: and
    haproxy:tcp: endpoints come back as they were.
    """
    from twisted.internet import reactor

    for description in (files.endpoint(0), "tcp:0", "haproxy:tcp:0"):
        endpoint = endpoints.serverFromString(reactor, description)
        assert proxy_header_before_tls(endpoint) is endpoint
    assert isinstance(proxy_header_before_tls(
        endpoints.serverFromString(reactor, "haproxy:" + files.endpoint(0))),
        ProxyHeaderThenTLS)


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_no_identity_when_the_server_verifies_none(files: TLSFiles) -> Any:
    """
    On an ssl: endpoint that does not require client certificates, a client
    certificate proves nothing (the server never asks for it, so never
    checks it): the identity is None, with or without one.
    """
    from twisted.internet import reactor

    port = yield endpoints.serverFromString(reactor, files.endpoint(0)).listen(WhoAmIFactory())
    try:
        number = port.getHost().port
        assert (yield deferToThread(ask, number, files, "alice")) == b"None 127.0.0.1"
        assert (yield deferToThread(ask, number, files, None)) == b"None 127.0.0.1"
    finally:
        yield port.stopListening()
