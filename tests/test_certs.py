"""
Unit tests for L{pfo3.certs}, the C{pfo3-certs} command: what the CA,
server and client certificates say, how their files are written, and how the
command fails.
"""

from __future__ import annotations

import datetime
import ipaddress
import stat
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pfo3 import certs

from .conftest import server_env


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def common_name(cert: x509.Certificate) -> str:
    [attribute] = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attribute.value)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def run_certs(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pfo3.certs", *args], cwd=tmp_path, env=server_env(),
        capture_output=True, text=True, timeout=60)


def test_ca_is_a_ca_that_signs_only_certificates(tmp_path: Path) -> None:
    """
    The CA certificate is self-signed, says CA:TRUE (critical) with a path
    length of 0, may sign certificates and CRLs (critical key usage) and
    nothing else, and sits alone in its folder; its key matches it.
    """
    ca = certs.make_ca(tmp_path, "Test CA")
    cert = load(ca.cert)
    assert ca.cert.parent == ca.directory and [p.name for p in ca.directory.iterdir()] == [
        "ca.pem"]
    assert cert.subject == cert.issuer and common_name(cert) == "Test CA"
    cert.verify_directly_issued_by(cert)
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.key_encipherment and not usage.value.data_encipherment
    key = serialization.load_pem_private_key(ca.key.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key() == cert.public_key()


def test_server_certificate_names_its_hosts_and_addresses(tmp_path: Path) -> None:
    """
    A server certificate names every --san in its subjectAltName, host names
    as DNS names and addresses (IPv4, IPv6, with or without OpenSSL's IP:
    and DNS: prefixes) as IP addresses; it is an end entity (CA:FALSE), for
    digital signatures and serverAuth only, and the CA signed it.
    """
    certs.make_ca(tmp_path)
    out = certs.make_server(
        tmp_path, ["localhost", "127.0.0.1", "IP:::1", "DNS:pfo3.Example.org"])
    cert = load(out.cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "pfo3.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    assert common_name(cert) == "localhost"
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    assert not usage.value.key_cert_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    cert.verify_directly_issued_by(load(certs.CAFiles.under(tmp_path).cert))


def test_client_certificate_carries_the_identity(tmp_path: Path) -> None:
    """
    A client certificate's subject is CN=IDENTITY, it is for clientAuth
    only, names no host, lives in DIR/clients/ and the CA signed it.
    """
    certs.make_ca(tmp_path)
    out = certs.make_client(tmp_path, "alice")
    assert out == certs.client_files(tmp_path, "alice")
    assert out.cert == tmp_path / "clients" / "alice.pem"
    cert = load(out.cert)
    assert cert.subject.rfc4514_string() == "CN=alice"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    cert.verify_directly_issued_by(load(certs.CAFiles.under(tmp_path).cert))


def test_certificates_do_not_outlive_their_ca(tmp_path: Path) -> None:
    """
    A certificate asked for longer than its CA lives ends when the CA does;
    every certificate starts a little in the past, for clocks running late.
    """
    ca = load(certs.make_ca(tmp_path, days=10).cert)
    cert = load(certs.make_client(tmp_path, "bob", days=400).cert)
    assert cert.not_valid_after_utc == ca.not_valid_after_utc
    now = datetime.datetime.now(datetime.timezone.utc)
    assert cert.not_valid_before_utc <= now - datetime.timedelta(minutes=4)


def written(tmp_path: Path) -> List[Tuple[Path, bool]]:
    """
    Make a CA, a server and a client certificate.

    @return: Every file written, with whether it is a private key.
    """
    ca = certs.make_ca(tmp_path)
    server = certs.make_server(tmp_path, ["localhost"])
    client = certs.make_client(tmp_path, "alice")
    return [(ca.key, True), (ca.cert, False), (server.key, True), (server.cert, False),
            (client.key, True), (client.cert, False)]


def test_private_keys_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    """
    Every private key is written with mode 0600, and certificates 0644,
    even under a permissive umask; no temporary file is left behind.
    """
    import os

    old = os.umask(0)
    try:
        files = written(tmp_path)
    finally:
        os.umask(old)
    for path, private in files:
        assert mode(path) == (0o600 if private else 0o644), path
    left = [p for p in tmp_path.rglob(".*") if p.is_file()]
    assert left == []


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    """
    Each kind of file refuses to replace an existing one (nothing is written,
    the error names the file and --force); with force, it is replaced.
    """
    certs.make_ca(tmp_path)
    certs.make_server(tmp_path, ["localhost"])
    certs.make_client(tmp_path, "alice")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for make in (lambda: certs.make_ca(tmp_path),
                 lambda: certs.make_server(tmp_path, ["localhost"]),
                 lambda: certs.make_client(tmp_path, "alice")):
        with pytest.raises(certs.CertsError, match="already exist.*--force"):
            make()
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    server = certs.make_server(tmp_path, ["localhost"], force=True)
    assert server.cert.read_bytes() != before[server.cert]


@pytest.mark.parametrize("san", ["", "bad_name", "-x.example", "IP:localhost", "a..b"])
def test_bad_subject_alt_names_are_refused(tmp_path: Path, san: str) -> None:
    """
    A --san that is neither a host name nor an IP address is refused before
    anything is written.
    """
    certs.make_ca(tmp_path)
    with pytest.raises(certs.CertsError, match="--san"):
        certs.make_server(tmp_path, [san])
    assert not (tmp_path / "server.pem").exists()


@pytest.mark.parametrize("identity", ["../alice", ".hidden", "a b", "a/b", ""])
def test_identities_that_are_not_file_names_are_refused(tmp_path: Path, identity: str) -> None:
    """
    An identity that could not name its files safely (a path, a dot file,
    spaces) is refused before anything is written.
    """
    certs.make_ca(tmp_path)
    with pytest.raises(certs.CertsError, match="identity"):
        certs.make_client(tmp_path, identity)
    assert not (tmp_path / "clients").exists()


def test_a_certificate_needs_a_ca(tmp_path: Path) -> None:
    """
    Without a CA in the folder, making a certificate fails, saying how to
    make one.
    """
    with pytest.raises(certs.CertsError, match="pfo3-certs ca"):
        certs.make_client(tmp_path, "alice")


def test_command_line_start_to_finish(tmp_path: Path) -> None:
    """
    C{pfo3-certs ca}, C{server --san ...} and C{client IDENTITY} write the
    files under C{--dir} (C{tls} by default) and print their paths; run
    again, C{ca} prints one [ERROR] line naming the files and --force,
    exits 1 and keeps the CA.
    """
    assert run_certs(tmp_path, "ca").stdout.split() == ["tls/ca.key", "tls/ca/ca.pem"]
    done = run_certs(tmp_path, "server", "--san", "localhost", "--san", "127.0.0.1")
    assert done.returncode == 0 and done.stdout.split() == ["tls/server.key", "tls/server.pem"]
    done = run_certs(tmp_path, "client", "alice", "--dir", "tls")
    assert done.stdout.split() == ["tls/clients/alice.key", "tls/clients/alice.pem"]
    ca = (tmp_path / "tls" / "ca" / "ca.pem").read_bytes()
    again = run_certs(tmp_path, "ca")
    assert again.returncode == 1 and again.stdout == ""
    [line] = again.stderr.splitlines()
    assert line.startswith("[ERROR] ") and "tls/ca.key" in line and "--force" in line
    assert (tmp_path / "tls" / "ca" / "ca.pem").read_bytes() == ca
    assert run_certs(tmp_path, "ca", "--force").returncode == 0
    assert (tmp_path / "tls" / "ca" / "ca.pem").read_bytes() != ca


def test_help_explains_each_command(tmp_path: Path) -> None:
    """
    --help lists the three commands; each command's --help names the files
    it writes and its options; a server certificate without --san is a
    usage error (exit 2).
    """
    top = run_certs(tmp_path, "--help").stdout
    assert all(word in top for word in ("ca", "server", "client", "--tls-client-ca"))
    server = run_certs(tmp_path, "server", "--help").stdout
    assert "--san" in server and "certKey=" in server and "--force" in server
    client = run_certs(tmp_path, "client", "--help").stdout
    assert "CN=IDENTITY" in client and "certificate=" in client
    assert run_certs(tmp_path, "server").returncode == 2
