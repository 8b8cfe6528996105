// The notice line under the totals: the outcome of an admin action, shown for 8 s.

import { $, setAttr, setText } from "./dom.js";

let timer = null;

export function showNotice(text, kind) {
  const node = $("notice");
  setText(node, text);
  setAttr(node, "data-kind", kind);
  node.hidden = false;
  clearTimeout(timer);
  timer = setTimeout(() => {
    node.hidden = true;
  }, 8000);
}
