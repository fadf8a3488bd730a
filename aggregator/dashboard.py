"""``fedmqtt dashboard``: a live web page of a federation, from the broker's retained messages alone.

The same observer as ``fedmqtt status`` (its collector, :mod:`aggregator.status`),
kept running: an :class:`~edge_agent.mqtt.Loop` subscribes to ``fl/<fed>/#``
(it never publishes) and folds every retained ``model``, ``task``,
``metrics`` and agent ``status`` into one view; a standard-library
``ThreadingHTTPServer`` on a daemon thread serves one page, its script,
plotly.js (from the ``plotly`` Python package: no CDN, no build step) and the
view as JSON at ``/api/state``, which the page polls once a second.

What the page shows is what any subscriber to the federation can read: with
differential privacy on, the aggregator publishes only ε, the test-set
evaluation and the clip norm, so participants and rejections are not shown.
The privacy budget is not on the wire; ``--budget`` draws it. Everything that
came from the broker reaches the page through ``textContent`` (never HTML),
and chart series are only the metric names that are plain identifiers.

It listens on loopback by default; the page carries whatever the dashboard's
broker credentials can read, so think before ``--listen 0.0.0.0:PORT``.
Requests whose ``Host`` is not this server's address are refused (DNS
rebinding), unless it listens on a wildcard address.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from edge_agent import wire
from edge_agent.config import BrokerConfig
from edge_agent.mqtt import Connection, Loop

from .status import _Collector

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:8050"
# Rounds the charts keep (the retained metrics carry only the last 20; the
# dashboard remembers what it saw while running).
MAX_ROUNDS = 5000
MAX_UNDECODABLE = 20
# Only such metric names become chart series (plotly renders a subset of HTML in names).
_SERIES_NAME = re.compile(r"^[A-Za-z0-9_]{1,64}$")
_WILDCARD_HOSTS = ("", "0.0.0.0", "::")


class DashboardError(ValueError):
    """A dashboard that cannot start (no plotly, bad --listen), with the reason."""


def _series_key(name: str) -> bool:
    return bool(_SERIES_NAME.match(name)) and (name.endswith("accuracy") or name.endswith("loss") or name == "epsilon")


class _LiveCollector(_Collector):
    """The status collector, kept running: thread-safe, clears removed messages, remembers rounds."""

    def __init__(self, fed: str) -> None:
        super().__init__(fed)
        self.lock = threading.Lock()
        self.rounds: dict[int, dict[str, float]] = {}
        self.last_selected: dict[str, int] = {}
        self.updated = 0.0

    def on_message(self, conn: Connection, topic: str, payload: bytes, props: dict[str, str]) -> None:
        kind, agent = self.topics.parse(topic)
        if kind in ("", "update", "inbox"):
            return
        with self.lock:
            self.updated = time.time()
            if not payload:  # a retained message was removed
                if kind == "status":
                    self.view.agents.pop(agent, None)
                elif kind == "model/onnx":
                    self.view.onnx_bytes = 0
                elif kind == "selected":
                    self.view.notices.pop(agent, None)
                elif kind in ("model", "task", "metrics"):
                    setattr(self.view, kind, None)
                return
            before = getattr(self.view, kind, None) if kind in ("task", "metrics") else None
            super().on_message(conn, topic, payload, props)
            del self.view.undecodable[:-MAX_UNDECODABLE]
            t, m = self.view.task, self.view.metrics
            if kind in ("task", "selected") and t is not None and t.state == "open":
                for a in self.view.selected() or ():
                    self.last_selected[a] = t.round
            if kind == "metrics" and m is not None and m is not before:
                self._merge(m)

    def _merge(self, m: wire.MetricsMsg) -> None:
        if self.rounds and m.round < max(self.rounds):
            self.rounds.clear()  # a new run of the federation (state reset)
        for h in m.history:
            r = int(h.get("round", 0))
            self.rounds.setdefault(r, {}).update({k: v for k, v in h.items() if _series_key(k)})
        self.rounds.setdefault(m.round, {}).update({k: v for k, v in m.metrics.items() if _series_key(k)})
        for r in sorted(self.rounds)[:-MAX_ROUNDS]:
            del self.rounds[r]

    def snapshot(self, budget: float = 0.0) -> dict:
        """The view as plain JSON-able data (what ``/api/state`` serves)."""
        with self.lock:
            v, now = self.view, time.time()
            out: dict = {"federation": v.fed, "now": now, "updated": self.updated,
                         "undecodable": list(v.undecodable)}
            out["model"] = None if v.model is None else {
                "round": v.model.round, "version": v.model.version, "kind": v.model.spec.kind,
                "layers": v.model.spec.layer_sizes(), "onnx_bytes": v.onnx_bytes}
            t = v.task
            out["task"] = None if t is None else {
                "state": t.state, "round": t.round, "attempt": t.attempt, "mode": t.mode,
                "deadline": t.deadline or None,
                "deadline_in": max(0.0, t.deadline - now) if t.deadline and t.state == "open" else None,
                "selected": v.selected(), "dp_mode": t.config.dp_mode,
                "secagg": t.secagg.mode if t.secagg is not None else ""}
            selected = set(v.selected() or ())
            out["agents"] = [
                {"id": a, "state": s.state, "eligible": s.eligible, "reason": s.reason, "model_round": s.round,
                 "last_selected": self.last_selected.get(a), "samples": s.num_samples, "software": s.software,
                 "selected": a in selected}
                for a, s in sorted(v.agents.items())]
            m = v.metrics
            dp = (m is not None and "epsilon" in m.metrics) or (t is not None and bool(t.config.dp_mode))
            out["metrics"] = None if m is None else {
                "round": m.round, "version": m.version, "participants": None if dp else m.participants,
                "values": {k: x for k, x in m.metrics.items() if not k.startswith("rejected_")}}
            out["rejected"] = None if dp or m is None else {
                k[len("rejected_"):]: int(x) for k, x in sorted(m.metrics.items()) if k.startswith("rejected_")}
            eps = m.metrics.get("epsilon") if m is not None else None
            out["privacy"] = None if not dp else {
                "epsilon": eps, "delta": m.metrics.get("delta") if m is not None else None,
                "noise_multiplier": m.metrics.get("noise_multiplier") if m is not None else None,
                "budget": (m.metrics.get("epsilon_budget") if m is not None else None) or budget or None}
            rounds = sorted(self.rounds)
            names = sorted({k for r in rounds for k in self.rounds[r]})
            series = {k: [self.rounds[r].get(k) for r in rounds] for k in names}
            out["charts"] = {
                "rounds": rounds,
                "accuracy": {k: s for k, s in series.items() if k.endswith("accuracy")},
                "loss": {k: s for k, s in series.items() if k.endswith("loss")},
                "epsilon": series.get("epsilon")}
            return out


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    dashboard: "Dashboard"


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "fedmqtt-dashboard"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._respond(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._respond(body=False)

    def _respond(self, body: bool) -> None:
        d = self.server.dashboard
        if not d.host_allowed(self.headers.get("Host", "")):
            return self._send(403, "text/plain; charset=utf-8", b"unexpected Host header\n", body)
        path = self.path.split("?", 1)[0]
        if path == "/":
            self._send(200, "text/html; charset=utf-8", PAGE.encode(), body, csp=True)
        elif path == "/app.js":
            self._send(200, "text/javascript; charset=utf-8", APP_JS.encode(), body)
        elif path == "/plotly.min.js":
            self._send(200, "text/javascript; charset=utf-8", d.plotly_js, body, cache="max-age=86400")
        elif path == "/api/state":
            data = json.dumps(d.collector.snapshot(d.budget) | {"connected": d.conn.connected, "broker": d.broker_name})
            self._send(200, "application/json", data.encode(), body)
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found\n", body)

    def _send(self, code: int, ctype: str, data: bytes, body: bool, cache: str = "no-store", csp: bool = False) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", cache)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        if csp:
            # plotly.js sets inline styles and adds <style> rules; nothing else is inline.
            self.send_header("Content-Security-Policy", "default-src 'none'; script-src 'self'; connect-src 'self'; "
                             "style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self' data:; "
                             "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        log.debug("%s %s", self.address_string(), format % args)


class Dashboard:
    """The observer and the web server; :meth:`start` in the background or :meth:`run` in the foreground."""

    def __init__(self, broker: BrokerConfig, fed: str, listen: tuple[str, int] = ("127.0.0.1", 8050),
                 budget: float = 0.0) -> None:
        try:
            from plotly.offline import get_plotlyjs
        except ImportError:
            raise DashboardError("needs the plotly package: pip install 'fedmqtt[dashboard]'") from None
        self.plotly_js = get_plotlyjs().encode()
        self.budget = budget
        self.broker_name = f"{broker.host}:{broker.port}"
        self.collector = _LiveCollector(fed)
        self.loop = Loop()
        self.conn = Connection(self.loop, broker, client_id="", handler=self.collector)
        host, port = listen
        try:
            self.server = (_Server6 if ":" in host else _Server)((host, port), _Handler)
        except OSError as exc:
            raise DashboardError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self.server.dashboard = self
        self.host, self.port = host, self.server.server_address[1]
        names = {self.host, "localhost", "127.0.0.1", "[::1]"} | ({f"[{host}]"} if ":" in host else set())
        self._hosts = {f"{n}:{self.port}" for n in names}
        self._http: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in _WILDCARD_HOSTS else (f"[{self.host}]" if ":" in self.host else self.host)
        return f"http://{host}:{self.port}/"

    def host_allowed(self, host: str) -> bool:
        return self.host in _WILDCARD_HOSTS or host.lower() in self._hosts

    def _serve_http(self) -> None:
        self._http = threading.Thread(target=self.server.serve_forever, name="fedmqtt-dashboard-http", daemon=True)
        self._http.start()

    def start(self) -> None:
        """Connect to the broker and serve, both on daemon threads."""
        self.conn.open()
        self.loop.start(name="fedmqtt-dashboard-mqtt")
        self._serve_http()

    def run(self) -> None:
        """Serve until :meth:`Loop.stop` (a signal): the MQTT loop runs in this thread."""
        self.conn.open()
        self._serve_http()
        try:
            self.loop.run()
        finally:
            self.server.shutdown()
            self.server.server_close()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.loop.stop()
        if self.loop.thread is not None:
            self.loop.thread.join(10)


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>fedmqtt dashboard</title>
<link rel="icon" href="data:,">
<style>
body { font: 14px system-ui, sans-serif; margin: 0; padding: 12px 20px; color: #222; background: #f4f5f7; }
header { display: flex; align-items: baseline; gap: 16px; }
h1 { font-size: 20px; margin: 0 0 8px; } h2 { font-size: 14px; margin: 0 0 6px; color: #555; }
.pill { padding: 2px 8px; border-radius: 10px; font-size: 12px; }
.ok { color: #176f2c; } .bad { color: #b3261e; } .pill.ok { background: #dff3e4; } .pill.bad { background: #fbe3e1; }
.dim { color: #777; } .big { font-size: 20px; font-weight: 600; margin-bottom: 2px; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(220px, 1fr)); gap: 10px; margin-bottom: 10px; }
.card, .panel { background: #fff; border-radius: 6px; padding: 10px 12px; box-shadow: 0 1px 2px #0002; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(380px, 1fr)); gap: 10px; margin-bottom: 10px; }
.chart { height: 250px; } code { font-size: 13px; }
table { border-collapse: collapse; width: 100%; } th, td { text-align: left; padding: 3px 8px 3px 0; }
th { font-weight: 600; color: #555; border-bottom: 1px solid #ddd; } td.num, th.num { text-align: right; }
td:first-child { white-space: nowrap; } .wide { grid-template-columns: minmax(0, 2fr) minmax(0, 1fr); }
</style>
<script src="plotly.min.js"></script>
<script src="app.js" defer></script>
</head>
<body>
<header><h1>fedmqtt · <span id="fed"></span></h1><span id="conn" class="pill">loading…</span>
<span id="updated" class="dim"></span></header>
<p id="error" class="bad" hidden></p>
<section class="cards">
<div class="card"><h2>Current model</h2><div class="big">round <span id="model-round">–</span></div>
<div>version <code id="model-version">–</code></div><div id="model-kind" class="dim"></div></div>
<div class="card"><h2>Round in progress</h2><div class="big" id="task-state">–</div>
<div id="task-deadline"></div><div id="task-detail" class="dim"></div></div>
<div class="card"><h2>Last closed round</h2><div class="big">round <span id="last-round">–</span></div>
<div id="last-summary"></div></div>
<div class="card" id="privacy" hidden><h2>Differential privacy</h2><div class="big">ε <span id="eps">–</span></div>
<div id="eps-detail"></div></div>
</section>
<section class="grid">
<div class="panel"><div id="chart-accuracy" class="chart"></div></div>
<div class="panel"><div id="chart-loss" class="chart"></div></div>
<div class="panel" id="epsilon-panel" hidden><div id="chart-epsilon" class="chart"></div></div>
</section>
<section class="grid wide">
<div class="panel"><h2>Agents <span id="agent-counts" class="dim"></span></h2>
<table id="agents"><thead><tr><th>agent</th><th>state</th><th>eligible</th><th>why not</th>
<th class="num" title="the last round this dashboard saw the agent selected for">last selected</th>
<th class="num" title="round of the model the agent held at its last status">model round</th>
<th class="num">samples</th></tr></thead><tbody></tbody></table></div>
<div class="panel"><h2>Rejected updates</h2><p id="rejected-note" class="dim"></p>
<table id="rejected"><thead><tr><th>reason</th><th class="num">count</th></tr></thead><tbody></tbody></table>
<ul id="undecodable" class="bad"></ul></div>
</section>
</body>
</html>
"""

# Only fetches JSON and hands it to Plotly; broker text goes in through textContent.
APP_JS = r"""
"use strict";
const $ = (id) => document.getElementById(id);
const set = (id, text) => { $(id).textContent = text; };
const CONFIG = {displayModeBar: false, responsive: true};
let lastCharts = "";

function rows(id, data) {
  const body = $(id).tBodies[0], key = JSON.stringify(data);
  if (body.dataset.key === key) return;  // unchanged: keep the rows (and any selection in them)
  body.dataset.key = key;
  body.replaceChildren(...data.map((cells) => {
    const tr = document.createElement("tr");
    for (const [text, cls] of cells) {
      const td = tr.insertCell();
      td.textContent = text === null || text === undefined ? "–" : String(text);
      if (cls) td.className = cls;
    }
    return tr;
  }));
}

function plot(id, title, series, x, extra, yaxis) {
  const traces = Object.entries(series).map(([name, y]) => ({x, y, name, type: "scatter", mode: "lines+markers"}));
  Plotly.react($(id), traces.concat(extra || []), {
    title: {text: title}, margin: {l: 50, r: 10, t: 36, b: 36}, showlegend: true,
    legend: {orientation: "h", x: 0, y: 1.12}, xaxis: {title: {text: "round"}, tickformat: "d"}, yaxis: yaxis || {},
  }, CONFIG);
}

function render(s) {
  set("fed", s.federation);
  set("conn", (s.connected ? "connected to " : "connecting to ") + s.broker);
  $("conn").className = "pill " + (s.connected ? "ok" : "bad");
  set("updated", s.updated ? "last message " + new Date(s.updated * 1000).toLocaleTimeString() : "");
  const m = s.model, t = s.task, lm = s.metrics, p = s.privacy;
  set("model-round", m ? m.round : "–");
  set("model-version", m ? m.version : "none retained");
  set("model-kind", m ? m.kind + " " + m.layers.join("→")
      + (m.onnx_bytes ? ", ONNX " + m.onnx_bytes + " bytes" : "") : "");
  set("task-state", !t ? "no task retained" : t.state === "open" ? "round " + t.round + " open"
      : t.state === "waiting" ? "waiting to open round " + t.round : "finished after round " + t.round);
  set("task-deadline", t && t.deadline_in !== null ? "deadline in " + Math.round(t.deadline_in) + " s, at "
      + new Date(t.deadline * 1000).toLocaleTimeString() : "");
  set("task-detail", t ? t.mode + (t.attempt ? ", attempt " + t.attempt : "")
      + (t.state === "open" && t.selected !== null ? ", " + t.selected.length + " selected" : "")
      + (t.dp_mode ? ", DP " + t.dp_mode : "") + (t.secagg ? ", " + t.secagg : "") : "");
  set("last-round", lm ? lm.round : "–");
  const v = lm ? lm.values : {};
  set("last-summary", !lm ? "" : [lm.participants !== null ? lm.participants + " updates" : null,
      "test_accuracy" in v ? "accuracy " + v.test_accuracy.toFixed(4) : null,
      "test_loss" in v ? "loss " + v.test_loss.toFixed(4) : null,
      "seconds" in v ? v.seconds.toFixed(2) + " s" : null].filter((x) => x).join(", "));
  $("privacy").hidden = $("epsilon-panel").hidden = !p;
  if (p) {
    set("eps", p.epsilon !== null ? p.epsilon.toFixed(3) : "–");
    set("eps-detail", (p.budget ? "budget " + p.budget : "budget not published (--budget)")
        + (p.delta !== null ? ", δ " + p.delta : "")
        + (p.noise_multiplier !== null ? ", z " + p.noise_multiplier.toFixed(3) : ""));
  }
  const online = s.agents.filter((a) => a.state === "online");
  set("agent-counts", s.agents.length + " known, " + online.length + " online, "
      + online.filter((a) => a.eligible).length + " eligible");
  rows("agents", s.agents.map((a) => [[a.id + (a.selected ? " ●" : "")], [a.state, a.state === "online" ? "ok" : "bad"],
      [a.eligible ? "yes" : "no", a.eligible ? "ok" : "bad"], [a.reason], [a.last_selected, "num"],
      [a.model_round, "num"], [a.samples, "num"]]));
  const rej = s.rejected ? Object.entries(s.rejected) : [];
  set("rejected-note", p ? "not published under differential privacy" : !lm ? "no metrics retained"
      : rej.length ? "since the aggregator started" : "none");
  $("rejected").hidden = !rej.length;
  rows("rejected", rej.map(([k, n]) => [[k], [n, "num"]]));
  $("undecodable").replaceChildren(...s.undecodable.map((u) => {
    const li = document.createElement("li"); li.textContent = "undecodable: " + u; return li;
  }));
  const c = s.charts, key = JSON.stringify([c, p && p.budget]);
  if (key !== lastCharts) {
    lastCharts = key;
    plot("chart-accuracy", "accuracy per round", c.accuracy, c.rounds);
    plot("chart-loss", "loss per round", c.loss, c.rounds);
    if (p && c.epsilon) {
      const budget = p.budget && c.rounds.length ? [{x: [c.rounds[0], c.rounds[c.rounds.length - 1]],
        y: [p.budget, p.budget], name: "budget", mode: "lines", line: {dash: "dash"}}] : [];
      plot("chart-epsilon", "ε spent", {epsilon: c.epsilon}, c.rounds, budget, {rangemode: "tozero"});
    }
  }
}

async function poll() {
  try {
    const r = await fetch("api/state", {cache: "no-store"});
    if (!r.ok) throw new Error("HTTP " + r.status);
    render(await r.json());
    $("error").hidden = true;
  } catch (e) {
    set("error", "dashboard server unreachable: " + e.message);
    $("error").hidden = false;
  }
  setTimeout(poll, 1000);
}
poll();
"""
