// DOM, API and formatting helpers shared by the console's pages.
//
// Every piece of data reaches the page as a text node or an attribute value (h() below); no
// code path here or in the pages builds markup from strings, so whatever a target printed or a
// user typed is shown as text and never interpreted.

/** An element: h("a", {href: "#/x", class: "c", onclick: fn}, "text", child, [more]). */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") {
      el.addEventListener(k.slice(2), v);
    } else if (k === "style") {
      throw new Error("no inline styles: use a class");
    } else {
      el.setAttribute(k, v === true ? "" : String(v));
    }
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export function clear(el) {
  el.replaceChildren();
  return el;
}

// -- the API ----------------------------------------------------------------------------------

export class ApiError extends Error {
  constructor(status, error, message, field) {
    super(message || error || `HTTP ${status}`);
    this.status = status;
    this.error = error;
    this.field = field || null; // the request field the API named (detail.field), if any
  }
}

let csrf = null;

function csrfFromCookie() {
  for (const part of document.cookie.split(";")) {
    const [k, ...v] = part.trim().split("=");
    if (k === "bb_csrf" || k === "__Host-bb_csrf") return decodeURIComponent(v.join("="));
  }
  return null;
}

export function setCsrf(token) {
  csrf = token;
}

const unauthorized = new Set();
/** Called when a request answers 401 (the session ended): the shell shows the login page. */
export function onUnauthorized(fn) {
  unauthorized.add(fn);
}

/** JSON in, JSON out; unsafe methods carry the X-CSRF-Token header the API expects. */
export async function api(method, path, body) {
  const headers = {Accept: "application/json"};
  const init = {method, headers, credentials: "same-origin", cache: "no-store"};
  if (method !== "GET" && method !== "HEAD") {
    const token = csrf || csrfFromCookie();
    if (token) headers["X-CSRF-Token"] = token;
  }
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, "network", "the broker cannot be reached");
  }
  let data = null;
  const text = await resp.text();
  if (text) {
    try {
      data = JSON.parse(text);
    } catch (e) {
      data = null;
    }
  }
  if (!resp.ok) {
    const detail = data && data.detail;
    const message = (detail && typeof detail === "object" ? detail.message : detail) ||
      (data && data.error) || `HTTP ${resp.status}`;
    const err = new ApiError(resp.status, data && data.error, message,
      detail && typeof detail === "object" ? detail.field : null);
    if (resp.status === 401 && path !== "/api/login") unauthorized.forEach((fn) => fn(err));
    throw err;
  }
  return data;
}

/** A query string from an object, leaving out empty values. */
export function qs(params) {
  const p = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== "") p.set(k, String(v));
  }
  const s = p.toString();
  return s ? "?" + s : "";
}

// -- formatting -------------------------------------------------------------------------------

const TZ = Intl.DateTimeFormat().resolvedOptions().timeZone;
const DATE_TIME = new Intl.DateTimeFormat(undefined, {
  year: "numeric", month: "2-digit", day: "2-digit",
  hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false, timeZoneName: "short",
});

export function timeZone() {
  return TZ;
}

/** An RFC 3339 time in the viewer's time zone, as a <time> element with the exact value. */
export function when(iso) {
  if (!iso) return h("span", {class: "muted"}, "—");
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return h("span", {}, String(iso));
  return h("time", {datetime: d.toISOString(), title: d.toISOString()}, DATE_TIME.format(d));
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  const s = Math.max(0, Math.round(Number(seconds)));
  const hh = Math.floor(s / 3600);
  const mm = Math.floor((s % 3600) / 60);
  const ss = s % 60;
  if (hh) return `${hh} h ${String(mm).padStart(2, "0")} min`;
  if (mm) return `${mm} min ${String(ss).padStart(2, "0")} s`;
  return `${ss} s`;
}

/** m:ss (or h:mm:ss) for a position in a recording. */
export function clock(seconds) {
  const s = Math.max(0, Math.floor(Number(seconds) || 0));
  const hh = Math.floor(s / 3600);
  const mm = Math.floor((s % 3600) / 60);
  const ss = String(s % 60).padStart(2, "0");
  return hh ? `${hh}:${String(mm).padStart(2, "0")}:${ss}` : `${mm}:${ss}`;
}

export function bytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = Number(n);
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${v} B` : `${v.toFixed(1)} ${units[i]}`;
}

export function statusBadge(status, title) {
  const s = String(status || "unknown");
  return h("span", {class: `badge status-${s.replace(/[^a-z]/g, "")}`, title: title || null}, s);
}

/** A labelled form field: h label wrapping text and the control (explicit for= as well). */
let fieldSeq = 0;
export function field(labelText, control, hint) {
  const id = control.id || `f${++fieldSeq}`;
  control.id = id;
  return h("div", {class: "field"},
    h("label", {for: id}, labelText), control, hint ? h("small", {class: "muted"}, hint) : null);
}

export function message(kind, text) {
  return h("p", {class: kind, role: kind === "error" ? "alert" : "status"}, text);
}

/** The page's main heading, focused so keyboard and screen-reader users land on it. */
export function heading(text) {
  return h("h1", {tabindex: "-1", class: "page-title"}, text);
}

/** A date-time input's value (the viewer's local time) as RFC 3339, or "". */
export function localToIso(value) {
  if (!value) return "";
  const d = new Date(value);
  return Number.isNaN(d.getTime()) ? "" : d.toISOString();
}

/** RFC 3339 to a datetime-local input's value in the viewer's zone. */
export function isoToLocal(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return "";
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}`;
}
