// kloudmeter dashboard: meters, live readings (server-sent events), windows chart, counts.
"use strict";

const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563"];
const state = {
  readings: new Map(),
  customers: new Map(),
  chartSeq: 0,
  entitlementSeq: 0,
  alertSeq: 0,
};
const $ = (id) => document.getElementById(id);

function headers() {
  const token = sessionStorage.getItem("kloudmeter-token");
  return token ? { Authorization: "Bearer " + token } : {};
}

async function api(path) {
  const resp = await fetch(path, { headers: headers() });
  if (!resp.ok) {
    const error = new Error(path + ": " + resp.status);
    error.status = resp.status;
    throw error;
  }
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

// --- the usage chart: a meter's windows over an hour, a day or a month, per subject ---------

const NS = "http://www.w3.org/2000/svg";
// Each range: how far back from now, the windows it is split into, and where the time axis
// has a labelled tick.
const RANGES = {
  hour: { span: 3600e3, step: 60e3, windowSize: "MINUTE", tick: 10 * 60e3 },
  day: { span: 86400e3, step: 3600e3, windowSize: "HOUR", tick: 3 * 3600e3 },
  month: { span: 30 * 86400e3, step: 86400e3, windowSize: "DAY", tick: 5 * 86400e3 },
};
// The plot area inside the SVG's 800 x 300 view box (room left for the value labels and
// below for the time labels).
const PLOT = { left: 70, right: 785, top: 14, bottom: 250 };
const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

function svg(name, attrs, content) {
  const node = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (content !== undefined) node.textContent = content;
  return node;
}

function num(v) {
  const rounded = Number(v.toPrecision(10));
  return rounded.toLocaleString("en-US", { maximumFractionDigits: 6 });
}

// Value-axis ticks: 0 and about five round steps (1, 2 or 5 times a power of ten) covering
// every value drawn.
function valueTicks(values) {
  const lo = Math.min(0, ...values);
  let hi = Math.max(0, ...values);
  if (hi === lo) hi = lo + 1;
  const raw = (hi - lo) / 5;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const first = Math.floor(lo / step);
  const last = Math.ceil(hi / step);
  const ticks = [];
  for (let i = first; i <= last; i++) ticks.push(Number((i * step).toPrecision(12)));
  return ticks;
}

function two(n) {
  return String(n).padStart(2, "0");
}

// A time-axis label in UTC: the clock for hour and day ranges (the date at midnight), the
// date for the month range.
function timeLabel(ms, range) {
  const d = new Date(ms);
  const date = MONTHS[d.getUTCMonth()] + " " + d.getUTCDate();
  const clock = two(d.getUTCHours()) + ":" + two(d.getUTCMinutes());
  if (range === "month") return date;
  if (range === "day" && d.getUTCHours() === 0) return date;
  return clock;
}

function rangeWindow(range) {
  const r = RANGES[range];
  const end = Math.ceil(Date.now() / r.step) * r.step;
  return { ...r, start: end - r.span, end };
}

// The picked subject ("s:<key>"), customer ("c:<id>"), or every subject ("").
function picked() {
  const value = $("chart-subject").value;
  if (value.startsWith("s:")) return { subject: value.slice(2), key: value.slice(2) };
  if (value.startsWith("c:")) {
    const customer = state.customers.get(value.slice(2));
    if (customer) return { customer, key: customer.key || customer.id };
  }
  return {};
}

async function loadSubjects() {
  const meter = $("chart-meter").value;
  const select = $("chart-subject");
  const chosen = select.value;
  const options = [new Option("all subjects", "")];
  if (meter) {
    for (const s of await api("/api/v1/meters/" + encodeURIComponent(meter) + "/subjects")) {
      options.push(new Option(s, "s:" + s));
    }
  }
  state.customers = new Map();
  try {
    const page = await api("/api/v1/customers?pageSize=100");
    for (const c of page.items || []) {
      state.customers.set(c.id, c);
      options.push(new Option("customer " + (c.name || c.key), "c:" + c.id));
    }
  } catch (e) {
    // A user's token may not list customers (admin only): its own subjects are listed above.
  }
  select.replaceChildren(...options);
  if (options.some((o) => o.value === chosen)) select.value = chosen;
}

function chartQuery(meter, range, who) {
  const w = rangeWindow(range);
  const query = new URLSearchParams({
    from: new Date(w.start).toISOString(),
    to: new Date(w.end).toISOString(),
    windowSize: w.windowSize,
  });
  if (who.subject) query.append("subject", who.subject);
  else if (who.customer) query.append("filterCustomerId", who.customer.id);
  else query.append("groupBy", "subject");
  return { w, path: "/api/v1/meters/" + encodeURIComponent(meter) + "/query?" + query };
}

function seriesName(row, who) {
  if (who.customer) return "customer " + who.key;
  return row.subject || who.subject || "all";
}

async function drawChart() {
  const seq = ++state.chartSeq;
  const meter = $("chart-meter").value;
  const range = $("chart-range").value;
  const who = picked();
  const chart = $("chart");
  if (!meter) {
    chart.replaceChildren(svg("text", { x: 400, y: 150, "text-anchor": "middle" }, "no meters yet"));
    $("legend").replaceChildren();
    return;
  }
  const { w, path } = chartQuery(meter, range, who);
  const [result, about] = await Promise.all([
    api(path),
    api("/api/v1/meters/" + encodeURIComponent(meter)),
  ]);
  if (seq !== state.chartSeq) return; // a newer draw started meanwhile
  const rows = result.data.filter((r) => r.value !== null && r.value !== undefined);
  const series = new Map();
  for (const row of rows) {
    const name = seriesName(row, who);
    if (!series.has(name)) series.set(name, []);
    series.get(name).push(row);
  }
  const ticks = valueTicks(rows.map((r) => r.value));
  const bottom = ticks[0];
  const top = ticks[ticks.length - 1];
  const x = (ms) => PLOT.left + ((ms - w.start) / w.span) * (PLOT.right - PLOT.left);
  const y = (v) => PLOT.bottom - ((v - bottom) / (top - bottom)) * (PLOT.bottom - PLOT.top);
  const nodes = [];

  // The value axis: a line, a labelled tick and a grid line at each step, and its title.
  nodes.push(svg("line", { class: "axis", x1: PLOT.left, x2: PLOT.left, y1: PLOT.top, y2: PLOT.bottom }));
  for (const t of ticks) {
    const g = svg("g", { class: "value-tick", "data-value": t });
    g.append(svg("line", { class: "grid", x1: PLOT.left, x2: PLOT.right, y1: y(t), y2: y(t) }));
    g.append(svg("line", { class: "axis", x1: PLOT.left - 5, x2: PLOT.left, y1: y(t), y2: y(t) }));
    g.append(svg("text", { x: PLOT.left - 8, y: y(t) + 4, "text-anchor": "end" }, num(t)));
    nodes.push(g);
  }
  const what = about.valueProperty
    ? about.aggregation.toLowerCase() + " of " + about.valueProperty
    : about.aggregation.toLowerCase();
  nodes.push(
    svg("text", { class: "axis-title", x: 14, y: (PLOT.top + PLOT.bottom) / 2,
      transform: `rotate(-90 14 ${(PLOT.top + PLOT.bottom) / 2})`, "text-anchor": "middle" }, what),
  );

  // The time axis: a labelled tick every 10 minutes, 3 hours or 5 days (UTC), and its title.
  nodes.push(svg("line", { class: "axis", x1: PLOT.left, x2: PLOT.right, y1: PLOT.bottom, y2: PLOT.bottom }));
  for (let t = Math.ceil(w.start / w.tick) * w.tick; t <= w.end; t += w.tick) {
    const g = svg("g", { class: "time-tick", "data-time": new Date(t).toISOString() });
    g.append(svg("line", { class: "axis", x1: x(t), x2: x(t), y1: PLOT.bottom, y2: PLOT.bottom + 5 }));
    g.append(svg("text", { x: x(t), y: PLOT.bottom + 19, "text-anchor": "middle" }, timeLabel(t, range)));
    nodes.push(g);
  }
  const size = { hour: "minute", day: "hour", month: "day" }[range];
  nodes.push(svg("text", { class: "axis-title", x: (PLOT.left + PLOT.right) / 2, y: 292,
    "text-anchor": "middle" }, `time (UTC), one bar a ${size}`));

  // The series: a bar a window, side by side when several series share a window (a window
  // with no bar had no usage), each with a tooltip.
  const legend = [];
  const slot = (x(w.start + w.step) - x(w.start)) / Math.max(1, series.size);
  const zero = y(Math.max(bottom, Math.min(0, top)));
  let i = 0;
  for (const [name, bars] of series) {
    const color = COLORS[i % COLORS.length];
    const offset = i++ * slot;
    for (const r of bars) {
      const edge = y(r.value);
      const bar = svg("rect", { class: "bar", x: x(Date.parse(r.windowStart)) + offset + slot * 0.1,
        width: slot * 0.8, y: Math.min(edge, zero), height: Math.abs(zero - edge), fill: color,
        "data-series": name, "data-window-start": r.windowStart, "data-window-end": r.windowEnd,
        "data-value": r.value });
      bar.append(svg("title", {}, `${name}, ${r.windowStart} to ${r.windowEnd}: ${num(r.value)}`));
      nodes.push(bar);
    }
    const item = document.createElement("span");
    item.dataset.series = name;
    const swatch = document.createElement("i");
    swatch.style.background = color;
    item.append(swatch, name);
    legend.push(item);
  }
  if (!rows.length) {
    nodes.push(svg("text", { x: (PLOT.left + PLOT.right) / 2, y: (PLOT.top + PLOT.bottom) / 2,
      "text-anchor": "middle", class: "empty" }, "no usage in this range"));
  }
  chart.replaceChildren(...nodes);
  chart.dataset.query = path;
  chart.dataset.range = range;
  chart.dataset.subject = $("chart-subject").value;
  $("legend").replaceChildren(...legend);
}

// --- usage against the entitlements, and recent alerts, of the picked subject or customer ---

function note(message) {
  const p = document.createElement("p");
  p.className = "note";
  p.textContent = message;
  return p;
}

async function optional(path, empty) {
  // A list that is missing (404: an unknown subject, or an API not served) or not for this
  // token (403) shows as empty.
  try {
    return await api(path);
  } catch (e) {
    if (e.status === 404 || e.status === 403) return empty;
    throw e;
  }
}

async function drawEntitlements() {
  const seq = ++state.entitlementSeq;
  const who = picked();
  const box = $("entitlements");
  if (!who.key) {
    box.replaceChildren(note("Pick a subject or a customer to see its entitlements."));
    box.dataset.subject = "";
    return;
  }
  // A customer's entitlements (their usage counts every subject it owns) on the customer
  // paths, a subject's on the subject paths.
  const base = who.customer
    ? "/api/v2/customers/" + encodeURIComponent(who.customer.id) + "/entitlements"
    : "/api/v1/subjects/" + encodeURIComponent(who.key) + "/entitlements";
  const listed = await optional(base + (who.customer ? "?pageSize=100" : ""), []);
  const found = Array.isArray(listed) ? listed : listed.items || [];
  const values = await Promise.all(
    found.map((e) =>
      e.type === "metered" ? api(base + "/" + encodeURIComponent(e.id) + "/value") : null,
    ),
  );
  if (seq !== state.entitlementSeq) return;
  const items = [];
  found.forEach((e, n) => {
    const item = document.createElement("div");
    item.className = "entitlement";
    item.dataset.feature = e.featureKey;
    item.dataset.type = e.type;
    const title = document.createElement("div");
    title.className = "feature";
    title.textContent = e.featureKey;
    item.append(title);
    const v = values[n];
    if (v) {
      const limit = v.totalAvailableGrantAmount || 0;
      Object.assign(item.dataset, {
        usage: v.usage, limit, balance: v.balance, overage: v.overage || 0,
      });
      const bar = document.createElement("div");
      bar.className = "bar" + (v.overage > 0 ? " over" : "");
      // The bar spans the limit, or the usage when it went past it; a mark shows the limit.
      const scale = Math.max(limit, v.usage);
      const fill = document.createElement("div");
      fill.className = "fill";
      fill.style.width = (scale > 0 ? v.usage / scale : 0) * 100 + "%";
      const mark = document.createElement("div");
      mark.className = "limit";
      mark.style.left = (scale > 0 ? limit / scale : 1) * 100 + "%";
      mark.title = "limit " + num(limit);
      bar.append(fill, mark);
      const figures = document.createElement("div");
      figures.className = "figures";
      let words = `${num(v.usage)} used of ${num(limit)}, balance ${num(v.balance)}`;
      if (v.overage > 0) words += `, over by ${num(v.overage)}`;
      if (!v.hasAccess) words += ", no access";
      if (e.currentUsagePeriod) {
        words += ` (this ${(e.usagePeriod?.interval || "period").toLowerCase()}: from `;
        words += e.currentUsagePeriod.from.slice(0, 10) + ")";
      }
      figures.textContent = words;
      item.append(bar, figures);
    } else {
      const figures = document.createElement("div");
      figures.className = "figures";
      figures.textContent = e.type === "static" ? "config " + e.config : "access granted";
      item.append(figures);
    }
    items.push(item);
  });
  if (!items.length) items.push(note("No entitlements for " + who.key + "."));
  box.replaceChildren(...items);
  box.dataset.subject = who.key;
}

async function drawAlerts() {
  const seq = ++state.alertSeq;
  const who = picked();
  const query = new URLSearchParams({ pageSize: "10", order: "DESC", orderBy: "createdAt" });
  if (who.key) query.append("subject", who.key);
  const page = await optional("/api/v1/notification/events?" + query, { items: [] });
  if (seq !== state.alertSeq) return;
  const events = Array.isArray(page) ? page : page.items || [];
  const list = document.createElement("ul");
  for (const ev of events.slice(0, 10)) {
    const data = (ev.payload && ev.payload.data) || {};
    const li = document.createElement("li");
    li.dataset.eventId = ev.id;
    const parts = [(ev.createdAt || "").slice(0, 19).replace("T", " ")];
    parts.push(data.subject?.key || "");
    parts.push(data.feature?.key || "");
    if (data.threshold) {
      const unit = data.threshold.type === "PERCENT" ? "%" : "";
      parts.push("crossed " + num(data.threshold.value) + unit);
    } else {
      parts.push(ev.type === "entitlements.reset" ? "usage reset" : ev.type || "");
    }
    if (data.value && typeof data.value.usage === "number") parts.push("usage " + num(data.value.usage));
    const delivery = (ev.deliveryStatus || []).map((d) => d.state).join(", ");
    if (delivery) parts.push("(" + delivery + ")");
    li.textContent = parts.filter(Boolean).join(" · ");
    list.append(li);
  }
  const box = $("alerts");
  box.replaceChildren(events.length ? list : note("No recent alerts."));
  box.dataset.subject = who.key || "";
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

async function drawPicked() {
  await Promise.all([drawChart(), drawEntitlements(), drawAlerts()]);
}

async function refresh() {
  try {
    await loadMeters();
    await loadCounts();
    await loadSubjects();
    await drawPicked();
  } catch (e) {
    $("status").textContent = String(e.message || e);
  }
}

$("token").value = sessionStorage.getItem("kloudmeter-token") || "";
$("token").addEventListener("change", () => {
  sessionStorage.setItem("kloudmeter-token", $("token").value);
  loadReadings().then(refresh);
});
const redraw = (load) => () => load().then(drawPicked).catch((e) => {
  $("status").textContent = String(e.message || e);
});
$("chart-meter").addEventListener("change", redraw(loadSubjects));
$("chart-subject").addEventListener("change", redraw(async () => {}));
$("chart-range").addEventListener("change", redraw(async () => {}));
loadReadings().catch(() => {}).then(refresh);
follow();
setInterval(refresh, 5000);
