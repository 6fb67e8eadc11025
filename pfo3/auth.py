"""
Authentication: who sends a task, and what that identity may do.

An L{IAuthenticator} turns a bearer token into an L{Identity}, or raises a
typed L{pfo3.errors.Pfo3Error} whose code the client receives.  Two ship:

  - L{OpenAuthenticator}, the embedded default: every client is the one
    anonymous identity, tokens are not asked for (and not checked);
  - L{JWTAuthenticator}: JSON Web Tokens checked with PyJWT against one key
    (an HMAC secret for HS256, or an RSA or EC public key for RS256 or
    ES256), with the algorithm fixed by the key so that no token can choose
    it (no C{alg: none}, no HS/RS confusion).

A verified client certificate (mutual TLS) is an identity too; the protocol
hands it to its session (L{Identity.from_certificate}).

The orchestrator applies an identity's restrictions: which task types it may
run (claim C{tipos}) and how many tasks per second (claim C{tasa}, else the
server's default, enforced by a L{RateLimiter}).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, FrozenSet, List, Optional

from twisted.python import usage
from zope.interface import Attribute, Interface, implementer

from pfo3.errors import ExpiredToken, InvalidToken, RateLimited
from pfo3.store import ANONYMOUS
from pfo3.tasks import TaskType

#: Seconds of clock skew tolerated on C{exp} and C{nbf}.
DEFAULT_LEEWAY = 30.0

#: Shortest HMAC secret accepted, in bytes (RFC 7518, section 3.2: a key
#: at least as long as the hash output).
MIN_SECRET = 32

#: Longest C{sub} accepted, in characters (the store's owner column).
MAX_SUBJECT = 256


class Identity:
    """
    Who a client is, as authentication established it.

    @ivar name: The subject: the store's owner of its tasks, shown in logs.
    @ivar tipos: The task types it may run, as names, aliases or codes
        (lower case); L{None}: any.
    @ivar tasa: Tasks per second it may start; L{None}: the server's
        default.
    @ivar expira: When its credential expires (seconds since the epoch);
        L{None}: never.
    """

    __slots__ = ("name", "tipos", "tasa", "expira")

    def __init__(
        self, name: str, tipos: Optional[FrozenSet[str]] = None,
        tasa: Optional[float] = None, expira: Optional[float] = None,
    ) -> None:
        self.name = name
        self.tipos = tipos
        self.tasa = tasa
        self.expira = expira

    @classmethod
    def from_certificate(cls, subject: str) -> Identity:
        """
        @return: The identity of a client whose certificate the TLS
            handshake verified; it does not expire while connected.
        """
        return cls(subject)

    def allows(self, tasktype: TaskType) -> bool:
        """
        @return: Whether this identity may run C{tasktype}.
        """
        tipos = self.tipos
        if tipos is None:
            return True
        return (
            tasktype.name in tipos or str(tasktype.code) in tipos
            or not tipos.isdisjoint(tasktype.aliases)
        )

    def __repr__(self) -> str:
        return f"Identity({self.name!r}, tipos={self.tipos!r}, tasa={self.tasa!r})"


#: The identity of every client of an open server.
ANONYMOUS_IDENTITY = Identity(ANONYMOUS)


class IAuthenticator(Interface):
    """
    Turns a bearer token into an identity.
    """

    required = Attribute(
        "Whether every task needs an identity: true for a server that checks "
        "tokens, false for an open one.")

    def authenticate(token: str) -> Identity:  # noqa: N805
        """
        @return: The identity the token proves.
        @raise pfo3.errors.Pfo3Error: C{token_invalido} or C{token_expirado}.
        """

    def describe() -> str:
        """
        @return: One line for the start-up log: what is checked.
        """


@implementer(IAuthenticator)
class OpenAuthenticator:
    """
    No authentication: every client is L{ANONYMOUS_IDENTITY}, whatever token
    it sends.
    """

    required = False

    def authenticate(self, token: str) -> Identity:
        return ANONYMOUS_IDENTITY

    def describe(self) -> str:
        return ("authentication off: any client may run any task "
                "(--jwt-secret-file or --jwt-public-key turns it on)")


#: PyJWT's exceptions for a claim that was checked and refused, by the
#: Spanish words clients read.
_REFUSALS = {
    "ImmatureSignatureError": "el token aún no es válido (nbf)",
    "InvalidAudienceError": "el token no es para este servidor (aud)",
    "InvalidIssuerError": "el token no lo emitió quien este servidor acepta (iss)",
    "MissingRequiredClaimError": "al token le falta un dato obligatorio",
    "InvalidAlgorithmError": "el algoritmo del token no está permitido",
    "InvalidSignatureError": "la firma del token no es válida",
    "DecodeError": "el token no es un JWT bien formado",
}


@implementer(IAuthenticator)
class JWTAuthenticator:
    """
    Checks JSON Web Tokens with one key.

    A token must be signed with the key's algorithm, carry C{sub} and
    C{exp}, be within C{exp} and C{nbf} (give or take C{leeway}) and, when
    configured, name this server's issuer and audience.  Optional claims:
    C{tipos} (a list of task types it may run) and C{tasa} (tasks per
    second).

    Tokens already verified are remembered (up to C{cache_size}, keyed by
    the whole token, signature included), so a client that sends its token
    with every request pays for the signature check once; the expiry is
    still checked each time.
    """

    required = True

    def __init__(
        self, key: Any, algorithm: str, issuer: Optional[str] = None,
        audience: Optional[str] = None, leeway: float = DEFAULT_LEEWAY,
        now: Callable[[], float] = time.time, cache_size: int = 4096,
    ) -> None:
        """
        @param key: The HMAC secret (bytes) or the public key object.
        @param algorithm: The one algorithm accepted (C{HS256}, C{RS256} or
            C{ES256}), fixed by the key.
        @param now: The wall clock that C{exp} is read against.
        """
        import jwt

        self._jwt = jwt
        self.key = key
        self.algorithm = algorithm
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway
        self._now = now
        self._cache: Dict[str, Identity] = {}
        self._cache_size = cache_size

    @classmethod
    def from_secret(cls, secret: bytes, **kw: Any) -> JWTAuthenticator:
        """
        An HS256 authenticator.

        @raise usage.UsageError: if the secret is shorter than
            L{MIN_SECRET} bytes.
        """
        if len(secret) < MIN_SECRET:
            raise usage.UsageError(
                f"the JWT secret has {len(secret)} bytes; use at least {MIN_SECRET} "
                "random bytes (e.g. 'head -c 32 /dev/urandom | base64')")
        from jwt.algorithms import HMACAlgorithm
        from jwt.exceptions import InvalidKeyError

        try:
            HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(secret)
        except InvalidKeyError:
            # A public key or certificate as the HMAC secret: the mix-up
            # behind key-confusion attacks, and never what was meant.
            raise usage.UsageError(
                "the JWT secret file holds a key or certificate; for RS256/ES256 give "
                "the public key with --jwt-public-key")
        return cls(secret, "HS256", **kw)

    @classmethod
    def from_public_key(cls, pem: bytes, **kw: Any) -> JWTAuthenticator:
        """
        An RS256 (RSA key) or ES256 (EC P-256 key) authenticator.

        @raise usage.UsageError: for anything else.
        """
        from cryptography.hazmat.primitives.asymmetric import ec, rsa
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        try:
            key = load_pem_public_key(pem)
        except ValueError as e:
            raise usage.UsageError(f"not a PEM public key: {e}")
        if isinstance(key, rsa.RSAPublicKey):
            if key.key_size < 2048:
                raise usage.UsageError(f"the RSA key has {key.key_size} bits; use 2048 or more")
            return cls(key, "RS256", **kw)
        if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
            return cls(key, "ES256", **kw)
        raise usage.UsageError("the public key must be RSA (RS256) or EC P-256 (ES256)")

    def describe(self) -> str:
        checks = [f"JWT {self.algorithm}", "sub", "exp"]
        if self.issuer is not None:
            checks.append(f"iss={self.issuer}")
        if self.audience is not None:
            checks.append(f"aud={self.audience}")
        return "authentication on: every task needs a token (" + ", ".join(checks) + ")"

    def authenticate(self, token: str) -> Identity:
        identity = self._cache.get(token)
        if identity is None:
            identity = self._verify(token)
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[token] = identity
        elif identity.expira is not None and self._now() > identity.expira + self.leeway:
            del self._cache[token]
            raise ExpiredToken("El token expiró.")
        return identity

    def _verify(self, token: str) -> Identity:
        jwt = self._jwt
        try:
            claims = jwt.decode(
                token, self.key, algorithms=[self.algorithm],
                issuer=self.issuer, audience=self.audience, leeway=self.leeway,
                options={"require": ["exp", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise ExpiredToken("El token expiró.")
        except jwt.PyJWTError as e:
            reason = next((text for cls in type(e).__mro__
                           if (text := _REFUSALS.get(cls.__name__)) is not None),
                          "el token no es válido")
            raise InvalidToken(f"Token inválido: {reason}.")
        return _identity(claims)


def _identity(claims: Dict[str, Any]) -> Identity:
    """
    The identity that verified claims describe.

    @raise InvalidToken: if C{sub}, C{tipos} or C{tasa} is malformed.
    """
    sub = claims["sub"]
    if type(sub) is not str or not sub or len(sub) > MAX_SUBJECT:
        raise InvalidToken(
            f"Token inválido: 'sub' debe ser un texto de 1 a {MAX_SUBJECT} caracteres.")
    tipos: Optional[FrozenSet[str]] = None
    if "tipos" in claims:
        raw = claims["tipos"]
        if type(raw) is not list or not all(type(t) in (str, int) for t in raw):
            raise InvalidToken("Token inválido: 'tipos' debe ser una lista de tipos de tarea.")
        tipos = frozenset(str(t).strip().lower() for t in raw)
    tasa: Optional[float] = None
    if "tasa" in claims:
        raw = claims["tasa"]
        if type(raw) not in (int, float) or not 0 < raw < math.inf:
            raise InvalidToken("Token inválido: 'tasa' debe ser un número positivo.")
        tasa = float(raw)
    return Identity(sub, tipos, tasa, float(claims["exp"]))


class RateLimiter:
    """
    A token bucket per identity: each may start C{rate} tasks per second on
    average, and up to one second's worth at once.

    Buckets are forgotten once full again (an identity idle for a second),
    so memory follows the identities active in the last second.

    The buckets live in this process: with C{--processes N} or several
    orchestrators, each has its own, so an identity may start up to N times
    its rate in all (C{docs/security.md}).
    """

    def __init__(self, seconds: Callable[[], float], rate: float = 0.0) -> None:
        """
        @param seconds: The clock.
        @param rate: The default rate for identities whose token sets none
            (C{0}: unlimited).
        """
        self._seconds = seconds
        self.rate = rate
        # name -> [tokens left, when last refilled, rate]
        self._buckets: Dict[str, List[float]] = {}

    def take(self, identity: Identity, tarea_id: Optional[str]) -> None:
        """
        Take one task's token from C{identity}'s bucket.

        @raise RateLimited: if the bucket is empty.
        """
        rate = self.rate
        if identity.tasa is not None and (not rate or identity.tasa < rate):
            rate = identity.tasa  # a claim restricts; the server's rate is a ceiling
        if not rate:
            return
        now = self._seconds()
        bucket = self._buckets.get(identity.name)
        if bucket is None:
            if len(self._buckets) > 10_000:
                self._forget_full(now)
            bucket = self._buckets[identity.name] = [max(1.0, rate), now, rate]
        else:
            # max(): a clock that stepped back refills nothing, takes nothing.
            bucket[0] = min(max(1.0, rate), bucket[0] + max(0.0, now - bucket[1]) * rate)
            bucket[1] = now
            bucket[2] = rate
        if bucket[0] < 1.0:
            raise RateLimited(
                f"Límite de {rate:g} tareas por segundo superado; reintente en "
                f"{(1.0 - bucket[0]) / rate:.2g} s.", tarea_id)
        bucket[0] -= 1.0

    def _forget_full(self, now: float) -> None:
        # A bucket full again is as good as new: forget it.
        for name, (tokens, last, rate) in list(self._buckets.items()):
            if tokens + (now - last) * rate >= max(1.0, rate):
                del self._buckets[name]


def secret_from(data: bytes) -> bytes:
    """
    The HS256 secret a secret file or C{PFO3_JWT_SECRET} holds: everything
    but the line end an editor or C{echo} adds.  The server and
    C{pfo3-token} both read secrets through here, so a token minted from a
    file verifies against the same file whatever bytes it holds.
    """
    return data.rstrip(b"\r\n")


def authenticator_from_options(
    secret_file: Optional[str], public_key_file: Optional[str],
    issuer: Optional[str], audience: Optional[str], leeway: float = DEFAULT_LEEWAY,
    env_secret: Optional[str] = None,
) -> IAuthenticator:
    """
    The authenticator that command-line options ask for.

    @param env_secret: An HS256 secret from the environment, used when
        neither file is given.
    @raise usage.UsageError: if both keys or an unreadable one is given.
    """
    if secret_file and public_key_file:
        raise usage.UsageError("give --jwt-secret-file or --jwt-public-key, not both")
    kw: Dict[str, Any] = {"issuer": issuer, "audience": audience, "leeway": leeway}
    if not (secret_file or public_key_file):
        if env_secret:
            return JWTAuthenticator.from_secret(secret_from(env_secret.encode("utf-8")), **kw)
        if issuer or audience:
            raise usage.UsageError(
                "--jwt-issuer and --jwt-audience need --jwt-secret-file or --jwt-public-key")
        return OpenAuthenticator()
    path = secret_file or public_key_file
    assert path is not None
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise usage.UsageError(f"cannot read {path}: {e.strerror}")
    if secret_file:
        return JWTAuthenticator.from_secret(secret_from(data), **kw)
    return JWTAuthenticator.from_public_key(data, **kw)
