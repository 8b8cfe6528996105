// One client's card on the clients panel: identity, traffic, tunnels, chart, machine, connections.

import { drawRateChart } from "../chart.js";
import { el, makeMeter, setAttr, setMeter, setText, syncRows, toggle } from "../dom.js";
import {
  DASH,
  fmtAgo,
  fmtBytes,
  fmtCount,
  fmtDuration,
  fmtPercent,
  fmtRate,
  fmtWhen,
  list,
  num,
  obj,
  relayNow,
  str,
} from "../format.js";

const MAX_CONNECTION_ROWS = 10;

/** Redraw the card's rate chart from the series its last detail load brought. */
export function drawCardChart(card) {
  drawRateChart(card.canvas, card.series, card.chartPeak, card.detailAt !== null);
}

function kv(parent, label, testid) {
  const wrap = el("div", "kv");
  wrap.appendChild(el("dt", null, label));
  const dd = el("dd");
  if (testid) dd.setAttribute("data-testid", testid);
  wrap.appendChild(dd);
  parent.appendChild(wrap);
  return dd;
}

function figure(parent, label, testid, dotClass) {
  const wrap = el("div", "fig");
  const head = el("div", "fig-label");
  if (dotClass) head.appendChild(el("span", "dot " + dotClass));
  head.appendChild(document.createTextNode(label));
  wrap.appendChild(head);
  const value = el("div", "fig-value");
  if (testid) value.setAttribute("data-testid", testid);
  wrap.appendChild(value);
  parent.appendChild(wrap);
  return value;
}

function blockHead(parent, title) {
  const head = el("div", "block-head");
  head.appendChild(el("h4", null, title));
  parent.appendChild(head);
  return head;
}

/** A new card for client ``name``; ``onDisconnect(name, button)`` runs on its button. */
export function createCard(name, onDisconnect) {
  const card = {
    name: name,
    tunnelRows: new Map(),
    gpuRows: new Map(),
    series: [],
    detailDue: 0,
    detailBusy: false,
    detailAt: null,
    online: null,
  };
  const root = el("article", "card");
  root.setAttribute("data-testid", "client-card");
  root.setAttribute("data-client", name);
  card.node = root;

  // head: name, status, since, admin button
  const head = el("header", "card-head");
  const title = el("div", "card-title");
  title.appendChild(el("h3", "client-name", name));
  card.status = el("span", "badge");
  card.status.setAttribute("data-testid", "client-status");
  title.appendChild(card.status);
  // two machines sharing this identity keep replacing each other (relay throttles them)
  card.flapping = el("span", "badge", "shared identity");
  card.flapping.setAttribute("data-testid", "client-flapping");
  card.flapping.setAttribute("data-state", "flapping");
  card.flapping.hidden = true;
  title.appendChild(card.flapping);
  card.since = el("span", "since muted");
  title.appendChild(card.since);
  head.appendChild(title);
  card.disconnect = el("button", "btn btn-danger", "disconnect");
  card.disconnect.type = "button";
  card.disconnect.addEventListener("click", () => onDisconnect(name, card.disconnect));
  head.appendChild(card.disconnect);
  root.appendChild(head);

  // identity
  const meta = el("dl", "meta");
  card.hostname = kv(meta, "host", "client-hostname");
  card.os = kv(meta, "OS");
  card.address = kv(meta, "from");
  card.version = kv(meta, "client");
  card.rtt = kv(meta, "RTT");
  root.appendChild(meta);

  // traffic figures
  const figs = el("div", "figs");
  card.rateIn = figure(figs, "in now", "client-rate-in", "dot-in");
  card.rateOut = figure(figs, "out now", "client-rate-out", "dot-out");
  card.trafficIn = figure(figs, "in total", "client-traffic-in");
  card.trafficOut = figure(figs, "out total", "client-traffic-out");
  root.appendChild(figs);

  // tunnels
  const tunnels = el("section", "block block-wide");
  blockHead(tunnels, "Tunnels");
  const tunnelTable = headedTable("tunnels", [
    ["public port", null],
    ["local target", null],
    ["", null],
    ["conns", "num"],
    ["in: total, now", "num"],
    ["out: total, now", "num"],
  ]);
  card.tunnelBody = tunnelTable.body;
  tunnels.appendChild(tunnelTable.wrap);
  card.tunnelTable = tunnelTable.wrap;
  card.tunnelsEmpty = el("p", "empty-small muted", "no tunnels");
  tunnels.appendChild(card.tunnelsEmpty);
  root.appendChild(tunnels);

  const body = el("div", "card-body");
  const left = el("div", "card-col");
  const right = el("div", "card-col");
  body.appendChild(left);
  body.appendChild(right);
  root.appendChild(body);

  // rate chart
  const chart = el("section", "block");
  const chartHead = blockHead(chart, "Rate, last hour");
  card.chartPeak = el("span", "muted small");
  card.chartPeak.setAttribute("data-testid", "chart-peak");
  chartHead.appendChild(card.chartPeak);
  const chartBox = el("div", "chart");
  card.canvas = el("canvas", "chart-canvas");
  card.canvas.setAttribute("role", "img");
  card.canvas.setAttribute("aria-label", "traffic rate of " + name + " over the last hour");
  chartBox.appendChild(card.canvas);
  chart.appendChild(chartBox);
  left.appendChild(chart);
  if (typeof ResizeObserver === "function") {
    new ResizeObserver(() => drawCardChart(card)).observe(card.canvas);
  }

  // machine
  const machine = el("section", "block");
  const machineHead = blockHead(machine, "Machine");
  card.telemetryAge = el("span", "muted small");
  machineHead.appendChild(card.telemetryAge);
  card.noTelemetry = el("p", "empty-small muted", "no telemetry reported");
  machine.appendChild(card.noTelemetry);
  card.resources = el("div", "resources");
  card.cpu = resourceRow(card.resources, "CPU");
  card.mem = resourceRow(card.resources, "memory");
  machine.appendChild(card.resources);
  card.gpuList = el("div", "gpus");
  machine.appendChild(card.gpuList);
  card.noGpu = el("p", "empty-small muted", "no GPU");
  machine.appendChild(card.noGpu);
  right.appendChild(machine);

  // open connections
  const conns = el("section", "block block-wide");
  const connHead = blockHead(conns, "Open connections");
  card.connCount = el("span", "muted small");
  connHead.appendChild(card.connCount);
  const connTable = headedTable("conns", [
    ["visitor", null],
    ["port", "num"],
    ["open for", "num"],
    ["in", "num"],
    ["out", "num"],
  ]);
  card.connBody = connTable.body;
  conns.appendChild(connTable.wrap);
  card.connTable = connTable.table;
  card.connEmpty = el("p", "empty-small muted", "nobody connected");
  conns.appendChild(card.connEmpty);
  root.appendChild(conns);

  return card;
}

// A table in its scrolling wrapper, with one head row of [label, class] columns and an
// empty body for the rows.
function headedTable(tableClass, columns) {
  const wrap = el("div", "table-wrap");
  const table = el("table", tableClass);
  const thead = el("thead");
  const row = el("tr");
  for (const [label, cls] of columns) {
    row.appendChild(el("th", cls, label));
  }
  thead.appendChild(row);
  table.appendChild(thead);
  const body = el("tbody");
  table.appendChild(body);
  wrap.appendChild(table);
  return { wrap, table, body };
}

function resourceRow(parent, label) {
  const row = el("div", "res");
  row.appendChild(el("span", "res-label", label));
  const meter = makeMeter(0.8, 0.95);
  meter.setAttribute("aria-label", label);
  row.appendChild(meter);
  const value = el("span", "res-value");
  row.appendChild(value);
  parent.appendChild(row);
  return { row: row, meter: meter, value: value };
}

export function updateCard(card, c) {
  const online = c.online === true;
  const wasOnline = card.online;
  card.online = online;
  if (wasOnline !== null && wasOnline !== online) card.detailDue = 0; // refresh details now
  toggle(card.node, "offline", !online);
  setAttr(card.node, "data-status", online ? "online" : "offline");

  setText(card.status, online ? "online" : "offline");
  setAttr(card.status, "data-state", online ? "online" : "offline");
  const replaced = num(c.replacements_last_minute);
  card.flapping.hidden = c.flapping !== true;
  setAttr(card.flapping, "title", c.flapping === true
    ? "replaced " + replaced + " times in the last minute: two machines use this identity; " +
      "the relay throttles their logins"
    : null);
  let since;
  let sinceTs;
  if (online) {
    sinceTs = num(c.connected_since);
    since = sinceTs !== null ? "since " + fmtAgo(sinceTs).replace(/ ago$/, "") : "";
  } else {
    sinceTs = num(c.last_seen) !== null ? num(c.last_seen) : num(c.offline_since);
    since = sinceTs !== null ? "last seen " + fmtAgo(sinceTs) : "never connected";
  }
  setText(card.since, since);
  setAttr(card.since, "title", sinceTs !== null ? fmtWhen(sinceTs) : null);
  card.disconnect.disabled = !online;
  setAttr(card.disconnect, "title", online ? "close this client's link now" : "client is offline");

  const t = c.telemetry !== null && typeof c.telemetry === "object" ? c.telemetry : null;
  const hostname = str(c.hostname) || (t ? str(t.hostname) : null);
  const os = str(c.os) || (t ? str(t.os) : null);
  setText(card.hostname, hostname || DASH);
  setText(card.os, os || DASH);
  setText(card.address, str(c.address) || DASH);
  setText(card.version, str(c.version) || DASH);
  const rtt = num(c.rtt_ms);
  let rttText = DASH;
  if (rtt !== null) rttText = rtt < 0.1 ? "< 0.1 ms" : (rtt < 10 ? rtt.toFixed(1) : rtt.toFixed(0)) + " ms";
  setText(card.rtt, rttText);

  const traffic = obj(c.traffic);
  const rate = obj(c.rate);
  setText(card.trafficIn, fmtBytes(traffic.in));
  setText(card.trafficOut, fmtBytes(traffic.out));
  setText(card.rateIn, fmtRate(rate.in));
  setText(card.rateOut, fmtRate(rate.out));
  setAttr(card.trafficIn, "data-bytes", num(traffic.in));
  setAttr(card.trafficOut, "data-bytes", num(traffic.out));
  setAttr(card.rateIn, "data-rate", num(rate.in));
  setAttr(card.rateOut, "data-rate", num(rate.out));

  updateTunnels(card, list(c.tunnels));
  updateMachine(card, t);
}

function updateTunnels(card, tunnels) {
  const items = tunnels
    .map((tunnel) => obj(tunnel))
    .sort((a, b) => (num(a.port) || 0) - (num(b.port) || 0));
  syncRows(
    card.tunnelBody,
    card.tunnelRows,
    items,
    (tn) => String(num(tn.port) !== null ? tn.port : str(tn.target) || "?"),
    createTunnelRow,
    updateTunnelRow,
  );
  card.tunnelsEmpty.hidden = items.length > 0;
  card.tunnelTable.hidden = items.length === 0;
}

function createTunnelRow() {
  const tr = el("tr");
  tr.setAttribute("data-testid", "tunnel-row");
  const row = { node: tr };
  row.port = el("td", "port");
  row.target = el("td", "target");
  const modeCell = el("td");
  row.mode = el("span", "pill");
  modeCell.appendChild(row.mode);
  row.conns = el("td", "num");
  const tin = el("td", "num");
  row.tin = el("div");
  row.rateIn = el("div", "rate");
  tin.appendChild(row.tin);
  tin.appendChild(row.rateIn);
  const tout = el("td", "num");
  row.tout = el("div");
  row.rateOut = el("div", "rate");
  tout.appendChild(row.tout);
  tout.appendChild(row.rateOut);
  for (const cell of [row.port, row.target, modeCell, row.conns, tin, tout]) {
    tr.appendChild(cell);
  }
  return row;
}

function updateTunnelRow(row, tn) {
  const port = num(tn.port);
  setAttr(row.node, "data-port", port);
  setText(row.port, port === null ? DASH : String(port));
  setText(row.target, str(tn.target) || DASH);
  const mode = str(tn.mode) || DASH;
  setText(row.mode, mode);
  setAttr(row.mode, "data-mode", mode);
  toggle(row.node, "down", tn.online === false);
  setAttr(row.node, "title", tn.online === false ? "tunnel not live (client offline)" : null);
  setText(row.conns, fmtCount(tn.connections));
  toggle(row.conns, "hot", (num(tn.connections) || 0) > 0);
  const traffic = obj(tn.traffic);
  const rate = obj(tn.rate);
  setText(row.tin, fmtBytes(traffic.in));
  setText(row.tout, fmtBytes(traffic.out));
  setText(row.rateIn, fmtRate(rate.in));
  setText(row.rateOut, fmtRate(rate.out));
  toggle(row.rateIn, "active", (num(rate.in) || 0) > 0);
  toggle(row.rateOut, "active", (num(rate.out) || 0) > 0);
}

function updateMachine(card, t) {
  card.noTelemetry.hidden = t !== null;
  card.resources.hidden = t === null;
  const at = t !== null ? num(t.at) : null;
  setText(card.telemetryAge, at !== null ? "reported " + fmtAgo(at) : "");
  setAttr(card.telemetryAge, "title", at !== null ? fmtWhen(at) : null);
  toggle(card.telemetryAge, "stale", at !== null && relayNow() - at > 60);
  if (t === null) {
    card.gpuList.hidden = true;
    card.noGpu.hidden = true;
    return;
  }
  const cpu = num(t.cpu_percent);
  setMeter(card.cpu.meter, cpu === null ? null : cpu / 100, "CPU " + fmtPercent(cpu));
  setText(card.cpu.value, fmtPercent(cpu));
  const used = num(t.memory_used);
  const total = num(t.memory_total);
  setMeter(card.mem.meter, used !== null && total ? used / total : null, null);
  setText(card.mem.value, fmtBytes(used) + " / " + fmtBytes(total));

  const gpus = list(t.gpus).map((g) => obj(g));
  card.gpuList.hidden = gpus.length === 0;
  syncRows(
    card.gpuList,
    card.gpuRows,
    gpus,
    (g) => String(num(g.index) !== null ? g.index : str(g.name)),
    createGpuRow,
    updateGpuRow,
  );
  card.noGpu.hidden = gpus.length > 0;
  const gpuStatus = str(t.gpu_status);
  let noGpu = "no GPU";
  if (gpuStatus && /^no gpu/i.test(gpuStatus)) noGpu = gpuStatus;
  else if (gpuStatus && gpuStatus.toLowerCase() !== "ok") noGpu = "no GPU (" + gpuStatus + ")";
  setText(card.noGpu, noGpu);
}

function createGpuRow() {
  const node = el("div", "gpu");
  const row = { node: node };
  const head = el("div", "gpu-head");
  row.index = el("span", "gpu-index");
  row.name = el("span", "gpu-name");
  head.appendChild(row.index);
  head.appendChild(row.name);
  node.appendChild(head);

  const util = el("div", "res");
  util.appendChild(el("span", "res-label", "busy"));
  row.util = makeMeter();
  row.util.classList.add("meter-gpu");
  row.util.setAttribute("aria-label", "GPU utilization");
  util.appendChild(row.util);
  row.utilText = el("span", "res-value");
  util.appendChild(row.utilText);
  node.appendChild(util);

  const mem = el("div", "res");
  mem.appendChild(el("span", "res-label", "memory"));
  row.mem = makeMeter(0.8, 0.95);
  row.mem.setAttribute("aria-label", "GPU memory");
  mem.appendChild(row.mem);
  row.memText = el("span", "res-value");
  mem.appendChild(row.memText);
  node.appendChild(mem);

  const facts = el("div", "gpu-facts muted");
  row.temp = el("span");
  row.power = el("span");
  facts.appendChild(row.temp);
  facts.appendChild(row.power);
  node.appendChild(facts);
  return row;
}

function updateGpuRow(row, g) {
  const index = num(g.index);
  setText(row.index, index === null ? "GPU" : "GPU " + index);
  setText(row.name, str(g.name) || "unknown GPU");
  const util = num(g.utilization);
  setMeter(row.util, util === null ? null : util / 100, null);
  setText(row.utilText, fmtPercent(util));
  toggle(row.node, "idle", util !== null && util < 5);
  const used = num(g.memory_used);
  const total = num(g.memory_total);
  setMeter(row.mem, used !== null && total ? used / total : null, null);
  setText(row.memText, fmtBytes(used) + " / " + fmtBytes(total));
  const temp = num(g.temperature);
  const power = num(g.power_watts);
  setText(row.temp, temp === null ? "" : Math.round(temp) + " \u00b0C");
  toggle(row.temp, "hot", temp !== null && temp >= 85);
  setText(row.power, power === null ? "" : Math.round(power) + " W");
}

export function renderConnections(card, connections) {
  const items = connections
    .map((x) => obj(x))
    .sort((a, b) => (num(a.opened) || 0) - (num(b.opened) || 0));
  const rows = [];
  for (const conn of items.slice(0, MAX_CONNECTION_ROWS)) {
    const tr = el("tr");
    tr.appendChild(el("td", "peer", str(conn.peer) || DASH));
    tr.appendChild(el("td", "num", num(conn.port) === null ? DASH : String(conn.port)));
    let duration = num(conn.duration);
    if (duration === null && num(conn.opened) !== null) duration = relayNow() - conn.opened;
    const open = el("td", "num", fmtDuration(duration));
    const when = fmtWhen(conn.opened);
    if (when) open.setAttribute("title", "opened " + when);
    tr.appendChild(open);
    tr.appendChild(el("td", "num", fmtBytes(conn.in)));
    tr.appendChild(el("td", "num", fmtBytes(conn.out)));
    rows.push(tr);
  }
  if (items.length > MAX_CONNECTION_ROWS) {
    const tr = el("tr", "more");
    const td = el("td", "muted", "+ " + (items.length - MAX_CONNECTION_ROWS) + " more");
    td.colSpan = 5;
    tr.appendChild(td);
    rows.push(tr);
  }
  card.connBody.replaceChildren(...rows);
  card.connTable.hidden = items.length === 0;
  card.connEmpty.hidden = items.length > 0;
  setText(card.connCount, items.length ? String(items.length) : "");
}
