"""
What the HTTP API and the WebSocket endpoint share: the orchestrator, the
connection gate, the limits, the CORS policy and the dashboard's counters.
"""

from __future__ import annotations

from typing import Iterable, Optional, Set
from urllib.parse import urlsplit

from twisted.internet.interfaces import IReactorTime

from pfo3.errors import InvalidToken, MissingToken
from pfo3.gate import Gate
from pfo3.orchestrator import Orchestrator
from pfo3.protocol import DEFAULT_MAX_INFLIGHT, DEFAULT_MAX_LINE
from pfo3.web.panel import Panel


def bearer_token(header: Optional[str]) -> Optional[str]:
    """
    @param header: An C{Authorization} header's value, or L{None}.
    @return: Its bearer token; L{None} without the header.
    @raise InvalidToken: for a header that is not C{Bearer <token>}.
    """
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise InvalidToken("La cabecera Authorization debe ser 'Bearer <token>'.")
    return token


class Gateway:
    """
    The web side of one server.

    @ivar max_message: Longest request accepted, in bytes: an HTTP body or a
        WebSocket message (the TCP protocol's C{--max-line}).
    @ivar max_inflight: Tasks one WebSocket connection may have in flight
        before the server stops reading it.
    @ivar cors: Origins (C{https://app.example}) allowed to call the API
        from a browser, besides the page's own; C{"*"} allows any.
    """

    def __init__(
        self,
        orchestrator: Orchestrator,
        gate: Optional[Gate] = None,
        max_message: int = DEFAULT_MAX_LINE,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        cors: Iterable[str] = (),
        clock: Optional[IReactorTime] = None,
    ) -> None:
        self.orchestrator = orchestrator
        self.clock: IReactorTime = clock if clock is not None else orchestrator.clock
        self.gate = gate if gate is not None else Gate(
            self.clock, auth_required=orchestrator.authenticator.required)
        self.max_message = max_message
        self.max_inflight = max_inflight
        self.cors: Set[str] = {origin.rstrip("/") for origin in cors}
        self.panel = Panel(orchestrator, self.clock)

    def cors_allows(self, origin: Optional[str]) -> bool:
        """
        @return: Whether a page from C{origin} may call the API (the CORS
            headers are sent for it).
        """
        if origin is None or not self.cors:
            return False
        return "*" in self.cors or origin.rstrip("/") in self.cors

    def origin_allowed(self, origin: Optional[str], host: Optional[str]) -> bool:
        """
        @return: Whether a WebSocket may be opened from a page of
            C{origin}: no C{Origin} (not a browser), the server's own
            (C{host}), or one allowed by C{--web-cors}.
        """
        if origin is None:
            return True
        if host is not None and urlsplit(origin).netloc.lower() == host.strip().lower():
            return True
        return self.cors_allows(origin)


def missing_token() -> MissingToken:
    return MissingToken("Este servidor exige autenticación: envíe la cabecera "
                        "'Authorization: Bearer <token>'.")
