// pfo3 dashboard: figures from /panel/ws (or /panel, polled, without
// WebSockets); tasks sent over /ws as the TCP protocol's JSON messages.
// On a server that requires tokens, the token field's value authenticates
// all of them; a refusal for want of one shows in #aviso.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const base = location.protocol.replace("http", "ws") + "//" + location.host;
  let tasks = null;
  let waiting = [];
  let counter = 0;

  function show(el, value) { el.textContent = value === null || value === undefined ? "–" : String(value); }

  function render(s) {
    show($("tareas-por-segundo"), s.tareas_por_segundo);
    show($("en-curso"), s.en_curso);
    show($("completadas"), s.completadas);
    show($("p50"), s.latencia_ms.p50);
    show($("p90"), s.latencia_ms.p90);
    show($("p99"), s.latencia_ms.p99);
    const workers = $("trabajadores");
    workers.replaceChildren();
    const entries = Object.entries(s.trabajadores);
    const most = Math.max(1, ...entries.map((e) => e[1]));
    for (const [worker, n] of entries) {
      const li = document.createElement("li");
      const name = document.createElement("span");
      name.textContent = "worker " + worker;
      const bar = document.createElement("span");
      bar.className = "barra";
      bar.style.width = (100 * n / most) + "%";
      const count = document.createElement("span");
      count.textContent = n;
      li.append(name, bar, count);
      workers.append(li);
    }
    const errors = $("errores");
    errors.replaceChildren();
    for (const e of s.errores) {
      const li = document.createElement("li");
      const code = document.createElement("code");
      code.textContent = e.codigo;
      li.append(code, " · " + e.canal + " · " + new Date(e.hora * 1000).toLocaleTimeString());
      errors.append(li);
    }
    if (!s.errores.length) {
      const li = document.createElement("li");
      li.textContent = "ninguno";
      errors.append(li);
    }
    $("web").textContent = "Web: " + s.web.http + " peticiones HTTP, " + s.web.ws +
      " mensajes WebSocket, " + s.web.websockets_abiertos + " WebSockets abiertos." +
      (s.apagando ? " El servidor se está apagando." : "");
  }

  function live(state, text) { const el = $("conexion"); el.dataset.estado = state; el.textContent = text; }

  // The token field's value: sent as a bearer token on every HTTP call, as
  // {"op": "auth"} on the live feed and as each task's "token".
  function token() { return $("token").value.trim(); }
  function headers() { const t = token(); return t ? { Authorization: "Bearer " + t } : {}; }

  // A refusal of the server for want of a (valid) token.
  function isAuthError(reply) { return reply && reply.estado === "error" && /^token_/.test(reply.codigo || ""); }

  function warn(reply) {
    const el = $("aviso");
    if (!reply) { el.hidden = true; el.textContent = ""; return; }
    el.hidden = false;
    el.textContent = (reply.codigo === "token_faltante"
      ? "Este servidor exige un token: escríbalo en el campo Token."
      : "El servidor rechazó el token: " + reply.mensaje) + " (" + reply.codigo + ")";
  }

  function answered(r) {
    return r.json().then((body) => {
      if (r.status === 401 || isAuthError(body)) { warn(body); throw new Error(body.codigo); }
      return body;
    });
  }

  function poll() {
    fetch("panel", { headers: headers() }).then(answered).then((r) => render(r.resultado)).catch(() => {});
  }

  let panel = null;
  let retry = null;

  function feed() {
    clearTimeout(retry);
    let ws;
    try { ws = new WebSocket(base + "/panel/ws"); } catch (e) { setInterval(poll, 1000); return; }
    panel = ws;
    ws.onopen = () => {
      live("en-vivo", "en vivo");
      const t = token();
      if (t) ws.send(JSON.stringify({ op: "auth", token: t }));
    };
    ws.onmessage = (m) => {
      const data = JSON.parse(m.data);
      if (isAuthError(data)) { warn(data); return; }
      if (data.estado === undefined) { render(data); return; }
      if (data.estado === "ok" && data.resultado && "identidad" in data.resultado) warn(null);
    };
    ws.onclose = (e) => {
      if (panel !== ws) return;  // replaced by a newer feed
      panel = null;
      live("sin-conexion", e.code === 1008 ? "sin token" : "sin conexión");
      retry = setTimeout(feed, 2000);
    };
  }

  function reconnect() {
    if (panel) { const old = panel; panel = null; old.close(); }
    if (tasks) { const old = tasks; tasks = null; old.close(); }
    feed();
  }

  function connect() {
    return new Promise((resolve, reject) => {
      if (tasks && tasks.readyState === WebSocket.OPEN) { resolve(tasks); return; }
      const ws = new WebSocket(base + "/ws");
      ws.onopen = () => { tasks = ws; resolve(ws); };
      ws.onerror = () => reject(new Error("no se pudo abrir " + base + "/ws"));
      ws.onclose = (e) => {
        if (tasks === ws) tasks = null;
        for (const w of waiting) w.reject(new Error("WebSocket cerrado (" + e.code + ") " + e.reason));
        waiting = [];
      };
      ws.onmessage = (m) => {
        const reply = JSON.parse(m.data);
        const i = waiting.findIndex((w) => w.id === reply.tarea_id);
        if (i >= 0) { waiting[i].resolve(reply); waiting.splice(i, 1); }
      };
    });
  }

  function send(request) {
    return connect().then((ws) => new Promise((resolve, reject) => {
      waiting.push({ id: request.tarea_id, resolve: resolve, reject: reject });
      ws.send(JSON.stringify(request));
    }));
  }

  function loadTypes() {
    fetch("tipos", { headers: headers() }).then(answered).then((r) => {
      warn(null);
      const select = $("tipo");
      const chosen = select.value;
      select.replaceChildren();
      for (const t of r.resultado || []) {
        const o = document.createElement("option");
        o.value = t.tipo;
        o.textContent = t.codigo + " · " + t.tipo;
        select.append(o);
      }
      if (chosen) select.value = chosen;
    }).catch(() => {});
  }

  $("token").addEventListener("change", () => { loadTypes(); reconnect(); });

  $("formulario").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const out = $("respuesta");
    const request = { tarea_id: "panel-" + Date.now() + "-" + (++counter), tipo: $("tipo").value };
    const text = $("contenido").value;
    const number = Number(text);
    request.contenido = request.tipo === "sleep" && text.trim() !== "" && !isNaN(number) ? number : text;
    const t = token();
    if (t) request.token = t;
    out.className = "";
    out.textContent = "enviando…";
    send(request).then((reply) => {
      if (isAuthError(reply)) warn(reply);
      out.className = reply.estado === "error" ? "error" : "";
      out.textContent = JSON.stringify(reply, null, 1);
    }, (err) => { out.className = "error"; out.textContent = String(err.message || err); });
  });

  loadTypes();
  if ("WebSocket" in window) { feed(); } else { setInterval(poll, 1000); }
})();
