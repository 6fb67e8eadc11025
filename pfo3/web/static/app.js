// pfo3 dashboard: figures from /panel/ws (or /panel, polled, without
// WebSockets); tasks sent over /ws as the TCP protocol's JSON messages.
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

  function poll() {
    fetch("panel").then((r) => r.json()).then((r) => render(r.resultado)).catch(() => {});
  }

  function feed() {
    let ws;
    try { ws = new WebSocket(base + "/panel/ws"); } catch (e) { setInterval(poll, 1000); return; }
    ws.onopen = () => live("en-vivo", "en vivo");
    ws.onmessage = (m) => render(JSON.parse(m.data));
    ws.onclose = () => { live("sin-conexion", "sin conexión"); setTimeout(feed, 2000); };
  }

  function connect() {
    return new Promise((resolve, reject) => {
      if (tasks && tasks.readyState === WebSocket.OPEN) { resolve(tasks); return; }
      const ws = new WebSocket(base + "/ws");
      ws.onopen = () => { tasks = ws; resolve(ws); };
      ws.onerror = () => reject(new Error("no se pudo abrir " + base + "/ws"));
      ws.onclose = (e) => {
        tasks = null;
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
    fetch("tipos").then((r) => r.json()).then((r) => {
      const select = $("tipo");
      for (const t of r.resultado || []) {
        const o = document.createElement("option");
        o.value = t.tipo;
        o.textContent = t.codigo + " · " + t.tipo;
        select.append(o);
      }
    }).catch(() => {});
  }

  $("formulario").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const out = $("respuesta");
    const request = { tarea_id: "panel-" + Date.now() + "-" + (++counter), tipo: $("tipo").value };
    const text = $("contenido").value;
    const number = Number(text);
    request.contenido = request.tipo === "sleep" && text.trim() !== "" && !isNaN(number) ? number : text;
    const token = $("token").value.trim();
    if (token) request.token = token;
    out.className = "";
    out.textContent = "enviando…";
    send(request).then((reply) => {
      out.className = reply.estado === "error" ? "error" : "";
      out.textContent = JSON.stringify(reply, null, 1);
    }, (err) => { out.className = "error"; out.textContent = String(err.message || err); });
  });

  loadTypes();
  if ("WebSocket" in window) { feed(); } else { setInterval(poll, 1000); }
})();
