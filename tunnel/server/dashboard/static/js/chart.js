// The rate chart: a client's in/out rate over the last hour on a canvas, colours from the CSS.

import { setText } from "./dom.js";
import { fmtRate, num, relayNow } from "./format.js";

const CHART_WINDOW_S = 3600;

function niceCeil(value) {
  if (!(value > 0)) return 1024;
  const exp = Math.pow(2, Math.floor(Math.log2(value)));
  for (const step of [1, 1.25, 1.5, 2]) {
    if (exp * step >= value) return exp * step;
  }
  return exp * 2;
}

/* Draw ``series`` ([[relay time, in B/s, out B/s], ...]) on ``canvas`` as two filled lines
 * over the last hour, split where samples are missing, and put the peak (or "loading…"
 * until ``loaded``, or "no data yet") in ``peakNode``. Sized to the canvas's CSS box. */
export function drawRateChart(canvas, series, peakNode, loaded) {
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
  for (const p of series) {
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
    peakNode,
    points.length ? "peak " + fmtRate(peak) : loaded ? "no data yet" : "loading\u2026",
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
