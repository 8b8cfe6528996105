// The relay's JSON API: GET and POST with the CSRF header, errors as HttpError with a readable text.

import { obj, str } from "./format.js";

const API_HEADERS = { "X-Tunnel-Request": "1" };

export class HttpError extends Error {
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

export async function getJSON(path) {
  const resp = await fetch(path, {
    credentials: "same-origin",
    headers: API_HEADERS,
    cache: "no-store",
  });
  if (!resp.ok) throw new HttpError(resp.status, await errorText(resp));
  return resp.json();
}

export async function post(path) {
  const resp = await fetch(path, {
    method: "POST",
    credentials: "same-origin",
    headers: API_HEADERS,
    cache: "no-store",
  });
  if (!resp.ok) throw new HttpError(resp.status, await errorText(resp));
}

export function describeError(err) {
  if (err instanceof HttpError) {
    if (err.status === 401) return "not signed in (reload the page)";
    if (err.status === 403) return "refused by the relay (" + err.message + ")";
    return err.message;
  }
  return "relay unreachable";
}
