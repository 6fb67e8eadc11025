"""
Mutual TLS on the server: requiring client certificates signed by given
certificate authorities, and reading who a verified client is.

Twisted's C{ssl:} server endpoint string has no field for client
certificates (C{caCertsDir=} exists only on the C{ssl:} I{client}
endpoint), so C{twistd pfo3 --tls-client-ca PATH} applies them to the
C{ssl:} ports that Twisted parsed, as L{require_client_certificates} does.
Behind HAProxy, L{ProxyHeaderThenTLS} reads the PROXY header before the TLS
handshake, where HAProxy sends it.

Both reach into the endpoints Twisted parsed (C{SSL4ServerEndpoint}'s TLS
options, port and interface; the C{haproxy:} wrapper's inner endpoint).
Should a Twisted release move them, the server fails to start rather than
listen without client certificates, and the tests say so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional, Union

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import endpoints, ssl
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    ISSLTransport,
    IStreamServerEndpoint,
)
from twisted.protocols.haproxy._wrapper import HAProxyWrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from pfo3.proxyheader import proxied


class NotATLSEndpoint(ValueError):
    """
    Client certificates were asked of an endpoint that does not speak TLS.
    """


#: Endpoint types that wrap another endpoint, named after them in a string.
_WRAPPERS = ("haproxy",)


def is_tls(description: str) -> bool:
    """
    @return: Whether the server endpoint C{description} is C{ssl:}, also
        inside a wrapper (C{haproxy:ssl:...}).
    """
    kind, _, rest = description.partition(":")
    kind = kind.strip().lower()
    if kind in _WRAPPERS:
        return is_tls(rest)
    return kind == "ssl"


def load_authorities(path: Union[str, Path]) -> List[ssl.Certificate]:
    """
    Read the certificate authorities a client certificate must be signed by.

    @param path: A PEM file (one or more certificates), or a folder whose
        C{*.pem} files are read (the folder C{pfo3-certs ca} makes and
        clients name in C{trustRoots=}).
    @return: The certificates, in file order.
    @raise ValueError: When there is nothing to read, a file is not PEM, or
        a certificate is not a CA's (basicConstraints CA:TRUE): trusting an
        end entity's certificate as an authority is almost always a mistake.
    """
    path = Path(path)
    files = sorted(path.glob("*.pem")) if path.is_dir() else [path]
    found: List[ssl.Certificate] = []
    for name in files:
        try:
            certificates = x509.load_pem_x509_certificates(name.read_bytes())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read CA certificates from {name}: {e}")
        for certificate in certificates:
            try:
                is_ca = certificate.extensions.get_extension_for_class(
                    x509.BasicConstraints).value.ca
            except x509.ExtensionNotFound:
                is_ca = False
            if not is_ca:
                raise ValueError(
                    f"{name} holds {certificate.subject.rfc4514_string()}, which is not a "
                    "certificate authority (basicConstraints CA:TRUE)")
            found.append(ssl.Certificate.loadPEM(certificate.public_bytes(Encoding.PEM)))
    if not found:
        raise ValueError(f"no CA certificates in {path}" + (
            " (it reads the folder's *.pem files)" if path.is_dir() else ""))
    return found


def require_client_certificates(
    endpoint: IStreamServerEndpoint, authorities: List[ssl.Certificate],
) -> None:
    """
    Make a TLS server endpoint that Twisted parsed from an C{ssl:} string
    (also inside a wrapper such as C{haproxy:ssl:}) refuse, during the
    handshake, any client that does not present a certificate signed by one
    of C{authorities}.

    @param endpoint: What L{endpoints.serverFromString} returned, before it
        listens.
    @raise NotATLSEndpoint: When C{endpoint} is not an C{ssl:} one.
    """
    while isinstance(endpoint, (endpoints._WrapperServerEndpoint, ProxyHeaderThenTLS)):
        endpoint = (endpoint.tls if isinstance(endpoint, ProxyHeaderThenTLS)
                    else endpoint._wrappedEndpoint)
    if not isinstance(endpoint, endpoints.SSL4ServerEndpoint):
        raise NotATLSEndpoint("client certificates need an ssl: endpoint")
    current = endpoint._sslContextFactory
    extra = {}
    if current.method != SSL.TLS_METHOD:  # sslmethod= in the string
        extra["method"] = current.method
    endpoint._sslContextFactory = ssl.CertificateOptions(
        privateKey=current.privateKey,
        certificate=current.certificate,
        extraCertChain=current.extraCertChain or None,
        dhParameters=current.dhParameters,
        trustRoot=ssl.trustRootFromCertificates(authorities),
        **extra,
    )


@implementer(IStreamServerEndpoint)
class ProxyHeaderThenTLS:
    """
    A server endpoint that reads the PROXY protocol header in clear, then
    speaks TLS: what HAProxy in C{mode tcp} with C{send-proxy-v2} sends.

    Twisted's C{haproxy:ssl:} nests the other way (TLS first, the header
    inside it), which HAProxy never sends.
    """

    def __init__(self, tls: endpoints.SSL4ServerEndpoint) -> None:
        """
        @param tls: The C{ssl:} endpoint whose port, interface, backlog and
            TLS options to use, read when listening (after
            L{require_client_certificates}, if any).
        """
        self.tls = tls

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        tls = self.tls
        tcp = endpoints.TCP4ServerEndpoint(
            tls._reactor, tls._port, backlog=tls._backlog, interface=tls._interface)
        inner = TLSMemoryBIOFactory(tls._sslContextFactory, False, protocolFactory)
        listening: Deferred[IListeningPort] = proxied(tcp).listen(inner)
        return listening


def proxy_header_before_tls(endpoint: IStreamServerEndpoint) -> IStreamServerEndpoint:
    """
    @param endpoint: What L{endpoints.serverFromString} made of a
        description.
    @return: For C{haproxy:ssl:...}, a L{ProxyHeaderThenTLS} on the same
        port with the same TLS options; any other C{endpoint} as it is.
    """
    if (isinstance(endpoint, endpoints._WrapperServerEndpoint)
            and endpoint._wrapperFactory is HAProxyWrappingFactory
            and isinstance(endpoint._wrappedEndpoint, endpoints.SSL4ServerEndpoint)):
        return ProxyHeaderThenTLS(endpoint._wrappedEndpoint)
    return endpoint


def peer_certificate_identity(transport: Any) -> Optional[str]:
    """
    Who the client on C{transport} proved to be with its certificate.

    Ask once the client has sent data (the TLS handshake is over by then).
    Works through wrappers that pass the TLS transport on, as C{haproxy:}
    does.

    @param transport: A protocol's transport.
    @return: The subject common name (CN) of the client certificate the TLS
        handshake verified against the server's trusted authorities; L{None}
        when the connection is not TLS, the client sent no certificate, the
        server did not verify it (no C{--tls-client-ca}), or its subject has
        no CN.
    """
    if transport is None or not ISSLTransport.providedBy(transport):
        return None
    # ISSLTransport declares only getPeerCertificate; Twisted's TLS
    # transports give their OpenSSL connection with getHandle().
    handle = getattr(transport, "getHandle", lambda: None)()
    if not isinstance(handle, SSL.Connection):
        return None
    # Only a server that asked for client certificates verified one; the
    # chain is None otherwise, even when the client sent a certificate.
    if not handle.get_context().get_verify_mode() & SSL.VERIFY_PEER:
        return None
    chain = handle.get_verified_chain(as_cryptography=True)
    if not chain:
        return None
    names = chain[0].subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        return None
    value = names[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


__all__ = [
    "NotATLSEndpoint",
    "ProxyHeaderThenTLS",
    "proxy_header_before_tls",
    "is_tls",
    "load_authorities",
    "peer_certificate_identity",
    "require_client_certificates",
]
