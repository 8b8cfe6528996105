/* Status page of the tunnel relay.
 *
 * Plain DOM, no framework, no inline anything (the page runs under a strict CSP). Every value
 * a client reports (names, host names, GPU names, targets, visitor addresses) is put on the
 * page with textContent or setAttribute, never parsed as HTML.
 *
 * Polls api/status, api/clients and api/leases every 2 s, and api/clients/<name> (rate
 * series and open connections) every 10 s per client. Relative times use the relay's clock:
 * the offset between it and the browser is taken from status.started + status.uptime.
 */
"use strict";

(function () {
  const POLL_MS = 2000;
  const DETAIL_MS = 10000;
  const CHART_WINDOW_S = 3600;
  const MAX_CONNECTION_ROWS = 10;
  const API_HEADERS = { "X-Tunnel-Request": "1" };

  const state = {
    skew: 0, // relay clock minus browser clock, seconds
    lastOk: null, // Date.now() of the last complete poll
    error: null, // text of the last poll error, null when the last poll worked
    pollTimer: null,
    polling: false,
    cards: new Map(), // client name -> card record
    order: [], // client names in display order
    leaseRows: new Map(), // port -> lease row record
    noticeTimer: null,
  };

  // ---------------------------------------------------------------- helpers

  function $(id) {
    return document.getElementById(id);
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function setText(node, text) {
    const value = text === null || text === undefined ? "" : String(text);
    if (node.textContent !== value) node.textContent = value;
  }

  function setAttr(node, name, value) {
    if (value === null || value === undefined) {
      node.removeAttribute(name);
    } else if (node.getAttribute(name) !== String(value)) {
      node.setAttribute(name, String(value));
    }
  }

  function toggle(node, className, on) {
    node.classList.toggle(className, Boolean(on));
  }

  function num(value) {
    return typeof value === "number" && Number.isFinite(value) ? value : null;
  }

  function str(value) {
    return typeof value === "string" && value !== "" ? value : null;
  }

  function obj(value) {
    return value !== null && typeof value === "object" && !Array.isArray(value) ? value : {};
  }

  function list(value) {
    return Array.isArray(value) ? value : [];
  }

  const DASH = "\u2014";
  const UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];

  function fmtBytes(value) {
    const n = num(value);
    if (n === null) return DASH;
    let v = Math.max(0, n);
    let unit = 0;
    while (v >= 1024 && unit < UNITS.length - 1) {
      v /= 1024;
      unit += 1;
    }
    if (unit === 0) return Math.round(v) + " B";
    return (v >= 100 ? v.toFixed(0) : v.toFixed(1)) + " " + UNITS[unit];
  }

  function fmtRate(value) {
    return num(value) === null ? DASH : fmtBytes(value) + "/s";
  }

  function fmtCount(value) {
    const n = num(value);
    return n === null ? DASH : Math.round(n).toLocaleString("en-US");
  }

  function fmtPercent(value) {
    const n = num(value);
    return n === null ? DASH : Math.round(n) + " %";
  }

  function fmtDuration(seconds) {
    const s = num(seconds);
    if (s === null) return DASH;
    const t = Math.max(0, Math.floor(s));
    if (t < 60) return t + " s";
    const m = Math.floor(t / 60);
    if (m < 60) return m + " min";
    const h = Math.floor(m / 60);
    if (h < 24) return h + " h " + (m % 60) + " min";
    const d = Math.floor(h / 24);
    return d + " d " + (h % 24) + " h";
  }

  function relayNow() {
    return Date.now() / 1000 + state.skew;
  }

  function fmtAgo(ts) {
    const t = num(ts);
    if (t === null) return DASH;
    const age = relayNow() - t;
    if (age < 5) return "just now";
    return fmtDuration(age) + " ago";
  }

  /** The relay time ``ts`` as a local date and time, for tooltips. */
  function fmtWhen(ts) {
    const t = num(ts);
    if (t === null) return null;
    return new Date((t - state.skew) * 1000).toLocaleString();
  }

  function makeMeter(low, high) {
    const meter = el("meter", "meter");
    meter.min = 0;
    meter.max = 1;
    meter.value = 0;
    if (low !== undefined) {
      meter.low = low;
      meter.high = high;
      meter.optimum = 0;
    }
    return meter;
  }

  function setMeter(meter, fraction, label) {
    const f = num(fraction);
    meter.value = f === null ? 0 : Math.min(1, Math.max(0, f));
    toggle(meter, "unknown", f === null);
    setAttr(meter, "title", label);
  }

  /** Keep ``tbody``'s rows in step with ``items`` (keyed), creating and removing as needed. */
  function syncRows(container, rows, items, keyOf, create, update) {
    const seen = new Set();
    let previous = null;
    items.forEach((item, index) => {
      let key = keyOf(item);
      if (seen.has(key)) key = key + "#" + index; // duplicate keys still get rows of their own
      seen.add(key);
      let row = rows.get(key);
      if (!row) {
        row = create(item, key);
        rows.set(key, row);
      }
      update(row, item);
      const expected = previous ? previous.node.nextSibling : container.firstChild;
      if (expected !== row.node) container.insertBefore(row.node, expected);
      previous = row;
    });
    for (const [key, row] of rows) {
      if (!seen.has(key)) {
        row.node.remove();
        rows.delete(key);
      }
    }
  }

  // ---------------------------------------------------------------- network

  class HttpError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function errorText(resp) {
    try {
      const body = await resp.json();
      const text = str(obj(body).error) || str(obj(body).message);
      if (text) return text;
    } catch (_) {
      // not JSON: fall through
    }
    return "HTTP " + resp.status + (resp.statusText ? " " + resp.statusText : "");
  }

  async function getJSON(path) {
    const resp = await fetch(path, {
      credentials: "same-origin",
      headers: API_HEADERS,
      cache: "no-store",
    });
    if (!resp.ok) throw new HttpError(resp.status, await errorText(resp));
    return resp.json();
  }

  async function post(path) {
    const resp = await fetch(path, {
      method: "POST",
      credentials: "same-origin",
      headers: API_HEADERS,
      cache: "no-store",
    });
    if (!resp.ok) throw new HttpError(resp.status, await errorText(resp));
  }

  function clientPath(name) {
    return "api/clients/" + encodeURIComponent(name);
  }

  // ---------------------------------------------------------------- header and totals

  function renderStatus(status) {
    const s = obj(status);
    const started = num(s.started);
    const uptime = num(s.uptime);
    if (started !== null && uptime !== null) {
      state.skew = started + uptime - Date.now() / 1000;
    }
    setText($("relay-version"), str(s.version) ? "version " + s.version : "version " + DASH);
    setText($("relay-uptime"), "up " + fmtDuration(uptime));
    setAttr($("relay-uptime"), "title", started !== null ? "started " + fmtWhen(started) : null);

    const clients = obj(s.clients);
    const online = num(clients.online);
    const offline = num(clients.offline);
    const total = num(clients.total);
    setText($("total-online"), fmtCount(online));
    setText($("total-clients"), total !== null ? " / " + fmtCount(total) : "");
    setText($("total-offline"), offline !== null ? fmtCount(offline) + " offline" : "");
    setText($("total-tunnels"), fmtCount(s.tunnels));
    setText($("total-connections"), fmtCount(s.connections));
    const rate = obj(s.rate);
    const traffic = obj(s.traffic);
    setText($("total-rate-in"), fmtRate(rate.in));
    setText($("total-rate-out"), fmtRate(rate.out));
    setText($("total-traffic-in"), fmtBytes(traffic.in) + " total");
    setText($("total-traffic-out"), fmtBytes(traffic.out) + " total");
    document.title =
      "tunnel relay" + (online !== null && total !== null ? " \u00b7 " + online + "/" + total + " online" : "");
  }

  function renderUpdated() {
    const node = $("updated");
    let text;
    let mode;
    if (state.lastOk === null) {
      text = state.error ? "connection lost: " + state.error : "connecting\u2026";
      mode = state.error ? "lost" : "pending";
    } else {
      const age = Math.max(0, Math.floor((Date.now() - state.lastOk) / 1000));
      if (state.error) {
        text = "connection lost \u00b7 last update " + fmtDuration(age) + " ago";
        mode = "lost";
      } else {
        text = "updated " + age + " s ago";
        mode = age * 1000 > POLL_MS * 3 ? "stale" : "ok";
      }
    }
    setText(node, text);
    setAttr(node, "data-state", mode);
    setAttr(node, "title", state.error ? state.error : null);
    setAttr(document.body, "data-connection", mode);
  }

  function showNotice(text, kind) {
    const node = $("notice");
    setText(node, text);
    setAttr(node, "data-kind", kind);
    node.hidden = false;
    clearTimeout(state.noticeTimer);
    state.noticeTimer = setTimeout(() => {
      node.hidden = true;
    }, 8000);
  }

  // ---------------------------------------------------------------- client cards

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

  function createCard(name) {
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
    card.disconnect.addEventListener("click", () => disconnectClient(name, card.disconnect));
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
    const tableWrap = el("div", "table-wrap");
    const table = el("table", "tunnels");
    const thead = el("thead");
    const hr = el("tr");
    for (const [label, cls] of [
      ["public port", null],
      ["local target", null],
      ["", null],
      ["conns", "num"],
      ["in: total, now", "num"],
      ["out: total, now", "num"],
    ]) {
      hr.appendChild(el("th", cls, label));
    }
    thead.appendChild(hr);
    table.appendChild(thead);
    card.tunnelBody = el("tbody");
    table.appendChild(card.tunnelBody);
    tableWrap.appendChild(table);
    tunnels.appendChild(tableWrap);
    card.tunnelTable = tableWrap;
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
      new ResizeObserver(() => drawChart(card)).observe(card.canvas);
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
    const connWrap = el("div", "table-wrap");
    const connTable = el("table", "conns");
    const cthead = el("thead");
    const chr = el("tr");
    for (const [label, cls] of [
      ["visitor", null],
      ["port", "num"],
      ["open for", "num"],
      ["in", "num"],
      ["out", "num"],
    ]) {
      chr.appendChild(el("th", cls, label));
    }
    cthead.appendChild(chr);
    connTable.appendChild(cthead);
    card.connBody = el("tbody");
    connTable.appendChild(card.connBody);
    connWrap.appendChild(connTable);
    conns.appendChild(connWrap);
    card.connTable = connTable;
    card.connEmpty = el("p", "empty-small muted", "nobody connected");
    conns.appendChild(card.connEmpty);
    root.appendChild(conns);

    return card;
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

  function updateCard(card, c) {
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

  function renderClients(clients) {
    const items = list(clients)
      .map((c) => obj(c))
      .filter((c) => str(c.name));
    items.sort((a, b) => {
      const ao = a.online === true ? 0 : 1;
      const bo = b.online === true ? 0 : 1;
      if (ao !== bo) return ao - bo;
      return a.name < b.name ? -1 : a.name > b.name ? 1 : 0;
    });
    const container = $("cards");
    const wanted = new Set(items.map((c) => c.name));
    for (const [name, card] of state.cards) {
      if (!wanted.has(name)) {
        card.node.remove();
        state.cards.delete(name);
      }
    }
    let previous = null;
    for (const c of items) {
      let card = state.cards.get(c.name);
      if (!card) {
        card = createCard(c.name);
        state.cards.set(c.name, card);
      }
      updateCard(card, c);
      const expected = previous ? previous.node.nextSibling : container.firstChild;
      if (expected !== card.node) container.insertBefore(card.node, expected);
      previous = card;
    }
    $("cards-empty").hidden = items.length > 0;
    scheduleDetails();
  }

  // ---------------------------------------------------------------- per-client details

  function scheduleDetails() {
    const now = Date.now();
    let stagger = 0;
    for (const card of state.cards.values()) {
      if (card.detailBusy || now < card.detailDue) continue;
      card.detailBusy = true;
      card.detailDue = now + DETAIL_MS;
      const delay = stagger;
      stagger += 150; // spread the requests a little when many cards are due at once
      setTimeout(() => loadDetail(card), delay);
    }
  }

  async function loadDetail(card) {
    try {
      const detail = obj(await getJSON(clientPath(card.name)));
      if (state.cards.get(card.name) !== card) return; // removed meanwhile
      card.series = list(detail.series);
      card.detailAt = Date.now();
      drawChart(card);
      renderConnections(card, list(detail.connections));
    } catch (err) {
      if (err instanceof HttpError && err.status === 404) return; // removed; next poll drops it
      card.detailDue = Date.now() + POLL_MS; // retry soon
    } finally {
      card.detailBusy = false;
    }
  }

  function renderConnections(card, connections) {
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

  // ---------------------------------------------------------------- chart

  function niceCeil(value) {
    if (!(value > 0)) return 1024;
    const exp = Math.pow(2, Math.floor(Math.log2(value)));
    for (const step of [1, 1.25, 1.5, 2]) {
      if (exp * step >= value) return exp * step;
    }
    return exp * 2;
  }

  function drawChart(card) {
    const canvas = card.canvas;
    const cssWidth = canvas.clientWidth;
    const cssHeight = canvas.clientHeight;
    if (!cssWidth || !cssHeight) return;
    const dpr = window.devicePixelRatio || 1;
    const width = Math.round(cssWidth * dpr);
    const height = Math.round(cssHeight * dpr);
    if (canvas.width !== width) canvas.width = width;
    if (canvas.height !== height) canvas.height = height;
    const ctx = canvas.getContext("2d");
    if (!ctx) return;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, cssWidth, cssHeight);

    const css = getComputedStyle(canvas);
    const color = (name, fallback) => css.getPropertyValue(name).trim() || fallback;
    const cIn = color("--chart-in", "#1f6feb");
    const cOut = color("--chart-out", "#e8590c");
    const cGrid = color("--chart-grid", "#e4e7ec");
    const cText = color("--chart-text", "#667085");
    const font = "11px " + (css.fontFamily || "sans-serif");

    const now = relayNow();
    const t0 = now - CHART_WINDOW_S;
    const points = [];
    for (const p of card.series) {
      if (!Array.isArray(p)) continue;
      const ts = num(p[0]);
      if (ts === null || ts < t0 - 60) continue;
      points.push([ts, Math.max(0, num(p[1]) || 0), Math.max(0, num(p[2]) || 0)]);
    }
    points.sort((a, b) => a[0] - b[0]);
    let peak = 0;
    for (const p of points) peak = Math.max(peak, p[1], p[2]);
    const top = niceCeil(peak);

    const padL = 4;
    const padR = 4;
    const padT = 16;
    const padB = 16;
    const plotW = cssWidth - padL - padR;
    const plotH = cssHeight - padT - padB;
    const x = (ts) => padL + ((ts - t0) / CHART_WINDOW_S) * plotW;
    const y = (v) => padT + plotH - (v / top) * plotH;

    // grid and labels
    ctx.font = font;
    ctx.lineWidth = 1;
    ctx.strokeStyle = cGrid;
    ctx.fillStyle = cText;
    ctx.textBaseline = "bottom";
    for (let i = 0; i <= 2; i += 1) {
      const gy = Math.round(padT + (plotH * i) / 2) + 0.5;
      ctx.beginPath();
      ctx.moveTo(padL, gy);
      ctx.lineTo(padL + plotW, gy);
      ctx.stroke();
    }
    ctx.textAlign = "left";
    ctx.fillText(fmtRate(top), padL, padT - 2);
    ctx.textBaseline = "top";
    ctx.fillText("60 min ago", padL, padT + plotH + 3);
    ctx.textAlign = "center";
    ctx.fillText("30 min", padL + plotW / 2, padT + plotH + 3);
    ctx.textAlign = "right";
    ctx.fillText("now", padL + plotW, padT + plotH + 3);

    setText(
      card.chartPeak,
      points.length ? "peak " + fmtRate(peak) : card.detailAt === null ? "loading\u2026" : "no data yet",
    );
    if (!points.length) return;

    // split the series where samples are missing (client offline, relay restarted)
    const steps = [];
    for (let i = 1; i < points.length; i += 1) steps.push(points[i][0] - points[i - 1][0]);
    steps.sort((a, b) => a - b);
    const typical = steps.length ? steps[Math.floor(steps.length / 2)] : 10;
    const gap = Math.max(typical * 3, 5);
    const runs = [];
    let run = [];
    for (let i = 0; i < points.length; i += 1) {
      if (i > 0 && points[i][0] - points[i - 1][0] > gap) {
        runs.push(run);
        run = [];
      }
      run.push(points[i]);
    }
    runs.push(run);

    ctx.save();
    ctx.beginPath();
    ctx.rect(padL, padT - 1, plotW, plotH + 2);
    ctx.clip();
    for (const [index, stroke] of [
      [1, cIn],
      [2, cOut],
    ]) {
      for (const r of runs) {
        ctx.beginPath();
        r.forEach((p, i) => (i === 0 ? ctx.moveTo(x(p[0]), y(p[index])) : ctx.lineTo(x(p[0]), y(p[index]))));
        if (r.length === 1) ctx.lineTo(x(r[0][0]) + 1.5, y(r[0][index]));
        ctx.lineTo(x(r[r.length - 1][0]), padT + plotH);
        ctx.lineTo(x(r[0][0]), padT + plotH);
        ctx.closePath();
        ctx.globalAlpha = 0.12;
        ctx.fillStyle = stroke;
        ctx.fill();
        ctx.globalAlpha = 1;
        ctx.beginPath();
        r.forEach((p, i) => (i === 0 ? ctx.moveTo(x(p[0]), y(p[index])) : ctx.lineTo(x(p[0]), y(p[index]))));
        if (r.length === 1) ctx.lineTo(x(r[0][0]) + 1.5, y(r[0][index]));
        ctx.lineWidth = 1.5;
        ctx.lineJoin = "round";
        ctx.strokeStyle = stroke;
        ctx.stroke();
      }
      // the latest sample as a dot, so a short or fresh series is easy to spot
      const last = points[points.length - 1];
      ctx.beginPath();
      ctx.arc(Math.min(x(last[0]), padL + plotW - 2.5), y(last[index]), 2.5, 0, 2 * Math.PI);
      ctx.fillStyle = stroke;
      ctx.fill();
    }
    ctx.restore();
  }

  // ---------------------------------------------------------------- leases

  function renderLeases(leases) {
    const items = list(leases)
      .map((x) => obj(x))
      .filter((x) => num(x.port) !== null)
      .sort((a, b) => a.port - b.port);
    syncRows($("leases"), state.leaseRows, items, (x) => String(x.port), createLeaseRow, updateLeaseRow);
    $("leases-empty").hidden = items.length > 0;
  }

  function createLeaseRow(lease, key) {
    const tr = el("tr");
    tr.setAttribute("data-testid", "lease-row");
    const row = { node: tr, port: Number(key) };
    row.portCell = el("td", "num port");
    row.owner = el("td");
    const kindCell = el("td");
    row.kind = el("span", "pill");
    kindCell.appendChild(row.kind);
    row.target = el("td", "target");
    const onlineCell = el("td");
    row.online = el("span", "badge");
    onlineCell.appendChild(row.online);
    row.created = el("td", "muted");
    row.lastSeen = el("td", "muted");
    const actions = el("td", "actions");
    row.release = el("button", "btn btn-danger", "release");
    row.release.type = "button";
    row.release.addEventListener("click", () => releaseLease(row.port, row.ownerName, row.release));
    actions.appendChild(row.release);
    for (const cell of [row.portCell, row.owner, kindCell, row.target, onlineCell, row.created, row.lastSeen, actions]) {
      tr.appendChild(cell);
    }
    return row;
  }

  function updateLeaseRow(row, lease) {
    row.ownerName = str(lease.client) || "";
    setAttr(row.node, "data-port", lease.port);
    setText(row.portCell, String(lease.port));
    setText(row.owner, row.ownerName || DASH);
    const kind = str(lease.kind) || DASH;
    setText(row.kind, kind);
    setAttr(row.kind, "data-mode", kind);
    setText(row.target, str(lease.target) || DASH);
    const online = lease.online === true;
    setText(row.online, online ? "online" : "offline");
    setAttr(row.online, "data-state", online ? "online" : "offline");
    setText(row.created, fmtAgo(lease.created));
    setAttr(row.created, "title", fmtWhen(lease.created));
    setText(row.lastSeen, online ? "now" : fmtAgo(lease.last_seen));
    setAttr(row.lastSeen, "title", fmtWhen(lease.last_seen));
  }

  // ---------------------------------------------------------------- admin actions

  async function disconnectClient(name, button) {
    const ok = window.confirm(
      "Disconnect client \u201c" + name + "\u201d now?\n\n" +
        "Its visitors are cut off. The client reconnects by itself unless its credential was removed.",
    );
    if (!ok) return;
    button.disabled = true;
    try {
      await post(clientPath(name) + "/disconnect");
      showNotice("Disconnected " + name + ".", "ok");
    } catch (err) {
      showNotice("Could not disconnect " + name + ": " + err.message, "error");
    }
    pollSoon();
  }

  async function releaseLease(port, owner, button) {
    const ok = window.confirm(
      "Release port " + port + (owner ? " (leased to \u201c" + owner + "\u201d)" : "") + "?\n\n" +
        "Any other client may then claim it. A tunnel live on it is closed.",
    );
    if (!ok) return;
    button.disabled = true;
    try {
      await post("api/leases/" + encodeURIComponent(String(port)) + "/release");
      showNotice("Released port " + port + ".", "ok");
    } catch (err) {
      showNotice("Could not release port " + port + ": " + err.message, "error");
      button.disabled = false;
    }
    pollSoon();
  }

  // ---------------------------------------------------------------- main loop

  function describeError(err) {
    if (err instanceof HttpError) {
      if (err.status === 401) return "not signed in (reload the page)";
      if (err.status === 403) return "refused by the relay (" + err.message + ")";
      return err.message;
    }
    return "relay unreachable";
  }

  async function poll() {
    state.polling = true;
    try {
      const [status, clients, leases] = await Promise.all([
        getJSON("api/status"),
        getJSON("api/clients"),
        getJSON("api/leases").catch((err) => ({ failed: err })),
      ]);
      renderStatus(status);
      renderClients(clients);
      if (leases && leases.failed) {
        if (leases.failed instanceof HttpError && leases.failed.status === 401) throw leases.failed;
      } else {
        renderLeases(leases);
      }
      state.lastOk = Date.now();
      state.error = null;
    } catch (err) {
      state.error = describeError(err);
    } finally {
      state.polling = false;
      renderUpdated();
      clearTimeout(state.pollTimer);
      state.pollTimer = setTimeout(poll, POLL_MS);
    }
  }

  function pollSoon() {
    if (state.polling) return;
    clearTimeout(state.pollTimer);
    state.pollTimer = setTimeout(poll, 150);
  }

  function start() {
    setText($("relay-host"), location.host);
    setInterval(renderUpdated, 1000);
    poll();
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
