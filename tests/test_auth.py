"""
Authentication and abuse limits, over in-memory transports and a fake clock:
JWT checks (L{pfo3.auth.JWTAuthenticator}), what the orchestrator does with
identities (C{op: auth}, per-request tokens, C{tipos}, C{tasa}) and the
connection gate (L{pfo3.gate.Gate}).
"""

from __future__ import annotations

import json
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from pfo3 import tokens
from pfo3.auth import (
    IAuthenticator,
    Identity,
    JWTAuthenticator,
    OpenAuthenticator,
    RateLimiter,
    authenticator_from_options,
)
from pfo3.errors import ExpiredToken, InvalidToken, RateLimited
from pfo3.gate import DEFAULT_MAX_AUTH_FAILURES, Gate, parse_networks
from pfo3.protocol import REFUSE_GRACE, TaskFactory, TaskProtocol
from pfo3.store import MemoryStore
from pfo3.testing import FakeReactor, make_server

from .conftest import b64, connect_transport, handmade_token, take_replies

SECRET = b"s" * 32


def token(claims: Optional[Dict[str, Any]] = None, key: Any = SECRET, algorithm: str = "HS256",
          **extra: Any) -> str:
    body: Dict[str, Any] = {"sub": "alice", "exp": int(time.time()) + 3600}
    body.update(claims or {})
    body.update(extra)
    return jwt.encode({k: v for k, v in body.items() if v is not None}, key, algorithm=algorithm)


class JWTAuthenticatorTests(SynchronousTestCase):
    """
    What a token must be to prove an identity.
    """

    def setUp(self) -> None:
        self.auth = JWTAuthenticator.from_secret(SECRET)

    def refused(self, text: str, kind: type = InvalidToken) -> str:
        with self.assertRaises(kind) as cm:  # type: ignore[var-annotated]
            self.auth.authenticate(text)
        return str(cm.exception.mensaje)

    def test_valid_token(self) -> None:
        """
        A token signed with the secret gives its subject and restrictions.
        """
        identity = self.auth.authenticate(token(tipos=["Uppercase", 2], tasa=5))
        self.assertEqual(identity.name, "alice")
        self.assertEqual(identity.tipos, frozenset({"uppercase", "2"}))
        self.assertEqual(identity.tasa, 5.0)

    def test_forged_signature(self) -> None:
        """
        A token signed with another secret is C{token_invalido}.
        """
        self.assertIn("firma", self.refused(token(key=b"x" * 32)))

    def test_tampered_claims(self) -> None:
        """
        Changing the claims of a signed token breaks its signature.
        """
        head, _, sig = token().split(".")
        forged = b64(json.dumps({"sub": "root", "exp": int(time.time()) + 3600}).encode())
        self.refused(f"{head}.{forged}.{sig}")

    def test_alg_none(self) -> None:
        """
        An unsigned token (C{alg: none}) is refused.
        """
        claims = {"sub": "root", "exp": int(time.time()) + 3600}
        unsigned = handmade_token({"alg": "none", "typ": "JWT"}, claims, None)
        self.assertIn("algoritmo", self.refused(unsigned))

    def test_rs_hs_confusion(self) -> None:
        """
        A server that checks RS256 with a public key refuses an HS256 token
        whose HMAC key is that (public) key's PEM text.
        """
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        auth = JWTAuthenticator.from_public_key(pem)
        claims = {"sub": "root", "exp": int(time.time()) + 3600}
        with self.assertRaises(InvalidToken):
            auth.authenticate(handmade_token({"alg": "HS256", "typ": "JWT"}, claims, pem))
        self.assertEqual(auth.authenticate(token(key=private, algorithm="RS256")).name, "alice")

    def test_expired(self) -> None:
        """
        A token past C{exp} (and the leeway) is C{token_expirado}; one just
        inside the leeway is still accepted.
        """
        self.refused(token(exp=int(time.time()) - 120), ExpiredToken)
        self.assertEqual(self.auth.authenticate(token(exp=int(time.time()) - 5)).name, "alice")

    def test_not_yet_valid(self) -> None:
        """
        A token whose C{nbf} is in the future is refused.
        """
        self.assertIn("nbf", self.refused(token(nbf=int(time.time()) + 600)))

    def test_required_claims(self) -> None:
        """
        Tokens without C{sub} or without C{exp} are refused.
        """
        self.refused(token(sub=None))
        self.refused(token(exp=None))

    def test_malformed_claims(self) -> None:
        """
        C{sub}, C{tipos} and C{tasa} of the wrong shape are refused.
        """
        self.refused(token(sub=""))
        self.refused(token(tipos="uppercase"))
        self.refused(token(tipos=[["x"]]))
        self.refused(token(tasa=0))
        self.refused(token(tasa="5"))

    def test_not_a_jwt(self) -> None:
        """
        Text that is not a JWT is C{token_invalido}.
        """
        self.refused("abc.def.ghi")
        self.refused("hola")

    def test_issuer_and_audience(self) -> None:
        """
        With an issuer and an audience configured, a token must name both.
        """
        auth = JWTAuthenticator.from_secret(SECRET, issuer="pfo3-ca", audience="pfo3")
        self.assertEqual(auth.authenticate(token(iss="pfo3-ca", aud="pfo3")).name, "alice")
        for bad in (token(iss="pfo3-ca", aud="otro"), token(iss="otro", aud="pfo3"),
                    token(iss="pfo3-ca"), token(aud="pfo3")):
            with self.assertRaises(InvalidToken):
                auth.authenticate(bad)

    def test_remembered_token_still_expires(self) -> None:
        """
        A token verified once is remembered, but its expiry is read at
        every use.
        """
        now = [time.time()]
        auth = JWTAuthenticator.from_secret(SECRET, now=lambda: now[0], leeway=0)
        text = token(exp=int(now[0]) + 10)
        self.assertEqual(auth.authenticate(text).name, "alice")
        now[0] += 11
        with self.assertRaises(ExpiredToken):
            auth.authenticate(text)

    def test_crit_header(self) -> None:
        """
        A token whose header marks an extension as critical (C{crit}) that
        the server does not implement is refused.
        """
        claims = {"sub": "alice", "exp": int(time.time()) + 3600}
        self.refused(handmade_token({"alg": "HS256", "typ": "JWT", "crit": ["exp"]}, claims,
                                    SECRET))
        self.refused(handmade_token({"alg": "HS256", "typ": "JWT", "crit": ["b64"], "b64": False},
                                    claims, SECRET))

    def test_audience_without_one_configured(self) -> None:
        """
        A token meant for some audience is refused by a server that
        expects none: it was issued for another service.
        """
        self.refused(token(aud="otro-servicio"))

    def test_key_as_secret(self) -> None:
        """
        A PEM public key given as the HS256 secret (the mix-up behind key
        confusion) is a usage error at start, not a failure per request.
        """
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        with self.assertRaises(usage.UsageError):
            JWTAuthenticator.from_secret(pem)

    def test_short_secret(self) -> None:
        """
        A secret shorter than 32 bytes is a usage error.
        """
        with self.assertRaises(usage.UsageError):
            JWTAuthenticator.from_secret(b"corto")

    def test_public_key_kinds(self) -> None:
        """
        An RSA key (2048 bits or more) means RS256, an EC P-256 key ES256;
        weaker or other keys are usage errors.
        """
        def pem(private: Any) -> bytes:
            return bytes(private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

        self.assertEqual(JWTAuthenticator.from_public_key(
            pem(ec.generate_private_key(ec.SECP256R1()))).algorithm, "ES256")
        for weak in (rsa.generate_private_key(public_exponent=65537, key_size=1024),
                     ec.generate_private_key(ec.SECP384R1()),
                     ed25519.Ed25519PrivateKey.generate()):
            with self.assertRaises(usage.UsageError):
                JWTAuthenticator.from_public_key(pem(weak))
        with self.assertRaises(usage.UsageError):
            JWTAuthenticator.from_public_key(b"not a key")

    def test_options(self) -> None:
        """
        Without keys the server is open; both keys, or issuer without a key,
        are usage errors; the environment's secret turns JWT on.
        """
        self.assertIsInstance(authenticator_from_options(None, None, None, None), OpenAuthenticator)
        with self.assertRaises(usage.UsageError):
            authenticator_from_options("a", "b", None, None)
        with self.assertRaises(usage.UsageError):
            authenticator_from_options(None, None, "iss", None)
        with self.assertRaises(usage.UsageError):
            authenticator_from_options("/nonexistent/secret", None, None, None)
        env = authenticator_from_options(None, None, None, None, env_secret="e" * 40)
        self.assertTrue(IAuthenticator.providedBy(env))
        self.assertTrue(env.required)

    def test_minted_token_verifies_whatever_the_secret_holds(self) -> None:
        """
        A token C{pfo3-token} mints from a secret file verifies against the
        server's reading of the same file, even when the secret's bytes
        begin or end with blanks (a random secret does, now and then); only
        the line end is not part of it.
        """
        for body in (b" \t" + bytes(range(40, 70)) + b"\x0b ", b"\r" + b"s" * 31):
            with self.subTest(body=body):
                with tempfile.NamedTemporaryFile("wb", suffix=".secret") as f:
                    f.write(body + b"\n")
                    f.flush()
                    path = f.name
                    options = tokens.Options()
                    options.parseOptions(["--sub", "alice", "--secret-file", path])
                    server = authenticator_from_options(path, None, None, None)
                    self.assertEqual(server.authenticate(tokens.sign(options)).name, "alice")


class RateLimiterTests(SynchronousTestCase):
    """
    A token bucket per identity.
    """

    def test_bucket(self) -> None:
        """
        An identity may start C{rate} tasks at once, then one per
        C{1/rate} seconds; others have buckets of their own.
        """
        clock = FakeReactor()
        limiter = RateLimiter(clock.seconds, 2)
        ana, beto = Identity("ana"), Identity("beto")
        limiter.take(ana, "1")
        limiter.take(ana, "2")
        with self.assertRaises(RateLimited):
            limiter.take(ana, "3")
        limiter.take(beto, "1")
        clock.advance(0.5)
        limiter.take(ana, "4")
        with self.assertRaises(RateLimited):
            limiter.take(ana, "5")

    def test_server_rate_is_a_ceiling(self) -> None:
        """
        A token's C{tasa} may lower an identity's rate, not raise it above
        the server's.
        """
        limiter = RateLimiter(FakeReactor().seconds, 1)
        greedy = Identity("greedy", tasa=100)
        limiter.take(greedy, None)
        with self.assertRaises(RateLimited):
            limiter.take(greedy, None)

    def test_clock_stepping_back(self) -> None:
        """
        A wall clock that steps back neither refills a bucket nor locks the
        identity out once time moves on again.
        """
        now = [1000.0]
        limiter = RateLimiter(lambda: now[0], 1)
        ana = Identity("ana")
        limiter.take(ana, None)
        now[0] = 400.0
        with self.assertRaises(RateLimited):
            limiter.take(ana, None)
        now[0] = 401.0
        limiter.take(ana, None)

    def test_identity_rate_overrides(self) -> None:
        """
        A token's C{tasa} applies instead of the default, even without one.
        """
        limiter = RateLimiter(FakeReactor().seconds, 0)
        limiter.take(Identity("libre"), None)
        limited = Identity("lenta", tasa=0.5)
        limiter.take(limited, None)
        with self.assertRaises(RateLimited):
            limiter.take(limited, None)


# -- through the protocol ------------------------------------------------------


def connect(factory: TaskFactory, host: str = "10.0.0.1") -> Tuple[TaskProtocol, StringTransport]:
    proto, transport = connect_transport(factory, IPv4Address("TCP", host, 40000))
    return proto, transport


def send(proto: TaskProtocol, **request: Any) -> None:
    proto.dataReceived(json.dumps(request).encode() + b"\n")


replies = take_replies


class AuthenticatedServerTests(SynchronousTestCase):
    """
    A server that requires tokens: what runs, what is refused, whose it is.
    """

    def setUp(self) -> None:
        self.clock = FakeReactor()
        self.store = MemoryStore(self.clock)
        self.factory = make_server(
            reactor=self.clock, store=self.store,
            authenticator=JWTAuthenticator.from_secret(SECRET))
        self.orch = self.factory.orchestrator

    def test_no_token(self) -> None:
        """
        A task without a token is C{token_faltante} and does not run;
        C{ping} still answers, C{tipos} does not.
        """
        p, t = connect(self.factory)
        send(p, tarea_id="a", tipo="1", contenido="hola")
        send(p, op="ping")
        send(p, op="tipos")
        got = replies(t)
        self.assertEqual([r.get("codigo") for r in got], ["token_faltante", None, "token_faltante"])
        self.assertEqual(got[0]["tarea_id"], "a")
        self.assertEqual(got[1]["resultado"], "pong")
        self.assertEqual(self.orch.completed, 0)
        self.assertIsNone(self.successResultOf(self.store.get("", "a")))

    def test_op_auth(self) -> None:
        """
        After C{op: auth} the connection's tasks run, recorded under the
        token's subject.
        """
        p, t = connect(self.factory)
        send(p, op="auth", token=token(), tarea_id="login")
        send(p, tarea_id="a", tipo="1", contenido="hola")
        got = replies(t)
        self.assertEqual(got[0]["resultado"]["identidad"], "alice")
        self.assertEqual(got[0]["tarea_id"], "login")
        self.assertEqual(got[1]["resultado"], "HOLA")
        self.assertEqual(self.successResultOf(self.store.get("alice", "a")).estado, "ok")
        send(p, op="estado", tarea_id="a")
        self.assertEqual(replies(t)[0]["resultado"]["resultado"], "HOLA")

    def test_bad_op_auth(self) -> None:
        """
        A refused C{op: auth} leaves the connection unauthenticated; C{auth}
        without a token is C{token_faltante}.
        """
        p, t = connect(self.factory)
        send(p, op="auth", token=token(key=b"y" * 32))
        send(p, op="auth")
        send(p, tipo="1", contenido="hola")
        self.assertEqual([r["codigo"] for r in replies(t)],
                         ["token_invalido", "token_faltante", "token_faltante"])
        self.assertFalse(p.session.authenticated)

    def test_token_per_request(self) -> None:
        """
        A request may carry its own token; each request's owner is its
        token's subject, and a bad token refuses that request alone.
        """
        p, t = connect(self.factory)
        send(p, tarea_id="a", tipo="1", contenido="hola", token=token(sub="ana"))
        send(p, tarea_id="b", tipo="1", contenido="hola", token=token(sub="beto"))
        send(p, tarea_id="c", tipo="1", contenido="hola", token="x.y.z")
        send(p, tarea_id="d", tipo="1", contenido="hola", token=17)
        got = replies(t)
        self.assertEqual([r.get("codigo") for r in got],
                         [None, None, "token_invalido", "token_invalido"])
        self.assertEqual(self.successResultOf(self.store.get("ana", "a")).estado, "ok")
        self.assertEqual(self.successResultOf(self.store.get("beto", "b")).estado, "ok")
        self.assertIsNone(self.successResultOf(self.store.get("ana", "b")))
        self.assertEqual(self.orch.completed, 2)

    def test_forbidden_tipo(self) -> None:
        """
        C{tipos} restricts what an identity runs, by name, alias or code.
        """
        p, t = connect(self.factory)
        send(p, op="auth", token=token(tipos=["mayus", "2"]))
        send(p, tipo="uppercase", contenido="a")
        send(p, tipo="reverse", contenido="ab")
        send(p, tipo="word_count", contenido="a b")
        send(p, tipo="sleep", contenido=0, esperar=True)
        got = replies(t)[1:]
        self.assertEqual([r.get("codigo") for r in got], [None, None, "prohibido", "prohibido"])
        self.assertEqual(self.orch.completed, 2)

    def test_rate(self) -> None:
        """
        C{tasa} limits one identity's tasks per second across its
        connections; time refills it.
        """
        text = token(tasa=2)
        p1, t1 = connect(self.factory)
        p2, t2 = connect(self.factory)
        send(p1, op="auth", token=text)
        send(p1, tipo="1", contenido="a")
        send(p2, tipo="1", contenido="b", token=text)
        send(p2, tipo="1", contenido="c", token=text)
        self.assertEqual([r.get("codigo") for r in replies(t1)[1:] + replies(t2)],
                         [None, None, "tasa_excedida"])
        self.clock.advance(0.5)
        send(p1, tipo="1", contenido="d")
        self.assertEqual(replies(t1)[0]["resultado"], "D")

    def test_expiry_on_an_open_connection(self) -> None:
        """
        A connection authenticated with a token that then expires gets
        C{token_expirado} until it authenticates again.
        """
        now = [time.time()]
        factory = make_server(reactor=self.clock, authenticator=JWTAuthenticator.from_secret(
            SECRET, now=lambda: now[0], leeway=0))
        p, t = connect(factory)
        send(p, op="auth", token=token(exp=int(now[0]) + 60))
        send(p, tipo="1", contenido="a")
        now[0] += 61
        send(p, tipo="1", contenido="b")
        send(p, op="auth", token=token(exp=int(now[0]) + 60))
        send(p, tipo="1", contenido="c")
        self.assertEqual([r.get("codigo") for r in replies(t)],
                         [None, None, "token_expirado", None, None])

    def test_identity_in_the_log(self) -> None:
        """
        The task log names the identity.
        """
        self.orch.log_every = 1
        events: List[Dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        p, t = connect(self.factory)
        send(p, tipo="1", contenido="a", token=token(sub="carla"))
        tasks = [e for e in events if e.get("tipo") == "uppercase"]
        self.assertEqual([e["identity"] for e in tasks], ["carla"])

    def test_certificate_identity(self) -> None:
        """
        A connection given an identity (a client certificate) runs tasks
        as it without a token.
        """
        p, t = connect(self.factory)
        p.session.set_identity(Identity.from_certificate("dev-1"))
        send(p, tarea_id="a", tipo="1", contenido="hola")
        self.assertEqual(replies(t)[0]["resultado"], "HOLA")
        self.assertEqual(self.successResultOf(self.store.get("dev-1", "a")).estado, "ok")


class OpenServerTests(SynchronousTestCase):
    """
    Without an authenticator nothing changes for clients.
    """

    def test_open(self) -> None:
        """
        Tasks run without tokens; a token is not checked; C{op: auth}
        answers with no identity.
        """
        factory = make_server()
        p, t = connect(factory)
        send(p, tipo="1", contenido="a")
        send(p, tipo="1", contenido="b", token="no-es-un-jwt")
        send(p, op="auth", token="no-es-un-jwt")
        got = replies(t)
        self.assertEqual([r["resultado"] for r in got[:2]], ["A", "B"])
        self.assertEqual(got[2]["resultado"]["identidad"], None)

    def test_rate_for_everyone(self) -> None:
        """
        A default rate on an open server limits the one anonymous identity.
        """
        factory = make_server(rate=1)
        p, t = connect(factory)
        send(p, tipo="1", contenido="a")
        send(p, tipo="1", contenido="b")
        self.assertEqual([r.get("codigo") for r in replies(t)], [None, "tasa_excedida"])


class GateTests(SynchronousTestCase):
    """
    Connection limits.
    """

    def setUp(self) -> None:
        self.clock = FakeReactor()

    def server(self, **kw: Any) -> TaskFactory:
        auth = kw.pop("auth", False)
        gate = Gate(self.clock, auth_required=auth, **kw)
        return make_server(reactor=self.clock, gate=gate,
                           authenticator=JWTAuthenticator.from_secret(SECRET) if auth else None)

    def assertRefused(self, transport: StringTransport, codigo: str) -> None:
        self.assertEqual([r["codigo"] for r in replies(transport)], [codigo])
        self.assertTrue(transport.disconnecting)

    def test_max_connections(self) -> None:
        """
        Past C{max_connections} a new connection is answered
        C{demasiadas_conexiones} and closed; once one closes, there is room.
        """
        factory = self.server(max_connections=2)
        p1, _ = connect(factory)
        connect(factory)
        p3, t3 = connect(factory)
        self.assertRefused(t3, "demasiadas_conexiones")
        p3.connectionLost()
        p1.connectionLost()
        p4, t4 = connect(factory)
        send(p4, op="ping")
        self.assertEqual(replies(t4)[0]["resultado"], "pong")
        self.assertFalse(t4.disconnecting)

    def test_max_per_peer(self) -> None:
        """
        Past C{max_per_peer} connections from one address, the next from it
        is refused; other addresses are not affected.
        """
        factory = self.server(max_per_peer=1)
        connect(factory, "10.0.0.1")
        _, t2 = connect(factory, "10.0.0.1")
        _, t3 = connect(factory, "10.0.0.2")
        self.assertRefused(t2, "demasiadas_conexiones")
        self.assertFalse(t3.disconnecting)

    def test_auth_timeout(self) -> None:
        """
        A connection that does not authenticate within C{auth_timeout} is
        answered C{token_faltante} and closed; one that did stays.
        """
        factory = self.server(auth=True, auth_timeout=5)
        _, lazy = connect(factory)
        p, busy = connect(factory)
        send(p, op="auth", token=token())
        replies(busy)
        self.clock.advance(5)
        self.assertRefused(lazy, "token_faltante")
        self.assertFalse(busy.disconnecting)
        self.assertEqual(factory.gate.unauthenticated, 0)

    def test_max_unauthenticated(self) -> None:
        """
        Past C{max_unauthenticated} connections still unauthenticated, new
        ones are refused; authenticating frees a place.
        """
        factory = self.server(auth=True, max_unauthenticated=2)
        p1, _ = connect(factory)
        connect(factory)
        _, t3 = connect(factory)
        self.assertRefused(t3, "demasiadas_conexiones")
        send(p1, tipo="1", contenido="x", token=token())
        _, t4 = connect(factory)
        self.assertFalse(t4.disconnecting)
        self.assertEqual(factory.gate.unauthenticated, 2)

    def test_per_peer_counted_at_once_with_client_certificates(self) -> None:
        """
        With client certificates on, a connection still counts against its
        address as soon as it is made (only the certificate waits for the
        first bytes), so silent connections cannot pile up.
        """
        gate = Gate(self.clock, max_per_peer=1, certificate_identity=lambda transport: None)
        factory = make_server(reactor=self.clock, gate=gate)
        connect(factory, "10.0.0.1")
        _, t2 = connect(factory, "10.0.0.1")
        self.assertRefused(t2, "demasiadas_conexiones")

    def test_refused_connection_is_dropped_if_it_lingers(self) -> None:
        """
        A refused connection that does not close (a TLS client that never
        finishes its handshake, a client that never reads) is dropped after
        a grace period, and its place is free again.
        """
        factory = self.server(max_connections=1)
        first, _ = connect(factory)
        proto, transport = connect(factory)
        aborted: List[bool] = []
        transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
        self.clock.advance(REFUSE_GRACE)
        self.assertEqual(aborted, [True])
        proto.connectionLost()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_counts_return_to_zero(self) -> None:
        """
        Whatever happened to them, closed connections count no more.
        """
        factory = self.server(auth=True, max_per_peer=2, max_connections=3)
        conns = [connect(factory) for _ in range(4)]
        send(conns[0][0], op="auth", token=token())
        for p, _ in conns:
            p.connectionLost()
        gate = factory.gate
        self.assertEqual((gate.open, gate.unauthenticated, gate._per_peer), (0, 0, {}))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class GateAddressTests(SynchronousTestCase):
    """
    Which addresses the gate counts and trusts.
    """

    def setUp(self) -> None:
        self.clock = FakeReactor()

    def test_unix_clients_are_not_one_peer(self) -> None:
        """
        Clients of a UNIX socket have no address to tell them apart: the
        per-peer limit does not count them, so a second one is not refused
        (the total limit still applies).
        """
        factory = make_server(reactor=self.clock,
                              gate=Gate(self.clock, max_per_peer=1, max_connections=3))
        conns = [connect_transport(factory, UNIXAddress(None)) for _ in range(4)]
        for p, t in conns[:3]:
            send(p, op="ping")
            self.assertEqual(replies(t)[0]["resultado"], "pong")
            self.assertFalse(t.disconnecting)
        self.assertEqual([r["codigo"] for r in replies(conns[3][1])], ["demasiadas_conexiones"])
        self.assertEqual(factory.gate._per_peer, {})

    def test_ipv4_mapped_peer_is_its_ipv4_address(self) -> None:
        """
        On a dual-stack IPv6 listener an IPv4 client appears as
        C{::ffff:a.b.c.d}: it counts against the same per-peer limit as
        C{a.b.c.d}.
        """
        factory = make_server(reactor=self.clock, gate=Gate(self.clock, max_per_peer=1))
        connect(factory, "10.0.0.1")
        _, t = connect_transport(factory, IPv6Address("TCP", "::ffff:10.0.0.1", 40001))
        self.assertEqual([r["codigo"] for r in replies(t)], ["demasiadas_conexiones"])

    def test_ipv4_mapped_proxy_is_trusted_by_its_ipv4_network(self) -> None:
        """
        A proxy reaching a dual-stack C{tcp6} PROXY port from 10.0.0.5 shows
        as C{::ffff:10.0.0.5}; C{--proxy-from 10.0.0.0/24} trusts it, and
        still not C{::ffff:10.0.1.5}.
        """
        gate = Gate(self.clock, proxies=parse_networks(["10.0.0.0/24"]))
        self.assertTrue(gate.trusts(IPv6Address("TCP", "::ffff:10.0.0.5", 1)))
        self.assertTrue(gate.trusts(IPv4Address("TCP", "10.0.0.5", 1)))
        self.assertFalse(gate.trusts(IPv6Address("TCP", "::ffff:10.0.1.5", 1)))
        self.assertFalse(gate.trusts(IPv6Address("TCP", "::1", 1)))


class AuthFailureTests(SynchronousTestCase):
    """
    A connection that keeps sending refused tokens is closed.
    """

    def setUp(self) -> None:
        self.clock = FakeReactor()

    def server(self, **kw: Any) -> TaskFactory:
        gate = Gate(self.clock, auth_required=True, **kw)
        return make_server(reactor=self.clock, gate=gate,
                           authenticator=JWTAuthenticator.from_secret(SECRET))

    def test_closed_after_the_limit_in_one_read(self) -> None:
        """
        Fifty bad tokens in one read get C{max_auth_failures} replies, the
        last saying the connection closes, and the connection closes; no
        task runs.
        """
        factory = self.server()
        p, t = connect(factory)
        bad = token(key=b"y" * 32)
        p.dataReceived(b"".join(
            json.dumps({"tarea_id": str(i), "tipo": "1", "contenido": "x", "token": bad}
                       ).encode() + b"\n" for i in range(50)))
        self.clock.advance(0)
        got = replies(t)
        self.assertEqual([r["codigo"] for r in got], ["token_invalido"] * DEFAULT_MAX_AUTH_FAILURES)
        self.assertEqual([r["tarea_id"] for r in got],
                         [str(i) for i in range(DEFAULT_MAX_AUTH_FAILURES)])
        self.assertIn("se cierra la conexión", got[-1]["mensaje"])
        self.assertNotIn("se cierra", got[-2]["mensaje"])
        self.assertTrue(t.disconnecting)
        self.assertEqual(factory.orchestrator.completed, 0)

    def test_closed_after_the_limit_over_several_reads(self) -> None:
        """
        Failures add up across reads and kinds (C{op: auth}, a request's
        token, an expired token); the connection's earlier replies come
        before the last error.
        """
        factory = self.server(max_auth_failures=3)
        p, t = connect(factory)
        send(p, op="auth", token="x.y.z", tarea_id="a")
        send(p, op="ping", tarea_id="b")
        send(p, tarea_id="c", tipo="1", contenido="x", token=token(exp=int(time.time()) - 3600))
        self.assertEqual([r.get("codigo") for r in replies(t)], ["token_invalido", None,
                                                                  "token_expirado"])
        self.assertFalse(t.disconnecting)
        send(p, op="auth", token="x.y.z", tarea_id="d")
        send(p, op="auth", token=token(), tarea_id="e")
        self.clock.advance(0)
        got = replies(t)
        self.assertEqual([(r["tarea_id"], r["codigo"]) for r in got], [("d", "token_invalido")])
        self.assertTrue(t.disconnecting)

    def test_good_tokens_do_not_count(self) -> None:
        """
        Valid tokens, missing ones and forbidden task types are not
        failed authentications: the connection stays.
        """
        factory = self.server(max_auth_failures=1)
        p, t = connect(factory)
        send(p, tipo="1", contenido="x")
        send(p, tipo="1", contenido="x", token=token(tipos=["2"]))
        for _ in range(3):
            send(p, tipo="1", contenido="x", token=token())
        self.clock.advance(0)
        self.assertEqual([r.get("codigo") for r in replies(t)],
                         ["token_faltante", "prohibido", None, None, None])
        self.assertFalse(t.disconnecting)

    def test_zero_turns_it_off(self) -> None:
        """
        With C{max_auth_failures=0} refused tokens never close the
        connection.
        """
        factory = self.server(max_auth_failures=0)
        p, t = connect(factory)
        for _ in range(20):
            send(p, op="auth", token="x.y.z")
        self.clock.advance(0)
        self.assertEqual(len(replies(t)), 20)
        self.assertFalse(t.disconnecting)

    def test_gone_before_the_close(self) -> None:
        """
        A connection lost before its last refusal is written leaves no
        timer behind.
        """
        factory = self.server(max_auth_failures=1)
        p, t = connect(factory)
        send(p, op="auth", token="x.y.z")
        p.connectionLost()
        self.clock.advance(0)
        self.assertEqual(replies(t), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
