// Panel: the port leases table and its "release" button, from api/leases (optional: may fail alone).

import { getJSON, post } from "../api.js";
import { $, el, setAttr, setText, syncRows } from "../dom.js";
import { DASH, fmtAgo, fmtWhen, list, num, obj, str } from "../format.js";
import { showNotice } from "../notice.js";
import { pollSoon } from "../poll.js";

const rows = new Map(); // port -> lease row record

function renderLeases(leases) {
  const items = list(leases)
    .map((x) => obj(x))
    .filter((x) => num(x.port) !== null)
    .sort((a, b) => a.port - b.port);
  syncRows($("leases"), rows, items, (x) => String(x.port), createLeaseRow, updateLeaseRow);
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

export default {
  name: "leases",
  load: () => getJSON("api/leases"),
  render: renderLeases,
  optional: true, // a relay that cannot list leases still shows its clients
};
