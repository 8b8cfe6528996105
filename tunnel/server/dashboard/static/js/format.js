// Value guards (API data is untrusted JSON) and the page's number, size and time formats.

/* The relay's clock: relative times ("2 min ago") and tooltips use it, not the browser's.
 * The offset between the two is taken from status.started + status.uptime. */
let skew = 0; // relay clock minus browser clock, seconds

/** Take the relay's clock from api/status (``started`` and ``uptime``, seconds). */
export function setRelayClock(started, uptime) {
  if (num(started) !== null && num(uptime) !== null) skew = started + uptime - Date.now() / 1000;
}

export function num(value) {
  return typeof value === "number" && Number.isFinite(value) ? value : null;
}

export function str(value) {
  return typeof value === "string" && value !== "" ? value : null;
}

export function obj(value) {
  return value !== null && typeof value === "object" && !Array.isArray(value) ? value : {};
}

export function list(value) {
  return Array.isArray(value) ? value : [];
}

export const DASH = "\u2014";
const UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];

export function fmtBytes(value) {
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

export function fmtRate(value) {
  return num(value) === null ? DASH : fmtBytes(value) + "/s";
}

export function fmtCount(value) {
  const n = num(value);
  return n === null ? DASH : Math.round(n).toLocaleString("en-US");
}

export function fmtPercent(value) {
  const n = num(value);
  return n === null ? DASH : Math.round(n) + " %";
}

export function fmtDuration(seconds) {
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

export function relayNow() {
  return Date.now() / 1000 + skew;
}

export function fmtAgo(ts) {
  const t = num(ts);
  if (t === null) return DASH;
  const age = relayNow() - t;
  if (age < 5) return "just now";
  return fmtDuration(age) + " ago";
}

/** The relay time ``ts`` as a local date and time, for tooltips. */
export function fmtWhen(ts) {
  const t = num(ts);
  if (t === null) return null;
  return new Date((t - skew) * 1000).toLocaleString();
}
