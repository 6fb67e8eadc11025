"""
The C{pfo3-certs} command: a development certificate authority, server
certificates and client certificates, as PEM files that Twisted's endpoint
strings take as they are.

Everything lives in one folder (C{--dir}, C{tls} by default)::

    tls/ca.key            the CA's private key (0600): keep it, never serve it
    tls/ca/ca.pem         the CA's certificate, alone in its folder, for a
                          client's trustRoots= and the server's --tls-client-ca
    tls/server.key        a server's private key (0600)  ssl:...:privateKey=
    tls/server.pem        its certificate, signed by the CA  ssl:...:certKey=
    tls/clients/alice.key a client's private key (0600)  tls:...:privateKey=
    tls/clients/alice.pem its certificate, subject CN=alice  tls:...:certificate=

Built on the C{cryptography} package only (no Twisted), so the tests build
their throwaway certificates with the very same code.  Expected failures
print C{[ERROR] <reason>} on stderr and exit with status 1; usage errors exit
with status 2.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PROGRAM = "pfo3-certs"
DEFAULT_DIR = "tls"
DEFAULT_CA_NAME = "pfo3 development CA"
#: Days a new CA is valid.
CA_DAYS = 3650
#: Days a new server or client certificate is valid (at most until the CA
#: expires).  Below the 398 days browsers and Apple's TLS stack accept.
LEAF_DAYS = 365
#: Clocks that run a little behind still accept a certificate made just now.
BACKDATE = datetime.timedelta(minutes=5)
#: Identities and file names: letters, digits and C{. _ @ -}, not starting
#: with a dot (the identity names the files of its certificate).
_NAME = re.compile(r"[A-Za-z0-9_@-][A-Za-z0-9._@-]{0,127}")

Key = ec.EllipticCurvePrivateKey
#: The keys a CA made elsewhere may have.
CAKey = Union[ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey]


class CertsError(Exception):
    """
    An expected failure: the message says what went wrong and how to fix it.
    """


@dataclass(frozen=True)
class CAFiles:
    """
    Where a certificate authority's files are.

    @ivar key: Its private key.
    @ivar directory: A folder holding only its certificate, for C{trustRoots=}.
    @ivar cert: Its certificate (inside C{directory}).
    """

    key: Path
    directory: Path
    cert: Path

    @classmethod
    def under(cls, folder: Union[str, Path]) -> CAFiles:
        """
        @return: The CA files' places under C{folder}.
        """
        folder = Path(folder)
        return cls(folder / "ca.key", folder / "ca", folder / "ca" / "ca.pem")


@dataclass(frozen=True)
class KeyPairFiles:
    """
    A certificate and its private key, as files.
    """

    key: Path
    cert: Path


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _new_key() -> Key:
    # P-256: as strong as RSA-3072 for today's uses, quick to make, and
    # accepted by every TLS stack pfo3 meets.
    return ec.generate_private_key(ec.SECP256R1())


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False,
        key_cert_sign=signs_certificates, crl_sign=signs_certificates,
        encipher_only=False, decipher_only=False,
    )


def _refuse_existing(paths: Sequence[Path], force: bool) -> None:
    if force:
        return
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise CertsError(
            f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; "
            "nothing was written (--force replaces)")


def _write(path: Path, data: bytes, private: bool) -> None:
    """
    Write C{data} to C{path} all at once: readers never see half a file, and
    a private key is never readable by others, not even for a moment.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if not private:
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _key_pem(key: Key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def parse_san(value: str) -> x509.GeneralName:
    """
    @param value: A host name (C{localhost}, C{pfo3.example.org}) or an IPv4
        or IPv6 address (C{127.0.0.1}, C{::1}); C{DNS:} and C{IP:} prefixes,
        as in OpenSSL's syntax, are accepted too.
    @return: The subjectAltName entry that proves it.
    @raise CertsError: When it is neither.
    """
    kind, sep, rest = value.partition(":")
    if sep and kind.upper() in ("DNS", "IP"):
        value = rest
        if kind.upper() == "DNS":
            return _dns_name(value)
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        if sep and kind.upper() == "IP":
            raise CertsError(f"--san {value!r} is not an IP address")
    return _dns_name(value)


def _dns_name(value: str) -> x509.DNSName:
    labels = value.split(".")
    if not value or not all(
        re.fullmatch(r"(\*|[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)", label)
        for label in labels
    ):
        raise CertsError(f"--san {value!r} is neither a host name nor an IP address")
    return x509.DNSName(value.lower())


def load_ca(ca: CAFiles) -> Tuple[CAKey, x509.Certificate]:
    """
    @return: The CA's private key and certificate.
    @raise CertsError: When they are missing or do not belong together.
    """
    try:
        key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    except FileNotFoundError as e:
        raise CertsError(f"no CA at {e.filename} (make one with: {PROGRAM} ca)")
    except ValueError as e:
        raise CertsError(f"cannot read the CA in {ca.key} and {ca.cert}: {e}")
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise CertsError(f"{ca.key} is neither an EC nor an RSA private key")
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise CertsError(f"{ca.key} is not the key of the certificate {ca.cert}")
    return key, cert


def _spki(public_key: Any) -> bytes:
    return bytes(public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


def make_ca(
    folder: Union[str, Path], common_name: str = DEFAULT_CA_NAME, days: int = CA_DAYS,
    force: bool = False,
) -> CAFiles:
    """
    Make a certificate authority: a CA certificate (C{CA:TRUE}, may sign
    only end-entity certificates) and its private key.

    @param folder: Where to write them (see L{CAFiles.under}).
    @param force: Replace an existing CA (certificates it signed stop being
        trusted by whoever trusts the new one).
    @raise CertsError: When a file exists and not C{force}.
    """
    files = CAFiles.under(folder)
    _refuse_existing([files.key, files.cert], force)
    key = _new_key()
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name)).issuer_name(_name(common_name))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(files.key, _key_pem(key), private=True)
    _write(files.cert, _cert_pem(cert), private=False)
    return files


def _issue(
    ca: CAFiles, common_name: str, usage: x509.ObjectIdentifier,
    san: Optional[Sequence[x509.GeneralName]], days: int, out: KeyPairFiles, force: bool,
) -> KeyPairFiles:
    _refuse_existing([out.key, out.cert], force)
    ca_key, ca_cert = load_ca(ca)
    key = _new_key()
    now = _now()
    end = min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name)).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(san)), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write(out.key, _key_pem(key), private=True)
    _write(out.cert, _cert_pem(cert), private=False)
    return out


def make_server(
    folder: Union[str, Path], san: Sequence[str], name: str = "server",
    common_name: Optional[str] = None, days: int = LEAF_DAYS, force: bool = False,
) -> KeyPairFiles:
    """
    Make a server's key and a certificate for it that the CA in C{folder}
    signs, valid for TLS servers (extendedKeyUsage serverAuth).

    @param san: The host names and IP addresses clients connect to (see
        L{parse_san}); clients check the name they connected to against
        these.  Empty only to test clients: no client accepts such a
        certificate.
    @param name: The files' name: C{folder/NAME.key}, C{folder/NAME.pem}.
    @param common_name: The subject's CN (informative only; by default the
        first of C{san}).
    @raise CertsError: On a bad name, a missing CA, or a file that exists
        and not C{force}.
    """
    _check_name(name, "--name")
    entries = [parse_san(s) for s in san]
    cn = common_name or (san[0].split(":", 1)[-1] if san else name)
    out = KeyPairFiles(Path(folder) / f"{name}.key", Path(folder) / f"{name}.pem")
    return _issue(CAFiles.under(folder), cn, ExtendedKeyUsageOID.SERVER_AUTH, entries,
                  days, out, force)


def client_files(folder: Union[str, Path], identity: str) -> KeyPairFiles:
    """
    @return: Where the certificate of the client C{identity} goes.
    """
    clients = Path(folder) / "clients"
    return KeyPairFiles(clients / f"{identity}.key", clients / f"{identity}.pem")


def make_client(
    folder: Union[str, Path], identity: str, days: int = LEAF_DAYS, force: bool = False,
) -> KeyPairFiles:
    """
    Make a client's key and a certificate for it that the CA in C{folder}
    signs, with subject C{CN=identity}, valid for TLS clients
    (extendedKeyUsage clientAuth).  A server that requires client
    certificates from this CA knows the client as C{identity}.

    @raise CertsError: On a bad identity, a missing CA, or a file that
        exists and not C{force}.
    """
    _check_name(identity, "the identity")
    return _issue(CAFiles.under(folder), identity, ExtendedKeyUsageOID.CLIENT_AUTH, None,
                  days, client_files(folder, identity), force)


def _check_name(value: str, what: str) -> None:
    if not _NAME.fullmatch(value):
        raise CertsError(
            f"{what} {value!r} may hold only letters, digits and . _ @ - "
            "(and not start with a dot)")


def _days(value: str) -> int:
    try:
        days = int(value)
    except ValueError:
        days = 0
    if days < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of days, 1 or more")
    return days


def parser() -> argparse.ArgumentParser:
    """
    @return: The command line of C{pfo3-certs}.
    """
    top = argparse.ArgumentParser(
        prog=PROGRAM,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Make a development certificate authority and the certificates it signs\n"
            "for pfo3 over TLS, as PEM files Twisted endpoint strings take directly.\n"
            "Private keys are written readable by their owner only (0600); existing\n"
            "files are never replaced without --force."),
        epilog="""\
start to finish, in the folder tls/:
  %(prog)s ca
  %(prog)s server --san localhost --san 127.0.0.1
  twistd -n pfo3 --port ssl:9443:privateKey=tls/server.key:certKey=tls/server.pem
  pfo3-client --endpoint tls:localhost:9443:trustRoots=tls/ca ...

mutual TLS, the client known as alice:
  %(prog)s client alice
  twistd -n pfo3 --port ssl:9443:... --tls-client-ca tls/ca
  pfo3-client --endpoint tls:localhost:9443:trustRoots=tls/ca:\\
certificate=tls/clients/alice.pem:privateKey=tls/clients/alice.key ...

'%(prog)s COMMAND --help' describes each command; docs/security.md the rest.""",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--dir", default=DEFAULT_DIR, type=Path, metavar="DIR",
        help="the folder of the CA and its certificates (default: %(default)s)")
    common.add_argument("--force", action="store_true",
                        help="replace files that already exist")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ca = commands.add_parser(
        "ca", parents=[common], help="make a certificate authority",
        description=(
            "Make a certificate authority: DIR/ca.key (its private key, 0600; keep it "
            "off servers) and DIR/ca/ca.pem, alone in DIR/ca: the folder clients name "
            "in trustRoots= and servers in --tls-client-ca. With --force, a new CA "
            "replaces the old one and nothing trusts what the old one signed."))
    ca.add_argument("--cn", default=DEFAULT_CA_NAME, metavar="NAME",
                    help="the CA's common name (default: %(default)s)")
    ca.add_argument("--days", type=_days, default=CA_DAYS,
                    help="days it is valid (default: %(default)s)")

    server = commands.add_parser(
        "server", parents=[common], help="make a server certificate signed by the CA",
        description=(
            "Make DIR/NAME.key (0600) and DIR/NAME.pem, a server certificate the CA "
            "in DIR signs, for the ssl: endpoint's privateKey= and certKey=. Clients "
            "check the name they connect to against its subjectAltName: name every "
            "host name and IP address they use."))
    server.add_argument(
        "--san", action="append", required=True, metavar="HOST",
        help="a host name or IP address clients connect to (repeat: --san localhost "
             "--san 127.0.0.1 --san pfo3.example.org)")
    server.add_argument("--name", default="server",
                        help="the files' name (default: %(default)s)")
    server.add_argument("--cn", metavar="NAME",
                        help="the subject's common name (default: the first --san)")
    server.add_argument("--days", type=_days, default=LEAF_DAYS,
                        help="days it is valid, at most as long as the CA "
                             "(default: %(default)s)")

    client = commands.add_parser(
        "client", parents=[common], help="make a client certificate signed by the CA",
        description=(
            "Make DIR/clients/IDENTITY.key (0600) and DIR/clients/IDENTITY.pem, a "
            "client certificate the CA in DIR signs with subject CN=IDENTITY, for the "
            "tls: client endpoint's privateKey= and certificate=. A server run with "
            "--tls-client-ca DIR/ca knows the client as IDENTITY."))
    client.add_argument("identity", metavar="IDENTITY",
                        help="who the client is, e.g. alice (letters, digits, . _ @ -)")
    client.add_argument("--days", type=_days, default=LEAF_DAYS,
                        help="days it is valid, at most as long as the CA "
                             "(default: %(default)s)")
    return top


def run(args: argparse.Namespace) -> List[Path]:
    """
    Carry out a parsed command line.

    @return: The files written.
    @raise CertsError: On an expected failure.
    """
    if args.command == "ca":
        ca = make_ca(args.dir, args.cn, args.days, args.force)
        return [ca.key, ca.cert]
    if args.command == "server":
        out = make_server(args.dir, args.san, args.name, args.cn, args.days, args.force)
    else:
        out = make_client(args.dir, args.identity, args.days, args.force)
    return [out.key, out.cert]


def main(argv: Optional[Sequence[str]] = None) -> None:
    """
    Run C{pfo3-certs}: print the files written, one a line, and exit 0; or
    print one C{[ERROR]} line and exit 1.
    """
    args = parser().parse_args(argv)
    try:
        written = run(args)
    except (CertsError, OSError) as e:
        sys.stderr.write(f"[ERROR] {e}\n")
        raise SystemExit(1)
    for path in written:
        sys.stdout.write(f"{path}\n")


if __name__ == "__main__":
    main()
