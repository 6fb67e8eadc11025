"""
Tests for the WebSocket endpoint (L{pfo3.web.ws}): the TCP protocol's JSON
as text messages, pipelined, with the same authentication and limits, and a
clear answer to bad input.  In memory: the real site and autobahn over a
L{StringTransport}, the orchestrator of L{pfo3.testing.make_server} on a
fake clock.
"""

from __future__ import annotations

import json
import time
from typing import Any, Dict, List

import jwt
from twisted.trial.unittest import SynchronousTestCase

from pfo3.auth import JWTAuthenticator
from pfo3.gate import Gate
from pfo3.testing import FakeReactor, make_server
from pfo3.web import WebSite
from pfo3.web.testing import WebSocket, frame, web_site

SECRET = b"s" * 32


def token(**claims: Any) -> str:
    body: Dict[str, Any] = {"sub": "alice", "exp": int(time.time()) + 3600}
    body.update(claims)
    return jwt.encode(body, SECRET, algorithm="HS256")


class WebSocketTests(SynchronousTestCase):
    """
    Requests and replies over C{/ws}.
    """

    def setUp(self) -> None:
        self.clock = FakeReactor()
        self.factory = make_server(reactor=self.clock)
        self.site: WebSite = web_site(self.factory, max_inflight=3, max_message=1000)

    def test_handshake_without_compression(self) -> None:
        """
        The upgrade succeeds (101) and refuses permessage-deflate even when
        the client offers it.
        """
        ws = WebSocket(self.site, headers={
            "Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"})
        self.assertEqual(ws.handshake.status, 101)
        self.assertNotIn("sec-websocket-extensions", ws.handshake.headers)

    def test_seed_request(self) -> None:
        """
        The seed's request as a text message gets the seed's reply as one.
        """
        ws = WebSocket(self.site)
        ws.send_json({"tarea_id": "x", "tipo": "1", "contenido": "hola"})
        [(opcode, payload)] = ws.frames()
        self.assertEqual(opcode, 1)
        self.assertEqual(
            payload, b'{"estado": "ok", "resultado": "HOLA", "tarea_id": "x", "worker": 0}')

    def test_pipelined_replies_in_completion_order(self) -> None:
        """
        Many requests without waiting: each reply is sent when its task
        ends, so a quick task's reply overtakes a slow one's.
        """
        ws = WebSocket(self.site)
        ws.send_json({"tarea_id": "slow", "tipo": "sleep", "contenido": 2})
        ws.send_json({"tarea_id": "fast", "tipo": "reverse", "contenido": "abc"})
        self.assertEqual([r["tarea_id"] for r in ws.replies()], ["fast"])
        self.clock.advance(2)
        self.assertEqual([r["tarea_id"] for r in ws.replies()], ["slow"])

    def test_invalid_json_is_an_error_and_the_connection_goes_on(self) -> None:
        """
        Invalid JSON, a non-object and an invalid request are answered with
        the protocol's error messages; the connection stays usable.
        """
        ws = WebSocket(self.site)
        ws.send_text("{bad")
        ws.send_text("[1, 2]")
        ws.send_json({"tipo": "nope", "tarea_id": "n"})
        ws.send_text("   ")
        ws.send_json({"tipo": "upper", "contenido": "ok", "tarea_id": "ok"})
        codes = [r.get("codigo", r["estado"]) for r in ws.replies()]
        self.assertEqual(codes, ["json_invalido", "no_es_objeto", "tipo_desconocido", "ok"])

    def test_binary_message_closes_with_1003(self) -> None:
        """
        A binary message closes the connection with 1003 (unsupported data)
        and gives up on its tasks.
        """
        ws = WebSocket(self.site)
        ws.send_json({"tarea_id": "s", "tipo": "sleep", "contenido": 5})
        ws.send(frame(b"\x00\x01", opcode=2))
        self.assertEqual(ws.close_code(), 1003)
        ws.close()
        self.assertEqual(self.factory.orchestrator.active, 0)

    def test_oversize_message_closes_with_1009(self) -> None:
        """
        A message longer than the limit closes the connection with 1009
        (message too big); a message split into frames counts whole.
        """
        ws = WebSocket(self.site)
        ws.send(frame(b"x" * 1001))
        self.assertEqual(ws.close_code(), 1009)
        ws = WebSocket(self.site)
        ws.send(frame(b"x" * 600, fin=False) + frame(b"y" * 600, opcode=0))
        self.assertEqual(ws.close_code(), 1009)

    def test_reply_longer_than_the_limit(self) -> None:
        """
        The message limit is for requests: a reply longer than it (a long
        result, an error quoting its input) is sent whole.
        """
        ws = WebSocket(self.site)
        ws.send_json({"tarea_id": "a", "tipo": "1", "contenido": "x" * 945})  # 992 bytes
        [reply] = ws.replies()
        self.assertEqual(reply["resultado"], "X" * 945)  # 1008 bytes

    def test_invalid_utf8_closes_with_1007(self) -> None:
        """
        A text message that is not UTF-8 closes the connection with 1007.
        """
        ws = WebSocket(self.site)
        ws.send(frame(b"\xff\xfe"))
        self.assertEqual(ws.close_code(), 1007)

    def test_other_connections_are_not_disturbed(self) -> None:
        """
        One client's bad input closes only its own connection: another's
        task in flight is answered.
        """
        good = WebSocket(self.site)
        good.send_json({"tarea_id": "g", "tipo": "sleep", "contenido": 1})
        bad = WebSocket(self.site)
        bad.send(frame(b"\x00", opcode=2))
        bad.send(frame(b"x" * 5000))
        self.clock.advance(1)
        self.assertEqual([r["tarea_id"] for r in good.replies()], ["g"])

    def test_closing_gives_up_on_plain_tasks(self) -> None:
        """
        When the client goes, its plain tasks are cancelled, as on TCP.
        """
        ws = WebSocket(self.site)
        ws.send_json({"tarea_id": "s", "tipo": "sleep", "contenido": 5})
        self.assertEqual(self.factory.orchestrator.active, 1)
        ws.close()
        self.assertEqual(self.factory.orchestrator.active, 0)
        self.assertEqual(self.site.gateway.panel.websockets, 0)

    def test_backpressure_past_max_inflight(self) -> None:
        """
        Past max_inflight tasks in flight the server stops reading the
        connection and holds what it already read; it answers them as
        earlier tasks end.
        """
        ws = WebSocket(self.site)
        for i in range(5):
            ws.send_json({"tarea_id": f"t{i}", "tipo": "sleep", "contenido": 1})
        self.assertEqual(self.factory.orchestrator.active, 3)
        self.assertEqual(ws.transport.producerState, "paused")
        self.clock.advance(1)
        self.assertEqual(len(ws.replies()), 3)
        self.assertEqual(self.factory.orchestrator.active, 2)
        self.clock.advance(1)
        self.assertEqual(len(ws.replies()), 2)
        self.assertEqual(ws.transport.producerState, "producing")

    def test_slow_client(self) -> None:
        """
        While the client does not read its replies (the transport's write
        buffer is full), the server handles no more of its requests and
        stops reading it; once it reads, the held requests are answered.
        """
        ws = WebSocket(self.site)
        producer = ws.transport.producer
        assert producer is not None
        producer.pauseProducing()
        ws.send_json({"tarea_id": "a", "tipo": "upper", "contenido": "x"})
        self.assertEqual(ws.replies(), [])
        self.assertEqual(ws.transport.producerState, "paused")
        producer.resumeProducing()
        self.assertEqual([r["tarea_id"] for r in ws.replies()], ["a"])

    def test_foreign_origin_is_refused(self) -> None:
        """
        A browser page of another origin cannot open the WebSocket (403);
        the server's own origin, a client without Origin, and an origin
        --web-cors allows can.
        """
        refused = WebSocket(self.site, headers={"Origin": "https://evil.example"})
        self.assertEqual(refused.handshake.status, 403)
        own = WebSocket(self.site, headers={"Origin": "http://pfo3.test"})
        self.assertEqual(own.handshake.status, 101)
        allowed = web_site(self.factory, cors=["https://app.example"])
        self.assertEqual(
            WebSocket(allowed, headers={"Origin": "https://app.example"}).handshake.status, 101)

    def test_stopping_answers_then_closes_with_1001(self) -> None:
        """
        When the web service stops, a WebSocket reads no more, gets the
        replies of its tasks in flight, then is closed with 1001 (going
        away); an idle one is closed at once.
        """
        from pfo3.web import WebService

        busy = WebSocket(self.site)
        busy.send_json({"tarea_id": "s", "tipo": "sleep", "contenido": 1})
        idle = WebSocket(self.site)
        service = WebService(self.site)
        service.startService()
        service.stopService()
        self.assertEqual(idle.close_code(), 1001)
        self.assertEqual(busy.frames(), [])
        self.assertEqual(busy.transport.producerState, "paused")
        self.clock.advance(1)
        frames = busy.frames()
        self.assertEqual(json.loads(frames[0][1])["tarea_id"], "s")
        self.assertEqual(int.from_bytes(frames[1][1][:2], "big"), 1001)

    def test_panel_feed(self) -> None:
        """
        /panel/ws sends the dashboard's figures at once and every second.
        """
        ws = WebSocket(self.site, "/panel/ws")
        self.assertEqual(ws.handshake.status, 101)
        first = ws.replies()
        self.assertEqual(len(first), 1)
        self.assertIn("tareas_por_segundo", first[0])
        self.clock.advance(1)
        self.assertEqual(len(ws.replies()), 1)
        ws.close()
        self.clock.advance(5)
        self.assertEqual(ws.replies(), [])

    def test_panel_figures_computed_once_for_all_feeds(self) -> None:
        """
        However many feeds are open, the figures are computed once a second
        and every feed gets the same message; the timer stops with the last
        feed.
        """
        panel = self.site.gateway.panel
        computed = []
        snapshot = panel.snapshot

        def counted() -> Dict[str, Any]:
            computed.append(self.clock.seconds())
            return snapshot()

        panel.snapshot = counted  # type: ignore[method-assign]
        feeds = [WebSocket(self.site, "/panel/ws", host=f"10.0.0.{i}") for i in range(5)]
        self.assertEqual(len(computed), 1)
        for feed in feeds:
            self.assertEqual(len(feed.replies()), 1)
        self.clock.advance(1)
        self.clock.advance(1)
        self.assertEqual(len(computed), 3)
        payloads = {json.dumps(feed.replies()) for feed in feeds}
        self.assertEqual(len(payloads), 1)
        for feed in feeds:
            feed.close()
        self.clock.advance(5)
        self.assertEqual(len(computed), 3)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_panel_feed_skips_a_client_that_does_not_read(self) -> None:
        """
        A feed whose client does not read (its write buffer is full) is sent
        no more figures, so it holds no growing buffer; it gets them again
        once it reads.
        """
        ws = WebSocket(self.site, "/panel/ws")
        self.assertEqual(len(ws.replies()), 1)
        producer = ws.transport.producer
        assert producer is not None
        producer.pauseProducing()
        self.clock.advance(1)
        self.clock.advance(1)
        self.assertEqual(ws.replies(), [])
        producer.resumeProducing()
        self.clock.advance(1)
        self.assertEqual(len(ws.replies()), 1)

    def test_panel_feed_refuses_tasks(self) -> None:
        """
        A task sent on /panel/ws is answered op_desconocida and does not
        run; {"op": "ping"} is answered; the figures go on.
        """
        ws = WebSocket(self.site, "/panel/ws")
        ws.replies()
        ws.send_json({"tarea_id": "a", "tipo": "upper", "contenido": "x"})
        ws.send_json({"op": "ping"})
        ws.send_text("{")
        replies = ws.replies()
        self.assertEqual([r.get("codigo") for r in replies],
                         ["op_desconocida", None, "json_invalido"])
        self.assertEqual(replies[0]["tarea_id"], "a")
        self.assertEqual(replies[1]["resultado"], "pong")
        self.assertEqual(self.factory.orchestrator.completed, 0)
        self.clock.advance(1)
        self.assertIn("tareas_por_segundo", ws.replies()[0])

    def test_panel_feed_closes_on_stop(self) -> None:
        """
        When the web service stops, a dashboard's feed is closed with 1001
        and its timer stops.
        """
        from pfo3.web import WebService

        ws = WebSocket(self.site, "/panel/ws")
        ws.replies()
        service = WebService(self.site)
        service.startService()
        service.stopService()
        self.assertEqual(ws.close_code(), 1001)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class WebSocketAuthTests(SynchronousTestCase):
    """
    Tokens and the connection gate over C{/ws}.
    """

    def setUp(self) -> None:
        self.clock = FakeReactor()
        auth = JWTAuthenticator.from_secret(SECRET)
        gate = Gate(self.clock, max_connections=2, auth_required=True, auth_timeout=10)
        self.factory = make_server(reactor=self.clock, authenticator=auth, gate=gate)
        self.site = web_site(self.factory)

    def test_missing_token(self) -> None:
        """
        Without a token, a task is answered token_faltante and does not run.
        """
        ws = WebSocket(self.site)
        ws.send_json({"tarea_id": "a", "tipo": "upper", "contenido": "x"})
        self.assertEqual([r["codigo"] for r in ws.replies()], ["token_faltante"])
        self.assertEqual(self.factory.orchestrator.completed, 0)

    def test_op_auth(self) -> None:
        """
        {"op": "auth"} makes the token's identity the connection's; a
        forged token is token_invalido.
        """
        ws = WebSocket(self.site)
        forged = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, b"f" * 32,
                            algorithm="HS256")
        ws.send_json({"op": "auth", "token": forged})
        ws.send_json({"op": "auth", "token": token()})
        ws.send_json({"tarea_id": "a", "tipo": "upper", "contenido": "x"})
        replies = ws.replies()
        self.assertEqual(replies[0]["codigo"], "token_invalido")
        self.assertEqual(replies[1]["resultado"]["identidad"], "alice")
        self.assertEqual(replies[2]["resultado"], "X")

    def test_bearer_header(self) -> None:
        """
        Authorization: Bearer on the upgrade request authenticates the
        connection; a forged one refuses the upgrade with 401.
        """
        ws = WebSocket(self.site, headers={"Authorization": "Bearer " + token()})
        self.assertEqual(ws.handshake.status, 101)
        ws.send_json({"tarea_id": "a", "tipo": "upper", "contenido": "x"})
        self.assertEqual(ws.replies()[0]["resultado"], "X")
        refused = WebSocket(self.site, headers={"Authorization": "Bearer forged"})
        self.assertEqual(refused.handshake.status, 401)

    def test_auth_timeout(self) -> None:
        """
        A connection that does not authenticate within --auth-timeout gets
        token_faltante and close code 1008; one that did stays.
        """
        idle = WebSocket(self.site)
        ok = WebSocket(self.site, headers={"Authorization": "Bearer " + token()})
        self.clock.advance(10)
        frames = idle.frames()
        self.assertEqual(json.loads(frames[0][1])["codigo"], "token_faltante")
        self.assertEqual(frames[1][0], 8)
        self.assertEqual(int.from_bytes(frames[1][1][:2], "big"), 1008)
        self.assertEqual(ok.frames(), [])

    def test_max_connections_shared_with_tcp(self) -> None:
        """
        WebSockets count against the gate's --max-connections, with the
        TCP connections; past it a new one is told demasiadas_conexiones and
        closed with 1013.
        """
        from .conftest import connect_transport

        connect_transport(self.factory)
        WebSocket(self.site)
        third = WebSocket(self.site)
        frames = third.frames()
        self.assertEqual(json.loads(frames[0][1])["codigo"], "demasiadas_conexiones")
        self.assertEqual(int.from_bytes(frames[1][1][:2], "big"), 1013)

    def test_panel_feed_needs_a_token(self) -> None:
        """
        On a server that requires tokens, /panel/ws sends no figures before
        the connection authenticates ({"op": "auth"} or the upgrade's
        Authorization header), and one that does not within --auth-timeout
        gets token_faltante and close code 1008.
        """
        idle = WebSocket(self.site, "/panel/ws")
        self.assertEqual(idle.frames(), [])
        authed = WebSocket(self.site, "/panel/ws")
        authed.send_json({"op": "auth", "token": token()})
        [reply, figures] = authed.replies()
        self.assertEqual(reply["resultado"]["identidad"], "alice")
        self.assertIn("tareas_por_segundo", figures)
        for _ in range(10):
            self.clock.advance(1)
        frames = idle.frames()
        self.assertEqual(json.loads(frames[0][1])["codigo"], "token_faltante")
        self.assertEqual(int.from_bytes(frames[1][1][:2], "big"), 1008)
        self.assertEqual(len(authed.replies()), 10)

    def test_panel_feed_closes_after_refused_tokens(self) -> None:
        """
        The gate's limit of refused tokens holds on /panel/ws as elsewhere:
        each refusal is answered, the last one is the connection's last
        message, lines after it are not answered, and nothing is logged as
        an unexpected error.
        """
        from twisted.logger import LogEvent, globalLogPublisher

        errors: List[LogEvent] = []

        def observe(event: LogEvent) -> None:
            if event.get("log_failure") is not None or event.get("isError"):
                errors.append(event)

        globalLogPublisher.addObserver(observe)
        try:
            ws = WebSocket(self.site, "/panel/ws")
            forged = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, b"f" * 32,
                                algorithm="HS256")
            for _ in range(7):
                ws.send_json({"op": "auth", "token": forged})
            self.clock.advance(0)
            frames = ws.frames()
        finally:
            globalLogPublisher.removeObserver(observe)
        texts = [json.loads(payload) for opcode, payload in frames if opcode == 1]
        self.assertEqual([t["codigo"] for t in texts], ["token_invalido"] * 5)
        self.assertIn("se cierra la conexión", texts[-1]["mensaje"])
        self.assertEqual(frames[-1][0], 8)  # then the close frame
        self.assertEqual(errors, [])

    def test_panel_feed_with_a_bearer_header(self) -> None:
        """
        A feed opened with Authorization: Bearer gets its figures at once.
        """
        ws = WebSocket(self.site, "/panel/ws",
                       headers={"Authorization": "Bearer " + token()})
        self.assertIn("tareas_por_segundo", ws.replies()[0])

    def test_panel_feeds_count_against_max_connections(self) -> None:
        """
        Dashboard feeds count against --max-connections like any
        connection: with two open, a third connection (a feed or a /ws) is
        told demasiadas_conexiones and closed with 1013; once one closes,
        a new one is let in.
        """
        first = WebSocket(self.site, "/panel/ws")
        WebSocket(self.site, "/panel/ws")
        for path in ("/panel/ws", "/ws"):
            frames = WebSocket(self.site, path).frames()
            self.assertEqual(json.loads(frames[0][1])["codigo"], "demasiadas_conexiones")
            self.assertEqual(int.from_bytes(frames[1][1][:2], "big"), 1013)
        first.close()
        self.assertEqual(WebSocket(self.site, "/ws").frames(), [])

    def test_panel_feeds_count_against_the_per_peer_limit(self) -> None:
        """
        Dashboard feeds count against --max-connections-per-peer.
        """
        gate = Gate(self.clock, max_per_peer=1)
        site = web_site(make_server(reactor=self.clock, gate=gate))
        self.assertEqual(len(WebSocket(site, "/panel/ws").replies()), 1)
        frames = WebSocket(site, "/panel/ws").frames()
        self.assertEqual(json.loads(frames[0][1])["codigo"], "demasiadas_conexiones")
        self.assertEqual(len(WebSocket(site, "/panel/ws", host="10.0.0.2").replies()), 1)
