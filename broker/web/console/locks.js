// The incident brakes: "End session" on a live session's page (auditors and admins) and the
// locks page (admins). The API checks the role and audits who and why; the bastion holding the
// session ends it within its enforcement interval and shows the user the reason.

import {api, ApiError, clear, field, h, heading, message, qs, timeZone, when} from "./util.js";
import {FormErrors, liveStatus, revealForm} from "./grants.js";

const KINDS = [["user", "User", "alice, alice@corp.example.com or CORP\\alice"],
  ["target", "Target", "an instance id or name"], ["stack", "Stack", "a stack ID"]];
const ENDED_WAIT_MS = 20000;

/** The "End session" button of a live session, with its reason form; then the outcome. */
// ``onEnded(session)``: the session's fresh detail once it has ended (the page updates itself)
export function endSessionPanel(s, onEnded = () => {}) {
  const sec = h("section", {class: "end-session", "aria-labelledby": "end-h"},
    h("h2", {id: "end-h"}, "End this session"));
  const open = h("button", {type: "button", class: "danger"}, "End session");
  const reason = h("textarea", {name: "reason", rows: "2", required: true});
  const go = h("button", {type: "submit", class: "danger"}, "End session now");
  const cancel = h("button", {type: "button", class: "secondary"}, "Cancel");
  const status = liveStatus();
  const errors = new FormErrors(status);
  const form = h("form", {class: "inline-form", hidden: true, novalidate: true,
    "aria-label": "End session"},
  errors.add("reason", field("Reason", reason, "required; audited, and shown to the user"),
    reason),
  h("div", {class: "actions"}, go, cancel));
  revealForm(open, form, cancel, () => reason, errors);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    errors.clear();
    if (!reason.value.trim()) {
      errors.show(new ApiError(400, "invalid", "reason: say why (it is audited and shown to " +
        "the user)", "reason"));
      return;
    }
    go.disabled = true;
    let req;
    try {
      req = await api("POST", `/api/sessions/${encodeURIComponent(s.id)}/kill`,
        {reason: reason.value});
    } catch (e) {
      errors.show(e);
      go.disabled = false;
      return;
    }
    form.hidden = true;
    errors.ok(`Ending requested (${req.id}) by ${req.requested_by}: the bastion holding the ` +
      "session ends it within its enforcement interval.");
    const ended = await waitEnded(s.id);
    if (ended) {
      onEnded(ended);
      errors.ok("Session ended", ended.ended_at ? [" at ", when(ended.ended_at)] : "", ": ",
        h("span", {class: "outcome"}, ended.exit_status || ended.outcome || "ended"));
    } else {
      errors.ok("Ending requested; the session was still live after " +
        `${ENDED_WAIT_MS / 1000} s (reload the page to see it end).`);
    }
  });
  sec.append(open, form, status);
  return sec;
}

async function waitEnded(id) {
  const until = Date.now() + ENDED_WAIT_MS;
  while (Date.now() < until) {
    await new Promise((r) => setTimeout(r, 700));
    try {
      const s = await api("GET", `/api/sessions/${encodeURIComponent(id)}`);
      if (s.status !== "live") return s;
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) return null;
    }
  }
  return null;
}

// -- the locks page -----------------------------------------------------------------------------

function lockRow(lk, onRemoved) {
  const cell = h("td", {class: "actions-cell"});
  if (lk.state === "active") {
    const status = liveStatus();
    const btn = h("button", {type: "button", class: "secondary",
      "aria-label": `Remove lock ${lk.id} on ${lk.kind} ${lk.value}`}, "Remove");
    btn.addEventListener("click", async () => {
      btn.disabled = true;
      clear(status);
      try {
        const r = await api("DELETE", `/api/locks/${encodeURIComponent(lk.id)}`);
        status.append(h("p", {class: "ok", role: "status"}, `Lock ${r.id} removed.`));
        onRemoved(r);
      } catch (e) {
        status.append(message("error", e.message));
        btn.disabled = false;
      }
    });
    cell.append(btn, status);
  } else {
    cell.append(h("span", {class: "muted small"}, lk.state,
      lk.removed_by ? ` by ${lk.removed_by}` : ""));
  }
  return h("tr", {"data-lock": lk.id},
    h("td", {}, lk.kind), h("td", {}, h("code", {}, lk.value)), h("td", {}, lk.reason),
    h("td", {}, lk.created_by, h("div", {class: "muted small"}, when(lk.created_at))),
    h("td", {}, lk.expires_at ? when(lk.expires_at) : h("span", {class: "muted"}, "until removed")),
    cell);
}

export async function locksPage(root, ctx) {
  document.title = "Locks · bastion-broker";
  root.append(heading("Locks"));
  if (!new Set(ctx.me.roles).has("admin")) {
    root.append(message("error", "Locks are for admins."));
    return;
  }
  root.append(h("p", {class: "muted"}, "A lock ends every matching live session on every " +
    "bastion and refuses new logins and sessions until it expires or is removed."));
  // create
  const status = liveStatus();
  const errors = new FormErrors(status);
  const kind = h("select", {name: "kind"}, KINDS.map(([v, label]) => h("option", {value: v}, label)));
  const value = h("input", {name: "value", spellcheck: "false", autocapitalize: "none",
    autocomplete: "off"});
  const valueField = field("User", value, KINDS[0][2]);
  const ttl = h("input", {name: "ttl", spellcheck: "false", autocomplete: "off",
    placeholder: "1h"});
  const reason = h("textarea", {name: "reason", rows: "2"});
  const submit = h("button", {type: "submit", class: "danger"}, "Lock");
  kind.addEventListener("change", () => {
    const [, label, hint] = KINDS.find(([v]) => v === kind.value);
    valueField.querySelector("label").textContent = label;
    valueField.querySelector("small").textContent = hint;
  });
  const form = h("form", {class: "lock-form", novalidate: true, "aria-labelledby": "new-lock-h"},
    h("h2", {id: "new-lock-h"}, "New lock"),
    h("div", {class: "row align-top"}, field("Lock a", kind),
      errors.add(["user", "target", "stack"], valueField, value),
      errors.add("ttl", field("For", ttl, "30m, 1h, 2d, 1w; empty: until removed"), ttl)),
    errors.add("reason", field("Reason", reason, "required; audited, and shown to those whose " +
      "sessions end"), reason),
    h("div", {class: "actions"}, submit), status);
  root.append(form);
  // list
  const all = ctx.params.get("all") === "1";
  const show = h("input", {type: "checkbox", name: "all", checked: all});
  show.addEventListener("change", () => ctx.go("#/locks" + qs({all: show.checked ? "1" : ""})));
  const listSec = h("section", {"aria-labelledby": "locks-h", "aria-live": "polite"},
    h("h2", {id: "locks-h"}, all ? "All locks" : "Active locks"),
    h("div", {class: "field check"}, h("label", {}, show, " Show removed and expired locks")));
  root.append(listSec);
  const tbody = h("tbody");
  const table = h("table", {class: "locks"}, h("thead", {}, h("tr", {},
    h("th", {scope: "col"}, "Kind"), h("th", {scope: "col"}, "Value"),
    h("th", {scope: "col"}, "Reason"), h("th", {scope: "col"}, `By, since (${timeZone()})`),
    h("th", {scope: "col"}, "Until"), h("th", {scope: "col"}, "Action"))), tbody);
  const none = h("p", {class: "muted"}, "No lock is active.");
  const refresh = () => {
    none.hidden = tbody.children.length > 0;
    table.hidden = !none.hidden;
  };
  const removed = (r) => setTimeout(() => {
    const tr = tbody.querySelector(`tr[data-lock="${CSS.escape(r.id)}"]`);
    if (tr && !all) tr.remove();
    else if (tr) tr.replaceWith(lockRow(r, removed));
    refresh();
  }, 1500);
  const rows = await api("GET", "/api/locks" + qs({all: all ? "1" : ""}));
  if (ctx.stale()) return;
  for (const lk of rows) tbody.append(lockRow(lk, removed));
  listSec.append(none, table);
  refresh();
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    errors.clear();
    const body = {[kind.value]: value.value.trim(), reason: reason.value};
    if (ttl.value.trim()) body.ttl = ttl.value.trim();
    submit.disabled = true;
    try {
      const lk = await api("POST", "/api/locks", body);
      errors.ok(`Locked ${lk.kind} ${lk.value} (${lk.id}): its live sessions end within the ` +
        "enforcement interval.");
      tbody.prepend(lockRow(lk, removed));
      refresh();
      value.value = "";
      reason.value = "";
      ttl.value = "";
    } catch (e) {
      errors.show(e);
    } finally {
      submit.disabled = false;
    }
  });
}
