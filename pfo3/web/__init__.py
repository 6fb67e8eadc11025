"""
Web and mobile clients: a WebSocket endpoint and an HTTP API that speak the
TCP protocol's JSON with the same rules (authentication, limits, store,
error codes), and a live dashboard, served with C{twisted.web} by
C{twistd pfo3 --web ENDPOINT}.  See C{docs/web.md}; L{pfo3.web.testing}
is an in-memory client of it for tests.
"""

from pfo3.web.gateway import Gateway
from pfo3.web.panel import Panel
from pfo3.web.site import WebService, WebSite, make_site
from pfo3.web.status import HTTP_STATUS, http_status

__all__ = ["Gateway", "HTTP_STATUS", "Panel", "WebService", "WebSite", "http_status", "make_site"]
