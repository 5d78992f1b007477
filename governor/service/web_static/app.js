// The status page: draws each snapshot the daemon pushes on /api/events (governor/live.py).
// Every value shown comes from the snapshot; cells are filled with textContent, never HTML.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
let canCancel = false;

// The token comes once in the address (?token=, the URL the daemon printed) and is kept in
// this tab's sessionStorage, which only this origin (scheme, host *and port*) can read: not
// a cookie, which the browser would send to every other server on this host. Each request
// carries it: a Bearer header, or ?token= where a header cannot be set (EventSource).
const TOKEN_KEY = "governor_token";
function takeToken() {
  const given = new URLSearchParams(location.search).get("token");
  if (given) {
    sessionStorage.setItem(TOKEN_KEY, given);
    history.replaceState(null, "", "/");  // out of the address bar and the history
  }
  return sessionStorage.getItem(TOKEN_KEY);
}
const token = takeToken();
function withToken(path) { return `${path}?token=${encodeURIComponent(token)}`; }
function refused() {
  sessionStorage.removeItem(TOKEN_KEY);
  document.body.textContent = "this page needs the token printed when the daemon started (?token=...)";
}

function seconds(value) {
  if (value === null || value === undefined) return "-";
  return value < 1 ? `${(value * 1000).toFixed(0)} ms` : `${value.toFixed(1)} s`;
}
function pair(p50, p95) { return p50 === null || p50 === undefined ? "-" : `${seconds(p50)} / ${seconds(p95)}`; }
function mib(value) { return value === null || value === undefined ? "-" : `${value.toFixed(0)} MiB`; }
function clock(wall) { return wall ? new Date(wall * 1000).toLocaleTimeString() : "-"; }

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "-" : String(text);
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

// A value against its limit, with a bar when there is a limit.
function against(row, value, limit, shown, shownLimit) {
  const td = cell(row, limit ? `${shown} / ${shownLimit}` : shown);
  if (limit && value !== null && value !== undefined) {
    const bar = document.createElement("span"), fill = document.createElement("span");
    bar.className = "bar";
    const share = Math.min(1, value / limit);
    fill.style.width = `${(share * 100).toFixed(0)}%`;
    if (share > 0.8) fill.className = "high";
    bar.appendChild(fill);
    td.appendChild(bar);
  }
}

function cancelButton(row, taskId) {
  const td = cell(row, "");
  if (!canCancel || taskId === null || taskId === undefined) return;
  const button = document.createElement("button");
  button.textContent = "cancel";
  button.addEventListener("click", () => {
    if (!confirm(`Cancel task ${taskId}?`)) return;
    fetch("/api/cancel", {method: "POST", body: JSON.stringify({task_ids: [taskId]}),
                          headers: {"Content-Type": "application/json", "Authorization": `Bearer ${token}`}});
  });
  td.appendChild(button);
}

function fill(id, items, draw) {
  const body = document.querySelector(`#${id} tbody`);
  const rows = items.map((item) => { const row = document.createElement("tr"); draw(row, item); return row; });
  body.replaceChildren(...rows);
}

function chart(id, points, series, bucket) {
  const svg = document.getElementById(id);
  const width = 600, height = 160, left = 40, bottom = 18, top = 8;
  const values = points.flatMap((p) => series.map((s) => s.value(p))).filter((v) => v !== null);
  const max = Math.max(...values, 1e-9);
  const x = (i) => left + (i * (width - left - 4)) / Math.max(1, points.length - 1);
  const y = (v) => height - bottom - (v / max) * (height - bottom - top);
  const parts = [];
  const line = (x1, y1, x2, y2, cls) => {
    const el = document.createElementNS(SVG, "line");
    Object.entries({x1, y1, x2, y2}).forEach(([k, v]) => el.setAttribute(k, v));
    el.setAttribute("class", cls);
    parts.push(el);
  };
  const text = (tx, ty, label, anchor) => {
    const el = document.createElementNS(SVG, "text");
    el.setAttribute("x", tx); el.setAttribute("y", ty);
    if (anchor) el.setAttribute("text-anchor", anchor);
    el.textContent = label;
    parts.push(el);
  };
  line(left, height - bottom, width, height - bottom, "axis");
  line(left, top, left, height - bottom, "axis");
  text(left - 4, top + 8, series[0].label(max), "end");
  text(left - 4, height - bottom, "0", "end");
  text(left, height - 4, `-${((points.length - 1) * bucket / 60).toFixed(0)} min`);
  text(width - 4, height - 4, "now", "end");
  for (const s of series) {
    if (s.bars) {
      points.forEach((p, i) => {
        const v = s.value(p);
        if (!v) return;
        const bar = document.createElementNS(SVG, "rect");
        const w = Math.max(1, (width - left) / points.length - 1);
        bar.setAttribute("x", x(i) - w / 2); bar.setAttribute("width", w);
        bar.setAttribute("y", y(v)); bar.setAttribute("height", height - bottom - y(v));
        bar.setAttribute("class", s.cls);
        parts.push(bar);
      });
    } else {
      // A bucket with no task is a gap: the line stops there and starts again after it,
      // rather than bridging (or falling to 0) as if something had been measured.
      let pen = "M";
      const d = points.map((p, i) => {
        const v = s.value(p);
        if (v === null) { pen = "M"; return ""; }
        const step = `${pen}${x(i).toFixed(1)},${y(v).toFixed(1)}`;
        pen = "L";
        return step;
      }).filter(Boolean).join(" ");
      if (d) {
        const path = document.createElementNS(SVG, "path");
        path.setAttribute("d", d); path.setAttribute("class", s.cls);
        parts.push(path);
      }
      // A dot per point: a bucket with tasks between two empty ones still shows.
      points.forEach((p, i) => {
        const v = s.value(p);
        if (v === null) return;
        const dot = document.createElementNS(SVG, "circle");
        dot.setAttribute("cx", x(i).toFixed(1)); dot.setAttribute("cy", y(v).toFixed(1));
        dot.setAttribute("r", 2); dot.setAttribute("class", `${s.cls} dot`);
        parts.push(dot);
      });
    }
  }
  svg.replaceChildren(...parts);
}

function draw(snap) {
  canCancel = snap.can_cancel;
  const kills = Object.values(snap.worker_kills).reduce((n, byReason) =>
    n + Object.values(byReason).reduce((a, b) => a + b, 0), 0);
  document.getElementById("summary").textContent =
    `daemon pid ${snap.daemon_pid} · ${clock(snap.at)} · workers RSS ${mib(snap.memory.workers_rss_bytes / 1048576)}` +
    ` · workers killed ${kills}` + (canCancel ? "" : " · read-only") +
    (snap.critical_keys.length ? " · critical queue by key: " +
      snap.critical_keys.map((k) => `${k.key} ${k.queued}`).join(", ") : "");
  fill("lanes", snap.lanes, (row, l) => {
    [l.lane, l.queue_depth, l.in_flight, l.warm_spares, l.workers.busy, l.workers.idle, l.workers.starting]
      .forEach((v) => cell(row, v));
  });
  fill("workers", snap.workers, (row, w) => {
    cell(row, w.pid); cell(row, w.lane); cell(row, w.state, `state-${w.state}`);
    cell(row, w.step); cell(row, w.key === null ? "" : w.key); cell(row, w.task_id);
    against(row, w.running_s, w.timeout_s, seconds(w.running_s), seconds(w.timeout_s));
    const rss = w.rss_bytes === null ? null : w.rss_bytes / 1048576;
    against(row, rss, w.max_memory_mb, mib(rss), mib(w.max_memory_mb));
    cancelButton(row, w.task_id);
  });
  fill("kills", snap.kills, (row, k) => {
    cell(row, clock(k.at)); cell(row, k.task_id); cell(row, k.step); cell(row, k.lane);
    cell(row, k.reason, "state-failed"); cell(row, k.limit); cell(row, k.observed); cell(row, k.pid);
    cell(row, k.message, "message");
  });
  document.getElementById("window").textContent = `${Math.round(snap.window_s)} s`;
  fill("steps", snap.steps, (row, s) => {
    cell(row, s.step); cell(row, s.lane); cell(row, s.count);
    cell(row, s.per_s === null ? "-" : s.per_s.toFixed(2));
    cell(row, pair(s.queue_p50_s, s.queue_p95_s)); cell(row, pair(s.run_p50_s, s.run_p95_s));
  });
  fill("tasks", snap.tasks, (row, t) => {
    cell(row, t.task_id); cell(row, t.step || t.kind); cell(row, t.lane); cell(row, t.lane_key || "");
    cell(row, t.state, `state-${t.state}`);
    cell(row, clock(t.submitted_at));
    cell(row, t.ended_at && t.started_at ? seconds(t.ended_at - t.started_at) : "-");
    cell(row, t.error ? t.error.message : "", "message");
    cancelButton(row, t.state === "queued" || t.state === "running" ? t.task_id : null);
  });
  const bucket = snap.series.bucket_s, points = snap.series.points;
  document.querySelectorAll(".bucket").forEach((el) => { el.textContent = `${bucket} s`; });
  chart("throughput", points, [{bars: true, cls: "count", value: (p) => p.count / bucket,
                                label: (m) => `${m.toFixed(1)}/s`}], bucket);
  chart("latency", points, [{cls: "p95", value: (p) => p.p95_s, label: seconds},
                            {cls: "p50", value: (p) => p.p50_s, label: seconds}], bucket);
}

function connect() {
  if (!token) { refused(); return; }
  for (const link of document.querySelectorAll("a[data-api]")) link.href = withToken(link.dataset.api);
  const status = document.getElementById("connection");
  const events = new EventSource(withToken("/api/events"));
  events.onmessage = (message) => {
    status.textContent = "live"; status.className = "live";
    draw(JSON.parse(message.data));
  };
  // EventSource retries by itself while the daemon restarts; say so meanwhile, unless the
  // token is what it refused.
  events.onerror = () => {
    status.textContent = "reconnecting..."; status.className = "reconnecting";
    fetch("/api/live", {headers: {"Authorization": `Bearer ${token}`}})
      .then((reply) => { if (reply.status === 403) { events.close(); refused(); } }, () => {});
  };
}

document.addEventListener("DOMContentLoaded", connect);
