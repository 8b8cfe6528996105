// DOM helpers: build elements, set text and attributes only when they change, keep rows keyed.
//
// Everything reaches the page as text (textContent) or as an attribute value: nothing
// here parses markup, and nothing else in the page may either.

import { num } from "./format.js";

export function $(id) {
  return document.getElementById(id);
}

export function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

export function setText(node, text) {
  const value = text === null || text === undefined ? "" : String(text);
  if (node.textContent !== value) node.textContent = value;
}

export function setAttr(node, name, value) {
  if (value === null || value === undefined) {
    node.removeAttribute(name);
  } else if (node.getAttribute(name) !== String(value)) {
    node.setAttribute(name, String(value));
  }
}

export function toggle(node, className, on) {
  node.classList.toggle(className, Boolean(on));
}

export function makeMeter(low, high) {
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

export function setMeter(meter, fraction, label) {
  const f = num(fraction);
  meter.value = f === null ? 0 : Math.min(1, Math.max(0, f));
  toggle(meter, "unknown", f === null);
  setAttr(meter, "title", label);
}

/** Keep ``tbody``'s rows in step with ``items`` (keyed), creating and removing as needed. */
export function syncRows(container, rows, items, keyOf, create, update) {
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
