// Panel: one card per client, from api/clients every poll and api/clients/<name> every 10 s.

import { getJSON, HttpError, post } from "../api.js";
import { $ } from "../dom.js";
import { list, obj, str } from "../format.js";
import { showNotice } from "../notice.js";
import { POLL_MS, pollSoon } from "../poll.js";
import { createCard, drawCardChart, renderConnections, updateCard } from "./client-card.js";

const DETAIL_MS = 10000; // rate series and open connections, per client

const cards = new Map(); // client name -> card record (client-card.js)

function clientPath(name) {
  return "api/clients/" + encodeURIComponent(name);
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
  for (const [name, card] of cards) {
    if (!wanted.has(name)) {
      card.node.remove();
      cards.delete(name);
    }
  }
  let previous = null;
  for (const c of items) {
    let card = cards.get(c.name);
    if (!card) {
      card = createCard(c.name, disconnectClient);
      cards.set(c.name, card);
    }
    updateCard(card, c);
    const expected = previous ? previous.node.nextSibling : container.firstChild;
    if (expected !== card.node) container.insertBefore(card.node, expected);
    previous = card;
  }
  $("cards-empty").hidden = items.length > 0;
  scheduleDetails();
}

function scheduleDetails() {
  const now = Date.now();
  let stagger = 0;
  for (const card of cards.values()) {
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
    if (cards.get(card.name) !== card) return; // removed meanwhile
    card.series = list(detail.series);
    card.detailAt = Date.now();
    drawCardChart(card);
    renderConnections(card, list(detail.connections));
  } catch (err) {
    if (err instanceof HttpError && err.status === 404) return; // removed; next poll drops it
    card.detailDue = Date.now() + POLL_MS; // retry soon
  } finally {
    card.detailBusy = false;
  }
}

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

export default {
  name: "clients",
  load: () => getJSON("api/clients"),
  render: renderClients,
};
