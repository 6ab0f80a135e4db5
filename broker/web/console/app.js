// The security console: a shell (who is logged in, navigation), the login page and a hash
// router over the pages in sessions.js and overview.js. No framework, no build step.

import {api, ApiError, clear, field, h, heading, message, onUnauthorized, setCsrf} from "./util.js";
import {auditPage, dashboardPage} from "./overview.js";
import {sessionPage, sessionsPage} from "./sessions.js";
import {accessPage, approvalsPage, grantPage, requestPage} from "./grants.js";
import {locksPage} from "./locks.js";

const state = {me: null};
const main = () => document.getElementById("main");

function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/";
  const [path, query] = raw.split("?");
  return {parts: path.split("/").filter(Boolean).map(decodeURIComponent),
    params: new URLSearchParams(query || "")};
}

export function go(hash) {
  if (location.hash === hash) route();
  else location.hash = hash;
}

function showShell() {
  const nav = document.getElementById("nav");
  const who = document.getElementById("who");
  const logout = document.getElementById("logout");
  const roles = new Set(state.me ? state.me.roles : []);
  nav.hidden = !state.me;
  logout.hidden = !state.me;
  for (const a of nav.querySelectorAll("a[data-role]")) {
    const need = a.getAttribute("data-role");
    a.hidden = !(roles.has(need) || roles.has("admin"));
  }
  who.textContent = state.me ? `${state.me.user} (${state.me.roles.join(", ")})` : "";
}

function markCurrent(page) {
  for (const a of document.querySelectorAll("#nav a")) {
    if (a.getAttribute("data-page") === page) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
}

export function isAuditor() {
  const roles = new Set(state.me ? state.me.roles : []);
  return roles.has("auditor") || roles.has("admin");
}

function loginPage(root, params) {
  document.title = "Log in · bastion-broker";
  const user = h("input", {name: "user", autocomplete: "username", required: true,
    spellcheck: "false", autocapitalize: "none"});
  const password = h("input", {name: "password", type: "password",
    autocomplete: "current-password", required: true});
  const code = h("input", {name: "code", inputmode: "numeric", autocomplete: "one-time-code",
    pattern: "[0-9]{6,8}", maxlength: "8", required: true});
  const status = h("div", {"aria-live": "polite"});
  const submit = h("button", {type: "submit"}, "Log in");
  const form = h("form", {class: "login", novalidate: true}, heading("Log in"),
    h("p", {class: "muted"}, "Your directory (AD) password and the code from your authenticator app."),
    field("User", user, "alice, alice@corp.example.com or CORP\\alice"),
    field("Password", password),
    field("Verification code", code),
    submit, status);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clear(status);
    if (!user.value || !password.value || !/^[0-9]{6,8}$/.test(code.value)) {
      status.append(message("error", "Give the user, the password and the 6-digit code."));
      return;
    }
    submit.disabled = true;
    try {
      const res = await api("POST", "/api/login",
        {user: user.value, password: password.value, code: code.value});
      setCsrf(res.csrf);
      state.me = {user: res.user, roles: res.roles};
      password.value = "";
      code.value = "";
      const next = params.get("next");
      go(next && next.startsWith("#/") ? next : "#/sessions");
    } catch (e) {
      status.append(message("error", e instanceof ApiError ? e.message : String(e)));
      code.value = "";
    } finally {
      submit.disabled = false;
    }
  });
  root.append(form);
  user.focus();
}

async function whoAmI() {
  try {
    const me = await api("GET", "/api/me");
    state.me = {user: me.user, roles: me.roles};
  } catch (e) {
    state.me = null;
    if (!(e instanceof ApiError) || e.status !== 401) throw e;
  }
}

let routing = 0;

async function route() {
  const seq = ++routing;
  const {parts, params} = parseHash();
  const root = clear(main());
  const page = parts[0] || "";
  if (page === "login" || !state.me) {
    showShell();
    markCurrent("");
    if (page !== "login") {
      const next = location.hash && location.hash !== "#/" ? location.hash : "";
      history.replaceState(null, "", "#/login" + (next ? "?next=" + encodeURIComponent(next) : ""));
      loginPage(root, new URLSearchParams(next ? {next} : {}));
    } else {
      loginPage(root, params);
    }
    return;
  }
  showShell();
  markCurrent({session: "sessions", request: "access", grant: "access"}[page] || page);
  const ctx = {params, isAuditor: isAuditor(), me: state.me, stale: () => seq !== routing, go};
  try {
    if (page === "sessions" || page === "") await sessionsPage(root, ctx);
    else if (page === "session" && parts[1]) await sessionPage(root, parts[1], ctx);
    else if (page === "audit") await auditPage(root, ctx);
    else if (page === "dashboard") await dashboardPage(root, ctx);
    else if (page === "access") await accessPage(root, ctx);
    else if (page === "request") await requestPage(root, ctx);
    else if (page === "approvals") await approvalsPage(root, ctx);
    else if (page === "grant" && parts[1]) await grantPage(root, parts[1], ctx);
    else if (page === "locks") await locksPage(root, ctx);
    else root.append(heading("Not found"), message("error", "There is no such page."));
  } catch (e) {
    if (seq !== routing) return;
    if (e instanceof ApiError && e.status === 401) return; // the login page is on its way
    root.append(message("error", e instanceof ApiError ? `${e.message} (HTTP ${e.status})`
      : "The page failed: " + String(e && e.message ? e.message : e)));
  }
  const title = root.querySelector("h1");
  if (title && seq === routing && !root.contains(document.activeElement)) title.focus();
}

onUnauthorized(() => {
  if (!state.me) return;
  state.me = null;
  const next = location.hash;
  go("#/login?next=" + encodeURIComponent(next));
});

async function start() {
  document.getElementById("logout").addEventListener("click", async () => {
    try {
      await api("POST", "/api/logout");
    } catch (e) {
      // the session may have ended already; the page forgets it either way
    }
    state.me = null;
    setCsrf(null);
    go("#/login");
  });
  window.addEventListener("hashchange", route);
  try {
    await whoAmI();
  } catch (e) {
    clear(main()).append(message("error", "The broker cannot be reached: " + e.message));
    return;
  }
  await route();
}

start();
