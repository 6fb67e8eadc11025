"""
The C{pfo3-token} command: mint a JSON Web Token for development and tests.

    pfo3-token --sub alice --ttl 3600 --secret-file secret
    pfo3-token --sub bob --private-key jwt-key.pem --tipos uppercase,reverse --tasa 50

It signs with the same key a server checks with (C{--jwt-secret-file}), or
with the private half of the server's C{--jwt-public-key} (RS256 for an RSA
key, ES256 for an EC P-256 key), and prints the token on stdout.  In
production, tokens come from your identity provider; this command is for
trying pfo3 and for its tests.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Dict, List, Optional

from twisted.python import usage

from pfo3.auth import MIN_SECRET, secret_from

PROGRAM = "pfo3-token"


class Options(usage.Options):
    """
    Command-line options of C{pfo3-token}.
    """

    synopsis = f"Usage: {PROGRAM} --sub NAME (--secret-file PATH | --private-key PATH) [options]"
    longdesc = (
        "Print a signed JWT for a pfo3 server that requires one. The secret may also come "
        "from the PFO3_JWT_SECRET environment variable; keys are never read from the "
        "command line."
    )

    optParameters: List[List[Any]] = [
        ["sub", None, None, "The identity the token names (its tasks' owner)."],
        ["ttl", None, 3600, "Seconds until the token expires.", int],
        ["secret-file", None, None, "HS256: the secret the server's --jwt-secret-file holds."],
        ["private-key", None, None,
         "RS256/ES256: a PEM private key whose public half the server's "
         "--jwt-public-key holds."],
        ["iss", None, None, "Issuer claim (for a server with --jwt-issuer)."],
        ["aud", None, None, "Audience claim (for a server with --jwt-audience)."],
        ["tipos", None, None,
         "Comma-separated task types the identity may run (default: all)."],
        ["tasa", None, None, "Tasks per second the identity may start.", float],
    ]

    def postOptions(self) -> None:
        if not self["sub"]:
            raise usage.UsageError("--sub is required")
        if self["ttl"] < 1:
            raise usage.UsageError("--ttl must be at least 1 second")
        if self["secret-file"] and self["private-key"]:
            raise usage.UsageError("give --secret-file or --private-key, not both")
        if self["tasa"] is not None and not self["tasa"] > 0:
            raise usage.UsageError("--tasa must be a positive number")


def claims(options: Options, now: Optional[float] = None) -> Dict[str, Any]:
    """
    @return: The claims the options describe.
    """
    issued = int(time.time() if now is None else now)
    body: Dict[str, Any] = {"sub": options["sub"], "iat": issued, "exp": issued + options["ttl"]}
    if options["iss"]:
        body["iss"] = options["iss"]
    if options["aud"]:
        body["aud"] = options["aud"]
    if options["tipos"]:
        body["tipos"] = [t.strip() for t in options["tipos"].split(",") if t.strip()]
    if options["tasa"] is not None:
        body["tasa"] = options["tasa"]
    return body


def sign(options: Options) -> str:
    """
    @return: The token.
    @raise usage.UsageError: without a usable key.
    """
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    if options["private-key"]:
        with open(options["private-key"], "rb") as f:
            key = load_pem_private_key(f.read(), password=None)
        if isinstance(key, rsa.RSAPrivateKey):
            return jwt.encode(claims(options), key, algorithm="RS256")
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return jwt.encode(claims(options), key, algorithm="ES256")
        raise usage.UsageError("the private key must be RSA or EC P-256")
    if options["secret-file"]:
        with open(options["secret-file"], "rb") as f:
            secret = secret_from(f.read())
    else:
        secret = secret_from(os.environ.get("PFO3_JWT_SECRET", "").encode("utf-8"))
        if not secret:
            raise usage.UsageError(
                "give --secret-file or --private-key (or set PFO3_JWT_SECRET)")
    if len(secret) < MIN_SECRET:
        raise usage.UsageError(f"the secret must have at least {MIN_SECRET} bytes")
    return jwt.encode(claims(options), secret, algorithm="HS256")


def main(argv: Optional[List[str]] = None) -> int:
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
        print(sign(options))
    except usage.UsageError as e:
        print(f"{PROGRAM}: {e}\n{options.synopsis}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"[ERROR] {e.filename}: {e.strerror}", file=sys.stderr)
        return 1
    except ValueError as e:  # a key PyJWT or cryptography cannot use
        print(f"[ERROR] {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
