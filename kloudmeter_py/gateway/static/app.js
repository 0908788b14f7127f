// kloudmeter dashboard: meters, live readings (server-sent events), windows chart, counts.
"use strict";

const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563"];
const state = { readings: new Map() };
const $ = (id) => document.getElementById(id);

function headers() {
  const token = sessionStorage.getItem("kloudmeter-token");
  return token ? { Authorization: "Bearer " + token } : {};
}

async function api(path) {
  const resp = await fetch(path, { headers: headers() });
  if (!resp.ok) throw new Error(path + ": " + resp.status);
  return resp.json();
}

function text(value) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toFixed(3);
  return String(value);
}

function cell(row, value, numeric) {
  const td = row.insertCell();
  td.textContent = text(value);
  if (numeric) td.className = "num";
  return td;
}

async function loadMeters() {
  const meters = await api("/api/meters");
  $("meter-count").textContent = meters.length;
  const body = $("meters").tBodies[0];
  body.replaceChildren();
  const select = $("chart-meter");
  const chosen = select.value;
  select.replaceChildren();
  for (const m of meters) {
    const row = body.insertRow();
    row.dataset.meter = m.id;
    cell(row, m.id);
    cell(row, m.eventType);
    cell(row, m.aggregation);
    cell(row, m.valueProperty);
    cell(row, Object.keys(m.groupBy || {}).join(", "));
    select.add(new Option(m.id, m.id));
  }
  if (chosen) select.value = chosen;
}

function renderReadings() {
  const body = $("readings").tBodies[0];
  const rows = [...state.readings.values()].sort((a, b) => a.key.localeCompare(b.key));
  body.replaceChildren();
  for (const r of rows) {
    const row = body.insertRow();
    row.dataset.key = r.key;
    if (r.flash) { row.className = "flash"; r.flash = false; }
    cell(row, r.meterId);
    cell(row, r.subject);
    cell(row, Object.entries(r.groupBy || {}).map(([k, v]) => k + "=" + v).join(" "));
    cell(row, r.value, true).className = "num value";
    cell(row, r.count, true);
    cell(row, r.updatedAt ? r.updatedAt.slice(11, 19) : "");
  }
  $("reading-count").textContent = rows.length;
}

async function loadReadings() {
  for (const r of await api("/api/readings")) state.readings.set(r.key, r);
  renderReadings();
}

async function loadCounts() {
  try {
    const dead = await api("/api/dead-letters");
    $("dead-count").textContent = dead.total;
  } catch (e) { $("dead-count").textContent = "–"; }
  try {
    const resources = await api("/v1/resources");
    const totals = {};
    for (const r of resources) {
      if (r.currency) totals[r.currency] = (totals[r.currency] || 0) + Number(r.consumption);
    }
    const parts = Object.entries(totals).map(([c, v]) => v.toFixed(2) + " " + c);
    $("costs").textContent = parts.length ? parts.join(", ") : "–";
  } catch (e) { $("costs").textContent = "–"; }
}

async function drawChart() {
  const meter = $("chart-meter").value;
  const svg = $("chart");
  svg.replaceChildren();
  $("legend").replaceChildren();
  if (!meter) return;
  const size = $("chart-size").value;
  const span = { MINUTE: 3600e3, HOUR: 86400e3, DAY: 30 * 86400e3 }[size];
  const step = { MINUTE: 60e3, HOUR: 3600e3, DAY: 86400e3 }[size];
  const end = Math.ceil(Date.now() / step) * step;
  const from = new Date(end - span).toISOString();
  const to = new Date(end).toISOString();
  const subjects = await api("/api/v1/meters/" + encodeURIComponent(meter) + "/subjects");
  if (!subjects.length) return;
  const query = new URLSearchParams({ from, to, windowSize: size });
  for (const s of subjects.slice(0, COLORS.length)) query.append("subject", s);
  const result = await api("/api/meters/" + encodeURIComponent(meter) + "/query?" + query);
  const series = new Map();
  for (const row of result.data) {
    if (!series.has(row.subject)) series.set(row.subject, []);
    series.get(row.subject).push(row);
  }
  const max = Math.max(1, ...result.data.map((r) => r.value || 0));
  const x = (t) => 40 + ((Date.parse(t) - (end - span)) / span) * 740;
  const y = (v) => 240 - (v / max) * 220;
  const ns = "http://www.w3.org/2000/svg";
  const axis = document.createElementNS(ns, "text");
  axis.setAttribute("x", 4);
  axis.setAttribute("y", 20);
  axis.textContent = text(max);
  svg.append(axis);
  let i = 0;
  for (const [subject, rows] of series) {
    const color = COLORS[i++ % COLORS.length];
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", color);
    line.setAttribute("stroke-width", "2");
    line.setAttribute("points", rows.map((r) => x(r.windowStart) + "," + y(r.value || 0)).join(" "));
    svg.append(line);
    for (const r of rows) {
      const dot = document.createElementNS(ns, "circle");
      dot.setAttribute("cx", x(r.windowStart));
      dot.setAttribute("cy", y(r.value || 0));
      dot.setAttribute("r", 3);
      dot.setAttribute("fill", color);
      svg.append(dot);
    }
    const label = document.createElement("span");
    label.style.color = color;
    label.textContent = "● " + subject;
    $("legend").append(label);
  }
}

async function follow() {
  // fetch() rather than EventSource, so an Authorization header can go along.
  for (;;) {
    try {
      const resp = await fetch("/api/stream/readings", { headers: headers() });
      if (!resp.ok) throw new Error("stream " + resp.status);
      $("status").textContent = "live";
      $("status").className = "status live";
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const chunk = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          const data = chunk.split("\n").filter((l) => l.startsWith("data: "));
          if (!data.length) continue;
          const reading = JSON.parse(data.map((l) => l.slice(6)).join("\n"));
          reading.flash = true;
          state.readings.set(reading.key, reading);
          renderReadings();
        }
      }
    } catch (e) {
      $("status").textContent = "reconnecting…";
      $("status").className = "status";
    }
    await new Promise((r) => setTimeout(r, 1000));
  }
}

async function refresh() {
  try {
    await loadMeters();
    await loadCounts();
    await drawChart();
  } catch (e) {
    $("status").textContent = String(e.message || e);
  }
}

$("token").value = sessionStorage.getItem("kloudmeter-token") || "";
$("token").addEventListener("change", () => {
  sessionStorage.setItem("kloudmeter-token", $("token").value);
  loadReadings().then(refresh);
});
$("chart-meter").addEventListener("change", drawChart);
$("chart-size").addEventListener("change", drawChart);
loadReadings().catch(() => {}).then(refresh);
follow();
setInterval(refresh, 5000);
