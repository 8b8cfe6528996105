// Panel: the header (version, uptime, relay host) and the totals row, from api/status.

import { $, setAttr, setText } from "../dom.js";
import { getJSON } from "../api.js";
import {
  DASH,
  fmtBytes,
  fmtCount,
  fmtDuration,
  fmtRate,
  fmtWhen,
  num,
  obj,
  setRelayClock,
  str,
} from "../format.js";

function renderStatus(status) {
  const s = obj(status);
  const started = num(s.started);
  const uptime = num(s.uptime);
  setRelayClock(started, uptime);
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

export default {
  name: "status",
  load: () => getJSON("api/status"),
  render: renderStatus,
  start() {
    setText($("relay-host"), location.host);
  },
};
