"""
Tests for the web gateway's HTTP side (L{pfo3.web}): the API, its status
codes, authentication, CORS, the dashboard's files, the OpenAPI description
and the C{--web} options.  Everything runs in memory: the real
C{twisted.web} site over a L{StringTransport}, the orchestrator of
L{pfo3.testing.make_server} on a fake clock.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Dict, Optional

import jwt
import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred
from twisted.python import usage

from pfo3.auth import JWTAuthenticator
from pfo3.errors import ERROR_CODES
from pfo3.store import MemoryStore
from pfo3.tap import Options, makeService
from pfo3.tasks import ASYNC, TaskRegistry, TaskType, default_registry
from pfo3.testing import FakeReactor, make_server
from pfo3.web import HTTP_STATUS, WebSite
from pfo3.web.http import RESOURCES
from pfo3.web.panel import percentile
from pfo3.web.site import STATIC
from pfo3.web.testing import Response, http, web_site

ROOT = Path(__file__).resolve().parent.parent
SECRET = b"s" * 32


def token(**claims: Any) -> str:
    body: Dict[str, Any] = {"sub": "alice", "exp": int(time.time()) + 3600}
    body.update(claims)
    return jwt.encode(body, SECRET, algorithm="HS256")


def site_of(**server: Any) -> WebSite:
    gateway = server.pop("gateway", {})
    if "store" not in server:
        server["store"] = MemoryStore(FakeReactor())
    factory = make_server(**server)
    return web_site(factory, **gateway)


def post(site: WebSite, body: Any, headers: Optional[Dict[str, str]] = None) -> Response:
    _, response = http(site, "POST", "/tareas", body, headers)
    assert response is not None
    return response


def get(site: WebSite, path: str, headers: Optional[Dict[str, str]] = None) -> Response:
    _, response = http(site, "GET", path, headers=headers)
    assert response is not None
    return response


# -- the status table -----------------------------------------------------------------


def test_every_error_code_has_a_status() -> None:
    """
    Every error code of the protocol maps to an HTTP status in the one
    table, and the codes the API documents get the statuses it promises.
    """
    assert set(ERROR_CODES) <= set(HTTP_STATUS)
    expected = {
        "json_invalido": 400, "contenido_invalido": 400, "token_faltante": 401,
        "token_invalido": 401, "token_expirado": 401, "prohibido": 403,
        "tarea_desconocida": 404, "tarea_id_en_uso": 409, "linea_demasiado_larga": 413,
        "tasa_excedida": 429, "ocupado": 429, "apagando": 503, "broker_no_disponible": 503,
        "timeout": 504, "error_interno": 500,
    }
    assert {code: HTTP_STATUS[code] for code in expected} == expected


def test_docs_show_the_status_table() -> None:
    """
    docs/web.md lists every error code with the status the table gives it.
    """
    text = (ROOT / "docs" / "web.md").read_text(encoding="utf-8")
    for code, status in HTTP_STATUS.items():
        assert re.search(rf"\| `{code}` \| {status} \|", text), code


# -- POST /tareas ------------------------------------------------------------------------


def test_post_answers_the_tcp_reply() -> None:
    """
    POST /tareas with the seed's request answers 200 with the very reply
    the TCP protocol gives it.
    """
    response = post(site_of(), {"tarea_id": "x", "tipo": "1", "contenido": "hola"})
    assert response.status == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.body == (
        b'{"estado": "ok", "resultado": "HOLA", "tarea_id": "x", "worker": 0}\n')


def test_post_waits_for_the_task() -> None:
    """
    A task that takes time is answered when it ends, not before.
    """
    factory = make_server()
    site = web_site(factory)
    connection, response = http(site, "POST", "/tareas", {"tipo": "sleep", "contenido": 2})
    assert response is None
    factory.orchestrator.clock.advance(2)
    reply = Response(connection.transport.value()).json()
    assert reply["resultado"] == "Esperé 2 segundos"


def test_background_task_is_202_then_its_state() -> None:
    """
    "esperar": false answers 202 aceptada at once; GET /tareas/{id} shows
    the task running, then its recorded end.
    """
    clock = FakeReactor()
    factory = make_server(reactor=clock, store=MemoryStore(clock))
    site = web_site(factory)
    response = post(site, {"tarea_id": "b1", "tipo": "sleep", "contenido": 1, "esperar": False})
    assert (response.status, response.json()) == (
        202, {"estado": "aceptada", "tarea_id": "b1"})
    running = get(site, "/tareas/b1")
    assert running.status == 200
    assert running.json()["resultado"]["estado"] == "en_curso"
    clock.advance(1)
    done = get(site, "/tareas/b1").json()
    assert done["tarea_id"] == "b1"
    assert (done["resultado"]["estado"], done["resultado"]["resultado"]) == (
        "ok", "Esperé 1 segundo")


@pytest.mark.parametrize("body, status, codigo", [
    (b"{bad", 400, "json_invalido"),
    (b"[1]", 400, "no_es_objeto"),
    (b"\xff", 400, "utf8_invalido"),
    ({"tipo": "nope", "contenido": "x"}, 400, "tipo_desconocido"),
    ({"tipo": "uppercase", "contenido": 5}, 400, "contenido_invalido"),
    ({"tipo": "sleep", "contenido": 99}, 400, "excede_timeout"),
])
def test_invalid_requests(body: Any, status: int, codigo: str) -> None:
    """
    An invalid body is answered with the protocol's error object and the
    status of its code.
    """
    response = post(site_of(), body)
    assert response.status == status
    assert response.json()["codigo"] == codigo
    assert response.json()["estado"] == "error"


def test_body_too_long_is_413() -> None:
    """
    A body longer than the limit (--max-line) is 413 linea_demasiado_larga;
    the site keeps no more of it than the limit.
    """
    site = site_of(gateway={"max_message": 100})
    body = json.dumps({"tipo": "uppercase", "contenido": "x" * 500}).encode()
    response = post(site, body)
    assert (response.status, response.json()["codigo"]) == (413, "linea_demasiado_larga")
    assert post(site, {"tipo": "uppercase", "contenido": "ok"}).status == 200


def test_timeout_is_504() -> None:
    """
    A task cancelled at --timeout is answered 504 timeout.
    """
    registry: TaskRegistry = default_registry(entry_points=False)
    registry.register(TaskType("never", 99, (), "Never ends.",
                               lambda clock, arg: Deferred(), mode=ASYNC))
    factory = make_server(registry=registry, timeout=5)
    connection, response = http(web_site(factory), "POST", "/tareas",
                                 {"tipo": "never", "contenido": 1})
    assert response is None
    factory.orchestrator.clock.advance(5)
    response = Response(connection.transport.value())
    assert (response.status, response.json()["codigo"]) == (504, "timeout")


def test_busy_is_429_and_shutting_down_is_503() -> None:
    """
    Past --max-tasks the API answers 429 ocupado; once the server drains,
    503 apagando; both say when to retry (Retry-After).
    """
    factory = make_server(max_tasks=1)
    site = web_site(factory)
    http(site, "POST", "/tareas", {"tipo": "sleep", "contenido": 1})
    busy = post(site, {"tipo": "sleep", "contenido": 1})
    assert (busy.status, busy.json()["codigo"]) == (429, "ocupado")
    factory.orchestrator.drain()
    down = post(site, {"tipo": "uppercase", "contenido": "x"})
    assert (down.status, down.json()["codigo"]) == (503, "apagando")
    assert busy.headers["retry-after"] == down.headers["retry-after"] == "1"


def test_client_gone_cancels_its_task() -> None:
    """
    A plain task whose HTTP client disconnects is given up on, as on TCP:
    nothing stays in flight.
    """
    factory = make_server()
    connection, _ = http(web_site(factory), "POST", "/tareas", {"tipo": "sleep", "contenido": 5})
    assert factory.orchestrator.active == 1
    connection.close()
    assert factory.orchestrator.active == 0


# -- GET ---------------------------------------------------------------------------------


def test_unknown_task_is_404() -> None:
    """
    GET /tareas/{id} of a task never submitted is 404 tarea_desconocida.
    """
    response = get(site_of(), "/tareas/nunca")
    assert (response.status, response.json()["codigo"]) == (404, "tarea_desconocida")


def test_task_ids_are_url_decoded() -> None:
    """
    GET /tareas/{id} takes the id percent-encoded.
    """
    site = site_of()
    post(site, {"tarea_id": "a b/ñ", "tipo": "reverse", "contenido": "hola"})
    response = get(site, "/tareas/a%20b%2F%C3%B1")
    assert response.json()["resultado"]["resultado"] == "aloh"


def test_tipos() -> None:
    """
    GET /tipos answers what {"op": "tipos"} does.
    """
    response = get(site_of(), "/tipos")
    assert response.status == 200
    names = [t["tipo"] for t in response.json()["resultado"]]
    assert names[:4] == ["uppercase", "reverse", "word_count", "sleep"]


def test_wrong_method_is_405() -> None:
    """
    A route asked with a method it does not serve is 405.
    """
    assert get(site_of(), "/tareas").status == 405
    _, response = http(site_of(), "POST", "/tipos", b"{}")
    assert response is not None and response.status == 405


# -- authentication ------------------------------------------------------------------------


def auth_site(**server: Any) -> WebSite:
    return site_of(authenticator=JWTAuthenticator.from_secret(SECRET), **server)


@pytest.mark.parametrize("headers, codigo", [
    ({}, "token_faltante"),
    ({"Authorization": "Bearer not.a.jwt"}, "token_invalido"),
    ({"Authorization": "Basic YWxpY2U6eA=="}, "token_invalido"),
    ({"Authorization": "Bearer " + jwt.encode(
        {"sub": "alice", "exp": int(time.time()) + 60}, b"f" * 32, algorithm="HS256")},
     "token_invalido"),
    ({"Authorization": "Bearer " + jwt.encode(
        {"sub": "alice", "exp": int(time.time()) - 3600}, SECRET, algorithm="HS256")},
     "token_expirado"),
])
def test_missing_or_bad_token_is_401(headers: Dict[str, str], codigo: str) -> None:
    """
    On a server that requires tokens, a request without one, with a forged,
    malformed or expired one is 401 with its code and a WWW-Authenticate
    challenge; nothing runs.
    """
    site = auth_site()
    response = post(site, {"tipo": "uppercase", "contenido": "x"}, headers)
    assert (response.status, response.json()["codigo"]) == (401, codigo)
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert site.gateway.orchestrator.completed == 0


def test_bearer_token_authenticates() -> None:
    """
    Authorization: Bearer <JWT> authenticates the request: its task runs
    and is recorded as the identity's (another identity cannot see it).
    """
    site = auth_site()
    alice = {"Authorization": "Bearer " + token()}
    assert post(site, {"tarea_id": "t", "tipo": "uppercase", "contenido": "x"}, alice).status == 200
    assert get(site, "/tareas/t", alice).status == 200
    bob = {"Authorization": "Bearer " + token(sub="bob")}
    assert get(site, "/tareas/t", bob).status == 404


def test_token_in_the_body_works_too() -> None:
    """
    The TCP protocol's per-request 'token' field authenticates an HTTP
    request as well.
    """
    response = post(auth_site(), {"tipo": "uppercase", "contenido": "x", "token": token()})
    assert response.status == 200


def test_forbidden_type_is_403() -> None:
    """
    A token restricted to some task types gets 403 prohibido for others.
    """
    headers = {"Authorization": "Bearer " + token(tipos=["reverse"])}
    response = post(auth_site(), {"tipo": "uppercase", "contenido": "x"}, headers)
    assert (response.status, response.json()["codigo"]) == (403, "prohibido")


def test_rate_limit_is_429() -> None:
    """
    Past the identity's rate, tasks are 429 tasa_excedida.
    """
    headers = {"Authorization": "Bearer " + token(tasa=1)}
    site = auth_site()
    statuses = [post(site, {"tipo": "uppercase", "contenido": "x"}, headers).status
                for _ in range(3)]
    assert statuses[-1] == 429


# -- CORS ----------------------------------------------------------------------------------


def test_cors_is_off_by_default() -> None:
    """
    Without --web-cors, no response carries Access-Control-Allow-Origin:
    browsers keep other origins' pages out.
    """
    response = post(site_of(), {"tipo": "uppercase", "contenido": "x"},
                    {"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in response.headers
    _, preflight = http(site_of(), "OPTIONS", "/tareas",
                        headers={"Origin": "https://evil.example"})
    assert preflight is not None and "access-control-allow-origin" not in preflight.headers


def test_cors_allows_the_configured_origins() -> None:
    """
    With --web-cors ORIGIN, that origin (only) gets the CORS headers, on the
    preflight and on the request.
    """
    site = site_of(gateway={"cors": ["https://app.example"]})
    _, preflight = http(site, "OPTIONS", "/tareas", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
    assert preflight is not None and preflight.status == 204
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    assert "Authorization" in preflight.headers["access-control-allow-headers"]
    response = post(site, {"tipo": "uppercase", "contenido": "x"},
                    {"Origin": "https://app.example"})
    assert response.headers["access-control-allow-origin"] == "https://app.example"
    other = post(site, {"tipo": "uppercase", "contenido": "x"}, {"Origin": "https://b.example"})
    assert "access-control-allow-origin" not in other.headers


# -- the dashboard and the panel ---------------------------------------------------------------


def test_dashboard_is_served_self_contained() -> None:
    """
    / serves the dashboard with a Content-Security-Policy that allows only
    its own origin; its files load nothing from elsewhere.
    """
    site = site_of()
    page = get(site, "/")
    assert page.status == 200 and b"<form" in page.body
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in STATIC:
        path = "/" if name == "index.html" else f"/static/{name}"
        body = get(site, path).body
        assert re.search(rb"(src|href)=[\"']?(https?:)?//", body) is None, name
        assert b"http://" not in body and b"https://" not in body, name


def test_panel_counts_what_the_gateway_answered() -> None:
    """
    GET /panel reports tasks in flight and completed, latency percentiles,
    the workers that ran the web's tasks and the recent errors.
    """
    clock = FakeReactor()
    factory = make_server(reactor=clock)
    site = web_site(factory)
    http(site, "POST", "/tareas", {"tipo": "sleep", "contenido": 1})
    post(site, {"tipo": "uppercase", "contenido": "x"})
    post(site, b"{bad")
    snapshot = get(site, "/panel").json()["resultado"]
    assert (snapshot["en_curso"], snapshot["completadas"]) == (1, 1)
    assert snapshot["errores"][0]["codigo"] == "json_invalido"
    assert snapshot["trabajadores"] == {"0": 1}
    clock.advance(1)
    snapshot = get(site, "/panel").json()["resultado"]
    assert snapshot["latencia_ms"]["max"] == 1000.0
    assert snapshot["tareas_por_segundo"] > 0
    assert snapshot["web"]["http"] == 3  # the sleep, the uppercase, the error


def test_panel_needs_a_token_where_tasks_do() -> None:
    """
    On a server that requires tokens, GET /panel is 401 without a token or
    with a forged one, and answers the figures to a bearer of a valid one.
    """
    site = auth_site()
    missing = get(site, "/panel")
    assert (missing.status, missing.json()["codigo"]) == (401, "token_faltante")
    assert missing.headers["www-authenticate"].startswith("Bearer")
    forged = get(site, "/panel", {"Authorization": "Bearer not.a.jwt"})
    assert (forged.status, forged.json()["codigo"]) == (401, "token_invalido")
    ok = get(site, "/panel", {"Authorization": "Bearer " + token()})
    assert ok.status == 200
    assert "tareas_por_segundo" in ok.json()["resultado"]


def test_percentile_is_nearest_rank() -> None:
    """
    Percentiles are nearest-rank: p50 of 1..10 is 5, p99 is 10.
    """
    values = [float(i) for i in range(1, 11)]
    assert (percentile(values, 0.5), percentile(values, 0.99), percentile(values, 1.0)) == (
        5.0, 10.0, 10.0)


# -- OpenAPI ---------------------------------------------------------------------------------


def test_openapi_lists_every_route() -> None:
    """
    docs/openapi.json parses as OpenAPI 3 and describes exactly the routes
    and methods the API's resources serve; each is reachable through the
    site (no 404 or 405 for a listed route and method).
    """
    spec = json.loads((ROOT / "docs" / "openapi.json").read_text(encoding="utf-8"))
    assert spec["openapi"].startswith("3.")
    served = {resource.route: resource.methods() for resource in RESOURCES}
    assert {path: set(methods) for path, methods in spec["paths"].items()} == served
    site = site_of()
    for path, methods in spec["paths"].items():
        for method in methods:
            _, response = http(site, method.upper(), path.replace("{tarea_id}", "x"),
                               b"{}" if method == "post" else b"")
            assert response is not None
            assert response.status != 405
            assert response.status != 404 or response.json()["codigo"] == "tarea_desconocida"
            for status in spec["paths"][path][method]["responses"]:
                assert 200 <= int(status) < 600


#: Codes a TCP connection can get and an HTTP request cannot: one session
#: per request, connections not gated, no output buffer to fill.
TCP_ONLY = {"tarea_id_duplicado", "demasiadas_conexiones", "buffer_lleno"}

#: The error codes each route can answer.
ROUTE_CODES = {
    # The body is any request of the protocol: a task, op estado, subir...
    ("/tareas", "post"): set(HTTP_STATUS) - TCP_ONLY,
    ("/tareas/{tarea_id}", "get"): {
        "utf8_invalido", "tarea_id_invalido", "token_faltante", "token_invalido",
        "token_expirado", "tarea_desconocida", "almacen_no_disponible", "error_interno"},
    ("/tipos", "get"): {"token_faltante", "token_invalido", "token_expirado", "error_interno"},
    ("/panel", "get"): {"token_faltante", "token_invalido", "token_expirado"},
}


def test_openapi_gives_each_error_its_status() -> None:
    """
    For every error code a route can answer, docs/openapi.json lists the
    status of pfo3.web.status for that route, and (for the codes known
    when it was written) names the code there; every route lists 408, the
    answer to a request too slow to arrive.
    """
    spec = json.loads((ROOT / "docs" / "openapi.json").read_text(encoding="utf-8"))
    assert set(ROUTE_CODES) == {(path, method) for path, methods in spec["paths"].items()
                                for method in methods}
    for (path, method), codes in ROUTE_CODES.items():
        responses = spec["paths"][path][method]["responses"]
        assert "408" in responses, (path, method)
        for codigo in codes:
            status = str(HTTP_STATUS[codigo])
            assert status in responses, (path, method, codigo, status)
    post = spec["paths"]["/tareas"]["post"]["responses"]
    for codigo in ("ref_desconocida", "blobs_desactivado", "urls_no_soportadas",
                   "almacen_objetos_denegado", "almacen_objetos_sin_cubo"):
        assert codigo in post[str(HTTP_STATUS[codigo])]["description"], codigo


# -- twistd pfo3 --web ------------------------------------------------------------------------


def test_web_options() -> None:
    """
    --web and --web-cors are repeatable and off by default; a bad endpoint
    or origin is a usage error.
    """
    options = Options()
    options.parseOptions([])
    assert (options["web"], options["web-cors"]) == ([], [])
    options = Options()
    options.parseOptions(["--web", "tcp:8080", "--web", "tcp:8081",
                          "--web-cors", "https://a.example", "--web-cors", "*"])
    assert options["web"] == ["tcp:8080", "tcp:8081"]
    assert options["web-cors"] == ["https://a.example", "*"]
    for argv in (["--web", "nope:1"], ["--web-cors", "a.example"]):
        with pytest.raises(usage.UsageError):
            Options().parseOptions(argv)


def test_web_service_shares_the_orchestrator() -> None:
    """
    makeService with --web adds a listening web site that serves the TCP
    ports' orchestrator and gate.
    """
    options = Options()
    options.parseOptions(["--port", "tcp:0", "--web", "tcp:0"])
    service = makeService(options, reactor=FakeReactor())
    sites = [s for parent in service for s in getattr(parent, "services", [])
             if isinstance(s, StreamServerEndpointService)]
    assert len(sites) == 1
    site = sites[0].factory
    assert isinstance(site, WebSite)
    assert site.gateway.orchestrator is service.orchestrator
    assert site.gateway.gate is service.factory.gate
