// The poll loop: every 2 s each panel's API call, then each panel's render, and the "updated" chip.

import { describeError, HttpError } from "./api.js";
import { $, setAttr, setText } from "./dom.js";
import { fmtDuration } from "./format.js";

export const POLL_MS = 2000;

const state = {
  panels: [], // see main.js
  lastOk: null, // Date.now() of the last complete poll
  error: null, // text of the last poll error, null when the last poll worked
  timer: null,
  polling: false,
};

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

/* All panels load at once; they render in registration order once every required one has
 * answered (status first: it sets the relay clock the others' "… ago" texts use). A required
 * panel's failure marks the connection lost and renders nothing; an optional panel's failure
 * leaves it as it was, unless it is a 401 (signed out), which is everyone's problem. */
async function poll() {
  state.polling = true;
  try {
    const results = await Promise.all(
      state.panels.map((panel) => {
        const loaded = panel.load().then((data) => ({ data }));
        return panel.optional ? loaded.catch((failed) => ({ failed })) : loaded;
      }),
    );
    let signedOut = null;
    state.panels.forEach((panel, index) => {
      const result = results[index];
      if ("data" in result) {
        panel.render(result.data);
      } else if (result.failed instanceof HttpError && result.failed.status === 401) {
        signedOut = signedOut || result.failed;
      }
    });
    if (signedOut) throw signedOut;
    state.lastOk = Date.now();
    state.error = null;
  } catch (err) {
    state.error = describeError(err);
  } finally {
    state.polling = false;
    renderUpdated();
    clearTimeout(state.timer);
    state.timer = setTimeout(poll, POLL_MS);
  }
}

/** Poll in 150 ms rather than at the next tick (after an admin action), unless one is running. */
export function pollSoon() {
  if (state.polling) return;
  clearTimeout(state.timer);
  state.timer = setTimeout(poll, 150);
}

/** Start each panel (its ``start``, if any), then the loop and the once-a-second chip. */
export function startPolling(panels) {
  state.panels = panels;
  for (const panel of panels) {
    if (panel.start) panel.start();
  }
  setInterval(renderUpdated, 1000);
  poll();
}
