// fieldmesh console: hash-routed pages over /api/v1, one server-sent events stream per page (docs/console.md).
// Everything it loads comes from this server; the API key (if the API needs one) stays in sessionStorage.
const API = "/api/v1";
const main = document.getElementById("main");
let pageAbort = null;   // aborts the current page's requests and stream when the route changes
let timers = [];

const esc = (v) => String(v ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const fmt = (n) => (n === null || n === undefined) ? "–" : (typeof n === "number" ? n.toLocaleString("en") : esc(n));
const ago = (when) => { if (!when) return "never"; const s = (Date.now() - (typeof when === "number" ? when : Date.parse(when))) / 1000;
  return s < 90 ? `${Math.round(s)} s ago` : s < 5400 ? `${Math.round(s / 60)} min ago` : s < 172800 ? `${Math.round(s / 3600)} h ago` : `${Math.round(s / 86400)} d ago`; };

function headers() {
  const key = sessionStorage.getItem("fieldmesh.key");
  return key ? {Authorization: `Bearer ${key}`} : {};
}

async function login() {
  const dlg = document.getElementById("login");
  if (dlg.open) return new Promise((ok) => dlg.addEventListener("close", ok, {once: true}));
  dlg.showModal();
  await new Promise((ok) => dlg.addEventListener("close", ok, {once: true}));
  sessionStorage.setItem("fieldmesh.key", document.getElementById("login-key").value.trim());
}

export async function api(path, opts = {}) {
  for (let attempt = 0; attempt < 3; attempt++) {
    const res = await fetch(API + path, {...opts, headers: {...headers(), ...(opts.headers || {})},
      signal: opts.signal ?? pageAbort?.signal});
    if (res.status === 401) {
      if (sessionStorage.getItem("fieldmesh.key")) {   // (several calls may be refused at once: say it once)
        document.getElementById("login-error").textContent = "That key was refused.";
        sessionStorage.removeItem("fieldmesh.key");
      }
      await login();
      continue;
    }
    const body = res.headers.get("content-type")?.includes("json") ? await res.json() : await res.text();
    if (!res.ok) throw new Error(`${res.status}: ${body?.detail ?? body}`);
    return {body, res};
  }
  throw new Error("not signed in");
}
const get = async (path) => (await api(path)).body;

// Server-sent events read with fetch(), so the credential travels in the Authorization header (EventSource
// cannot send one, and a key in the URL would end up in logs and history). Reconnects after a drop.
async function stream(topics, handlers) {
  const signal = pageAbort.signal;
  const live = document.getElementById("live");
  while (!signal.aborted) {
    try {
      const res = await fetch(`${API}/events/stream?topics=${encodeURIComponent(topics)}`, {headers: headers(), signal});
      if (!res.ok) throw new Error(`stream ${res.status}`);
      live.classList.add("on");
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buf += value;
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, i); buf = buf.slice(i + 2);
          let ev = "message", data = "";
          for (const line of block.split("\n")) {
            if (line.startsWith("event: ")) ev = line.slice(7);
            else if (line.startsWith("data: ")) data += line.slice(6);
          }
          if (data && handlers[ev]) handlers[ev](JSON.parse(data));
        }
      }
    } catch (e) {
      if (signal.aborted) return;
    }
    live.classList.remove("on");
    await new Promise((ok) => setTimeout(ok, 2000));
  }
}

function every(ms, fn) { timers.push(setInterval(fn, ms)); }
const card = (label, n, cls = "") => `<div class="card"><div class="n ${cls}">${fmt(n)}</div><div class="l">${esc(label)}</div></div>`;
const SEVS = ["critical", "major", "minor", "warning", "info"];

// ---- Fleet ---------------------------------------------------------------------------------------
async function fleet(params) {
  const st = {q: params.get("q") || "", sort: params.get("sort") || "device_id", offset: +(params.get("offset") || 0), limit: 50};
  main.innerHTML = `<h2>Fleet</h2><div class="cards" id="fleet-cards"></div><div class="cards" id="fleet-alerts"></div>
    <div class="bar"><input id="q" placeholder="filter device id" value="${esc(st.q)}">
      <span id="count" class="mut"></span><button id="prev">‹ prev</button><button id="next">next ›</button></div>
    <table id="devices"><thead><tr>
      <th data-sort="device_id">device</th><th data-sort="status">status</th><th data-sort="last_seen">last seen</th>
      <th data-sort="readings">readings</th><th>metrics</th><th data-sort="gaps">gaps</th><th>groups</th></tr></thead>
      <tbody></tbody></table>`;
  const summary = async () => {
    const s = await get("/fleet/summary");
    document.getElementById("fleet-cards").innerHTML = card("devices", s.devices) + card(`online (seen < ${s.online_s} s)`, s.online, "ok")
      + card("offline", s.offline, s.offline ? "bad" : "") + card("never seen", s.never_seen, "mut");
    alertCards(s.alerts);
  };
  const alertCards = (a) => {
    document.getElementById("fleet-alerts").innerHTML = card("active alerts", a.active, a.active ? "bad" : "ok")
      + SEVS.map((s) => card(s, a[s] || 0, a[s] ? `sev-${s}` : "mut")).join("");
  };
  const table = async () => {
    const qs = new URLSearchParams({limit: st.limit, offset: st.offset, sort: st.sort});
    if (st.q) qs.set("q", st.q);
    const {body, res} = await api(`/devices?${qs}`);
    const total = +res.headers.get("X-Total-Count");
    document.getElementById("count").textContent = total ? `${st.offset + 1}–${st.offset + body.length} of ${total.toLocaleString("en")}` : "no devices";
    document.querySelector("#devices tbody").innerHTML = body.map((d) => `<tr>
      <td><a href="#/device/${encodeURIComponent(d.device_id)}">${esc(d.device_id)}</a></td><td>${esc(d.status ?? "unregistered")}</td>
      <td title="${esc(d.last_seen)}">${ago(d.last_seen)}</td><td>${fmt(d.readings)}</td><td>${esc(d.metrics.join(", "))}</td>
      <td>${fmt(d.gaps)}</td><td>${esc(d.groups.join(", "))}</td></tr>`).join("");
    document.getElementById("prev").disabled = st.offset === 0;
    document.getElementById("next").disabled = st.offset + st.limit >= total;
    history.replaceState(null, "", `#/fleet?${new URLSearchParams({q: st.q, sort: st.sort, offset: st.offset})}`);
  };
  let debounce;
  document.getElementById("q").addEventListener("input", (e) => {
    clearTimeout(debounce); debounce = setTimeout(() => { st.q = e.target.value; st.offset = 0; table(); }, 250);
  });
  document.getElementById("prev").onclick = () => { st.offset = Math.max(0, st.offset - st.limit); table(); };
  document.getElementById("next").onclick = () => { st.offset += st.limit; table(); };
  for (const th of document.querySelectorAll("th[data-sort]")) {
    th.onclick = () => { const k = th.dataset.sort; st.sort = st.sort === k ? `-${k}` : k; st.offset = 0; table(); };
  }
  await Promise.all([table(), summary()]);
  every(10000, summary);
  stream("alerts", {alerts: alertCards});
}

// ---- Device --------------------------------------------------------------------------------------
const RANGES = {"15m": 900e3, "1h": 3600e3, "6h": 21600e3, "24h": 86400e3, "7d": 604800e3, "30d": 2592000e3};

async function device(id, params) {
  const range = params.get("range") || "1h";
  const d = await get(`/devices/${encodeURIComponent(id)}`);
  const metric = params.get("metric") || d.metrics[0];
  main.innerHTML = `<h2>Device ${esc(id)}</h2>
    <div class="cards">${card("readings", d.readings)}${card("last seen", ago(d.last_seen))}${card("gaps", d.gaps)}${card("status", d.status ?? "unregistered")}</div>
    <div class="bar">metric <select id="metric">${d.metrics.map((m) => `<option ${m === metric ? "selected" : ""}>${esc(m)}</option>`).join("")}</select>
      range ${Object.keys(RANGES).map((r) => `<button data-range="${r}" ${r === range ? "disabled" : ""}>${r}</button>`).join("")}
      <span id="series-info" class="mut"></span></div>
    <div class="chart" id="chart"></div>
    <div class="cols"><div><h3>Registry</h3><dl class="kv" id="attrs"></dl><h3>Enrichment (latest reading)</h3><dl class="kv" id="enrichment"></dl>
      <h3>Twin <span id="twin-version" class="mut"></span></h3><dl class="kv" id="twin"></dl></div>
      <div><h3>Recent alerts</h3><table id="dev-alerts"><tbody></tbody></table><h3>Dead letters</h3><table id="dev-dlq"><tbody></tbody></table></div></div>`;
  const kv = (o) => Object.entries(o || {}).map(([k, v]) => `<dt>${esc(k)}</dt><dd>${esc(typeof v === "object" ? JSON.stringify(v) : v)}</dd>`).join("") || "<dt>none</dt><dd></dd>";
  document.getElementById("attrs").innerHTML = kv({groups: d.groups.join(", "), tags: d.tags.join(", "), ...d.attributes, first_seen: d.first_seen, last_ts: d.last_ts});
  const nav = (p) => { location.hash = `#/device/${encodeURIComponent(id)}?${new URLSearchParams({metric, range, ...p})}`; };
  document.getElementById("metric").onchange = (e) => nav({metric: e.target.value});
  for (const b of document.querySelectorAll("button[data-range]")) b.onclick = () => nav({range: b.dataset.range});

  const el = document.getElementById("chart");
  const width = Math.max(400, el.clientWidth - 20);
  let data = [[], [], [], []];
  const plot = new uPlot({width, height: 320, scales: {x: {time: true}}, hooks: {draw: [() => { window.__fmDrawnAt = performance.now(); }]},
    series: [{}, {label: `${metric} avg`, stroke: "#2456c7", width: 1.5},
      {label: "min", stroke: "#9fb3e0", width: 1}, {label: "max", stroke: "#9fb3e0", width: 1}]}, data, el);
  window.__fmChart = plot;   // tests and the benchmark read the drawn data
  if (metric) {
    const t0 = performance.now();
    const s = await get(`/telemetry/series?${new URLSearchParams({device_id: id, metric, start: `-${range}`, max_points: Math.min(4000, width * 2)})}`);
    data = [s.t.map((t) => t / 1000), s.avg, s.min, s.max];
    plot.setData(data);
    const t1 = performance.now();
    await new Promise((ok) => requestAnimationFrame(ok));   // uPlot draws the new data (its draw hook notes when)
    window.__fmSeries = {points: s.points, source: s.source, fetchMs: t1 - t0, drawnMs: window.__fmDrawnAt - t0};
    document.getElementById("series-info").textContent = `${s.points} points from ${s.source}${s.bucket_ms ? ` (${s.bucket_ms / 1000} s buckets)` : ""}${s.truncated ? ", older readings left out" : ""}`;
  }
  const latest = (await get(`/telemetry/raw?device_id=${encodeURIComponent(id)}&limit=1`))[0];
  document.getElementById("enrichment").innerHTML = kv(latest?.enrichment);
  try {  // desired, reported and what is still to apply (docs/twins.md)
    const t = await get(`/devices/${encodeURIComponent(id)}/twin`);
    document.getElementById("twin-version").textContent = `version ${t.version}`;
    document.getElementById("twin").innerHTML = kv({desired: t.desired, reported: t.reported, delta: t.delta});
  } catch (e) { document.getElementById("twin").innerHTML = `<dt>twin</dt><dd class="mut">${esc(e.message)}</dd>`; }
  const alerts = await get(`/alerts?device_id=${encodeURIComponent(id)}&limit=20`);
  document.querySelector("#dev-alerts tbody").innerHTML = alerts.map((a) => `<tr><td class="sev-${a.severity}">${esc(a.severity)}</td>
    <td>${esc(a.rule)}</td><td>${esc(a.state)}</td><td>${ago(a.opened_ms)}</td></tr>`).join("") || "<tr><td class=mut>none</td></tr>";
  try {
    const dl = (await get(`/dlq?limit=500`)).filter((r) => r.device_id === id).slice(0, 20);
    document.querySelector("#dev-dlq tbody").innerHTML = dl.map((r) => `<tr><td>${esc(r.reason)}</td><td>${esc(r.received_at)}</td>
      <td class="wrap">${esc(r.payload.slice(0, 120))}</td></tr>`).join("") || "<tr><td class=mut>none</td></tr>";
  } catch (e) { document.querySelector("#dev-dlq tbody").innerHTML = `<tr><td class=mut>${esc(e.message)}</td></tr>`; }
  // live: append the new readings while the range ends now (raw resolution; a bucketed range is redrawn by reload)
  const span = RANGES[range] / 1000;
  stream(`device:${id}`, {readings: (ev) => {
    if (!metric || !ev.rows.length) return;
    for (const r of ev.rows) {
      const v = r.measurements[metric];
      if (typeof v !== "number" || r.ts_ms / 1000 <= (data[0].at(-1) ?? 0)) continue;   // drawn already
      data[0].push(r.ts_ms / 1000); data[1].push(v); data[2].push(v); data[3].push(v);
      window.__fmLive = (window.__fmLive || 0) + 1;
    }
    const cut = Date.now() / 1000 - span;
    let k = 0; while (k < data[0].length && data[0][k] < cut) k++;
    if (k) data = data.map((c) => c.slice(k));
    plot.setData(data);
  }});
}

// ---- Alerts --------------------------------------------------------------------------------------
async function alerts(params) {
  const st = {state: params.get("state") ?? "active", severity: params.get("severity") || "", device: params.get("device_id") || ""};
  main.innerHTML = `<h2>Alerts</h2><div class="bar">
    state <select id="state">${["active", "open", "acknowledged", "cleared", ""].map((s) => `<option value="${s}" ${s === st.state ? "selected" : ""}>${s || "any"}</option>`).join("")}</select>
    severity <select id="severity">${["", ...SEVS].map((s) => `<option value="${s}" ${s === st.severity ? "selected" : ""}>${s || "any"}</option>`).join("")}</select>
    <input id="device" placeholder="device id" value="${esc(st.device)}"> <span id="msg"></span></div>
    <table id="alerts"><thead><tr><th>id</th><th>severity</th><th>rule</th><th>device</th><th>state</th><th>opened</th><th>value</th><th></th></tr></thead><tbody></tbody></table>`;
  const load = async () => {
    const qs = new URLSearchParams({limit: 500});
    if (st.state) qs.set("state", st.state);
    if (st.severity) qs.set("severity", st.severity);
    if (st.device) qs.set("device_id", st.device);
    const rows = await get(`/alerts?${qs}`);
    document.querySelector("#alerts tbody").innerHTML = rows.map((a) => `<tr data-id="${a.id}"><td>${a.id}</td>
      <td class="sev-${a.severity}">${esc(a.severity)}</td><td>${esc(a.rule)}</td>
      <td><a href="#/device/${encodeURIComponent(a.device_id)}">${esc(a.device_id)}</a></td><td class="state">${esc(a.state)}</td>
      <td title="${new Date(a.opened_ms).toISOString()}">${ago(a.opened_ms)}</td><td>${fmt(a.value)}</td>
      <td>${a.state === "open" ? `<button data-act="ack">acknowledge</button>` : ""} ${a.state !== "cleared" ? `<button data-act="clear">clear</button>` : ""}</td></tr>`).join("")
      || `<tr><td colspan="8" class="mut">no alerts</td></tr>`;
  };
  const change = (k) => (e) => { st[k] = e.target.value; load(); };
  document.getElementById("state").onchange = change("state");
  document.getElementById("severity").onchange = change("severity");
  document.getElementById("device").onchange = change("device");
  document.getElementById("alerts").onclick = async (e) => {
    const act = e.target.dataset?.act; if (!act) return;
    const id = e.target.closest("tr").dataset.id;
    try {
      await api(`/alerts/${id}/${act}`, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify({note: "from the console"})});
      document.getElementById("msg").textContent = `alert ${id}: ${act === "ack" ? "acknowledged" : "cleared"}`;
    } catch (err) { document.getElementById("msg").innerHTML = `<span class="error">${esc(err.message)}</span>`; }
    load();
  };
  await load();
  stream("alerts", {alerts: () => load()});
}

// ---- Dead letters --------------------------------------------------------------------------------
async function dlq(params) {
  const reason = params.get("reason") || "";
  const stats = await get("/stats");
  const reasons = Object.keys(stats.dead_lettered).filter((k) => k !== "total");
  main.innerHTML = `<h2>Dead letters</h2><div class="cards">${card("total", stats.dead_lettered.total)}${reasons.map((r) => card(r, stats.dead_lettered[r], "warn")).join("")}</div>
    <div class="bar">reason <select id="reason"><option value="">any</option>${reasons.map((r) => `<option ${r === reason ? "selected" : ""}>${esc(r)}</option>`).join("")}</select></div>
    <div class="cols"><table id="dlq"><thead><tr><th>id</th><th>reason</th><th>device</th><th>received</th><th>detail</th></tr></thead><tbody></tbody></table>
    <div><h3>Payload</h3><pre id="payload" class="mut">select a row</pre></div></div>`;
  document.getElementById("reason").onchange = (e) => { location.hash = `#/dlq?reason=${encodeURIComponent(e.target.value)}`; };
  const rows = await get(`/dlq?limit=200${reason ? `&reason=${encodeURIComponent(reason)}` : ""}`);
  document.querySelector("#dlq tbody").innerHTML = rows.map((r, i) => `<tr data-i="${i}" style="cursor:pointer"><td>${r.id}</td><td>${esc(r.reason)}</td>
    <td>${esc(r.device_id ?? "–")}</td><td>${esc(r.received_at)}</td><td class="wrap">${esc(r.detail)}</td></tr>`).join("")
    || `<tr><td colspan="5" class="mut">no dead letters</td></tr>`;
  document.getElementById("dlq").onclick = (e) => {
    const tr = e.target.closest("tr[data-i]"); if (!tr) return;
    const r = rows[+tr.dataset.i];
    let text = r.payload;
    if (r.payload_encoding === "utf-8") { try { text = JSON.stringify(JSON.parse(r.payload), null, 2); } catch { /* not JSON */ } }
    const pre = document.getElementById("payload");
    pre.className = ""; pre.textContent = `topic: ${r.topic}\nencoding: ${r.payload_encoding}${r.truncated ? " (truncated)" : ""}\n\n${text}`;
  };
}

// ---- Pipeline ------------------------------------------------------------------------------------
async function pipeline() {
  main.innerHTML = `<h2>Pipeline</h2><div class="cards" id="rates"></div><div class="cards" id="health"></div>
    <div class="chart" id="rate-chart"></div><div class="cols"><div><h3>Lag (messages)</h3><dl class="kv" id="lag"></dl>
    <h3>Sinks</h3><dl class="kv" id="sinks"></dl></div><div><h3>Counters</h3><dl class="kv" id="counters"></dl></div></div>`;
  const el = document.getElementById("rate-chart");
  const data = [[], [], [], []];
  const plot = new uPlot({width: Math.max(400, el.clientWidth - 20), height: 220, scales: {x: {time: true}},
    series: [{}, {label: "received/s", stroke: "#2456c7"}, {label: "stored/s", stroke: "#1a8a4a"}, {label: "dead letters/s", stroke: "#c42b2b"}]}, data, el);
  window.__fmChart = plot;
  const kv = (o) => Object.entries(o || {}).map(([k, v]) => `<dt>${esc(k)}</dt><dd>${esc(typeof v === "object" && v !== null ? JSON.stringify(v) : v)}</dd>`).join("") || "<dt>none</dt><dd></dd>";
  let prev = null;
  const health = async () => {
    const [h, f] = await Promise.all([api("/health").catch((e) => ({body: {status: e.message}})), get("/fleet/summary?online_s=60")]);
    const comps = Object.entries(h.body).filter(([k]) => k !== "version");
    document.getElementById("health").innerHTML = comps.map(([k, v]) => card(k, typeof v === "string" ? v : JSON.stringify(v), v === "ok" ? "ok" : "bad")).join("")
      + card("freshness (newest reading)", f.freshest_ms === null ? "never" : `${Math.round((Date.now() - f.freshest_ms) / 1000)} s ago`);
  };
  const onStats = (s) => {
    const now = Date.now() / 1000;
    if (prev) {
      const dt = now - prev.t;
      const r = (k) => Math.max(0, (k(s) - k(prev.s)) / dt);
      const rec = r((x) => x.received), sto = r((x) => x.stored), dlr = r((x) => x.dead_lettered.total);
      data[0].push(now); data[1].push(rec); data[2].push(sto); data[3].push(dlr);
      if (data[0].length > 300) data.forEach((c) => c.shift());
      plot.setData(data);
      const lagTotal = Object.values(s.lag || {}).reduce((a, b) => a + b, 0);
      document.getElementById("rates").innerHTML = card("received/s", Math.round(rec)) + card("stored/s", Math.round(sto))
        + card("dead letters/s", Math.round(dlr), dlr ? "warn" : "") + card("lag (messages)", lagTotal, lagTotal > 1000 ? "bad" : "");
    }
    prev = {s, t: now};
    document.getElementById("lag").innerHTML = kv({...s.lag, ...Object.fromEntries(Object.entries(s.lag_partitions || {}).map(([k, v]) => [`${k} by partition`, v]))});
    document.getElementById("sinks").innerHTML = kv({features: s.features, alerts: s.alerts, jobs_controller: s.jobs_controller});
    document.getElementById("counters").innerHTML = kv({received: s.received, stored: s.stored, duplicates: s.duplicates, late: s.late,
      unrouted: s.unrouted, gaps: s.gaps, dead_lettered: s.dead_lettered, door_refused: s.door_refused, auth_failures: s.auth_failures});
  };
  onStats(await get("/stats"));
  await health();
  every(5000, health);
  stream("stats", {stats: onStats});
}

// ---- routing -------------------------------------------------------------------------------------
async function route() {
  pageAbort?.abort(); timers.forEach(clearInterval); timers = [];
  pageAbort = new AbortController();
  document.getElementById("live").classList.remove("on");
  const [path, query] = (location.hash.slice(1) || "/fleet").split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean);
  for (const a of document.querySelectorAll("nav a[data-page]")) a.classList.toggle("on", a.dataset.page === (parts[0] === "device" ? "fleet" : parts[0]));
  document.body.dataset.page = parts[0] || "fleet";
  document.body.dataset.ready = "";
  try {
    if (parts[0] === "device" && parts[1]) await device(decodeURIComponent(parts[1]), params);
    else if (parts[0] === "alerts") await alerts(params);
    else if (parts[0] === "dlq") await dlq(params);
    else if (parts[0] === "pipeline") await pipeline(params);
    else await fleet(params);
    if (window.__fmReadyMs === undefined) {   // first useful paint after the page load (the benchmark reads it)
      await new Promise((ok) => requestAnimationFrame(() => setTimeout(ok)));   // the frame with the data is painted
      window.__fmReadyMs = performance.now();
    }
    document.body.dataset.ready = parts[0] || "fleet";   // the page drew its data (tests wait for this)
  } catch (e) {
    if (e.name !== "AbortError") main.innerHTML = `<p class="error">${esc(e.message)}</p>`;
  }
}

async function whoami() {
  const {body} = await api("/whoami");
  document.getElementById("who").textContent = body.local_only ? "local-only mode" : `${body.subject} (${body.role})`;
}

window.addEventListener("hashchange", route);
whoami().catch(() => {});   // the header's note; does not hold up the page
route();
