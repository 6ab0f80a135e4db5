// Access requests: the request form, the caller's requests and grants, the approvers' queue and
// a grant's page with its history. The API decides everything (who may request for whom, the
// inventory check, four eyes, two approvers for admin access); these pages show what it says,
// next to the field it names.

import {api, ApiError, clear, field, h, heading, isoToLocal, localToIso, message, qs,
  statusBadge, timeZone, when} from "./util.js";

const TRIGGERS = ["service-request", "incident", "change-request", "patch", "deployment",
  "problem", "alert"];
const LEVELS = [["read-only", "Read-only"], ["admin", "Admin (read/write)"]];
const STATES = ["", "pending", "active", "approved", "expired", "revoked", "rejected", "withdrawn"];
const OTHER = "\u0000other"; // the VPC select's "another VPC" option

export function grantHref(id) {
  return `#/grant/${encodeURIComponent(id)}`;
}

function errorText(e) {
  return e instanceof ApiError ? e.message : String(e && e.message ? e.message : e);
}

/** "active" for an approved grant inside its window, the API's state otherwise. */
function shownState(g) {
  return g.state === "approved" && g.active ? "active" : g.state;
}

function splitUser(full) {
  const at = String(full || "").lastIndexOf("@");
  return at < 0 ? [full || "", ""] : [full.slice(0, at), full.slice(at + 1)];
}

function isApprover(ctx) {
  const roles = new Set(ctx.me ? ctx.me.roles : []);
  return roles.has("approver") || roles.has("admin");
}

function mine(g, ctx) {
  const me = String(ctx.me.user).toLowerCase();
  return `${g.user}@${g.domain}`.toLowerCase() === me || String(g.requested_by).toLowerCase() === me;
}

function grantee(g, ctx) {
  return `${g.user}@${g.domain}`.toLowerCase() === String(ctx.me.user).toLowerCase();
}

let errorSeq = 0;

/** Field errors: the API names the field at fault (detail.field); the message goes next to it,
 * the control is marked invalid and focused, and the form's live status repeats it. */
export class FormErrors {
  constructor(status) {
    this.status = status;
    this.fields = new Map();
    this.marked = [];
  }

  add(names, wrapper, control) {
    const slot = h("p", {class: "field-error", id: `err${++errorSeq}`, hidden: true});
    wrapper.append(slot);
    for (const n of [].concat(names)) this.fields.set(n, {control, slot});
    return wrapper;
  }

  clear() {
    clear(this.status);
    for (const {slot} of this.fields.values()) {
      slot.hidden = true;
      slot.textContent = "";
    }
    for (const el of this.marked) {
      el.removeAttribute("aria-invalid");
      el.removeAttribute("aria-describedby");
    }
    this.marked = [];
  }

  show(e) {
    this.clear();
    const text = errorText(e);
    const at = e instanceof ApiError && e.field ? this.fields.get(e.field) : null;
    if (at) {
      // the control the value came from (a function when that depends on the form's state)
      const control = typeof at.control === "function" ? at.control() : at.control;
      at.slot.textContent = text;
      at.slot.hidden = false;
      control.setAttribute("aria-invalid", "true");
      control.setAttribute("aria-describedby", at.slot.id);
      this.marked.push(control);
      control.focus();
    }
    this.status.append(message("error", at ? `${text} (field: ${e.field})` : text));
  }

  ok(...content) {
    this.clear();
    this.status.append(h("p", {class: "ok", role: "status"}, ...content));
  }
}

export function liveStatus() {
  return h("div", {class: "form-status", "aria-live": "polite"});
}

/** ``open`` shows the inline ``form`` (focus on ``first``) in its place; Cancel puts it back. */
export function revealForm(open, form, cancel, first, errors) {
  open.addEventListener("click", () => {
    form.hidden = false;
    open.hidden = true;
    first().focus();
  });
  cancel.addEventListener("click", () => {
    form.hidden = true;
    open.hidden = false;
    errors.clear();
    open.focus();
  });
}

function dl(pairs) {
  return h("dl", {class: "facts"}, pairs.filter(([, v]) => v !== null && v !== undefined && v !== "")
    .map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

function approvalsText(g, policy) {
  const n = (g.approved_by || []).length;
  const two = g.level === "admin" && policy && policy.two_approvers_for_admin;
  if (g.state === "pending" && (n > 0 || two)) {
    return `${n} of 2 approvals` + (n ? ` (${g.approved_by.join(", ")})` : "");
  }
  return n ? g.approved_by.join(", ") : "—";
}

function pendingUntil(g, policy) {
  if (g.state !== "pending" || !g.created_at || !policy) return null;
  const t = new Date(g.created_at).getTime() + policy.pending_expire_hours * 3600e3;
  return when(new Date(t).toISOString());
}

async function loadPolicy() {
  try {
    return (await api("GET", "/api/inventory/scopes")).policy;
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) throw e;
    return null;
  }
}

// -- the request form ---------------------------------------------------------------------------

export async function requestPage(root, ctx) {
  document.title = "Request access · bastion-broker";
  root.append(heading("Request access"));
  const inv = await api("GET", "/api/inventory/scopes");
  if (ctx.stale()) return;
  const policy = inv.policy;
  const [myUser, myDomain] = splitUser(ctx.me.user);
  const status = liveStatus();
  const errors = new FormErrors(status);

  const boxes = inv.stacks.map((s) => h("input", {type: "checkbox", name: "stack", value: s.id}));
  const otherStacks = h("input", {name: "other_stacks", spellcheck: "false",
    autocapitalize: "none", autocomplete: "off"});
  const vpcSelect = h("select", {name: "vpc"});
  const vpcOther = h("input", {name: "vpc_other", spellcheck: "false", autocapitalize: "none",
    autocomplete: "off", placeholder: "vpc-0abc123"});
  const vpcOtherField = field("Other VPC ID", vpcOther);
  const stacksSet = h("fieldset", {class: "stacks"}, h("legend", {}, "Stacks"),
    inv.checked && inv.stacks.length ? h("div", {class: "choices"}, inv.stacks.map((s, i) =>
      h("label", {class: "check"}, boxes[i], " ", s.id,
        h("span", {class: "muted small"}, ` (VPC ${s.vpcs.join(", ")})`))))
      : h("p", {class: "muted"}, inv.checked ? "The inventory lists no stacks now." :
        "No inventory is configured: name the stacks below."),
    field(inv.checked ? "Other stack IDs" : "Stack IDs", otherStacks,
      "separated by spaces or commas; the API checks them against the inventory"));
  errors.add("stacks", stacksSet, boxes[0] || otherStacks);

  const chosenStacks = () => {
    const typed = otherStacks.value.split(/[\s,]+/).filter(Boolean);
    return [...boxes.filter((b) => b.checked).map((b) => b.value), ...typed];
  };
  const fillVpcs = () => {
    const before = vpcSelect.value;
    const ids = new Set(boxes.filter((b) => b.checked).map((b) => b.value));
    const vpcs = [...new Set(inv.stacks.filter((s) => ids.has(s.id)).flatMap((s) => s.vpcs))].sort();
    clear(vpcSelect);
    if (!vpcs.length) vpcSelect.append(h("option", {value: ""}, "choose a stack first"));
    for (const v of vpcs) vpcSelect.append(h("option", {value: v}, v));
    vpcSelect.append(h("option", {value: OTHER}, "another VPC…"));
    if ([...vpcSelect.options].some((o) => o.value === before)) vpcSelect.value = before;
    vpcOtherField.hidden = vpcSelect.value !== OTHER;
  };
  for (const b of boxes) b.addEventListener("change", fillVpcs);
  vpcSelect.addEventListener("change", () => {
    vpcOtherField.hidden = vpcSelect.value !== OTHER;
    if (!vpcOtherField.hidden) vpcOther.focus();
  });
  fillVpcs();
  const vpcField = h("div", {class: "vpc"}, field("VPC", vpcSelect,
    "the VPCs of the stacks chosen"), vpcOtherField);
  errors.add("vpc", vpcField, () => (vpcSelect.value === OTHER ? vpcOther : vpcSelect));

  const user = h("input", {name: "user", value: myUser, spellcheck: "false",
    autocapitalize: "none", autocomplete: "off"});
  const domain = h("input", {name: "domain", value: myDomain, spellcheck: "false",
    autocapitalize: "none", autocomplete: "off"});
  const levelRadios = LEVELS.map(([v]) => h("input", {type: "radio", name: "level", value: v,
    checked: v === "read-only"}));
  const levelSet = h("fieldset", {class: "level"}, h("legend", {}, "Level"),
    h("div", {class: "choices"}, LEVELS.map(([v, label], i) => {
      const max = policy.max_hours[v];
      return h("label", {class: "check"}, levelRadios[i], " ", label,
        max ? h("span", {class: "muted small"}, ` (at most ${max} h)`) : null);
    })),
    policy.two_approvers_for_admin ? h("p", {class: "muted small"},
      "Admin access needs two approvers.") : null);
  errors.add("level", levelSet, levelRadios[0]);
  const trigger = h("select", {name: "trigger"}, TRIGGERS.map((t) => h("option", {value: t}, t)));
  const ticket = h("input", {name: "ticket", autocomplete: "off"});
  const reason = h("textarea", {name: "reason", rows: "3"});
  const hours = h("input", {name: "hours", type: "number", min: "0.25", step: "any",
    value: String(policy.default_hours || 8), inputmode: "decimal"});
  const submit = h("button", {type: "submit"}, "Request access");

  const named = (name, label, control, hint) => errors.add(name, field(label, control, hint), control);
  const form = h("form", {class: "request", novalidate: true, "aria-labelledby": "req-h"},
    h("h2", {id: "req-h", class: "visually-hidden"}, "Request"),
    stacksSet, vpcField,
    h("div", {class: "row align-top"},
      named("user", "AD user", user, "yourself by default; for others, the API needs the approver role"),
      named("domain", "AD domain (FQDN)", domain)),
    levelSet,
    h("div", {class: "row align-top"},
      named("trigger", "Trigger", trigger),
      named("ticket", "Ticket", ticket, "e.g. INC-1234 or CHG-42"),
      named("hours", "Hours", hours, `from approval; default ${policy.default_hours} h`)),
    named("reason", "Reason", reason, "what you will do; approvers read it"),
    h("p", {class: "muted small"}, `Undecided requests expire after ${policy.pending_expire_hours} h.`),
    h("div", {class: "actions"}, submit), status);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    errors.clear();
    const level = levelRadios.find((r) => r.checked);
    const body = {
      user: user.value.trim(), domain: domain.value.trim(), stacks: chosenStacks(),
      vpc: vpcSelect.value === OTHER ? vpcOther.value.trim() : vpcSelect.value,
      level: level ? level.value : "read-only", trigger: trigger.value,
      ticket: ticket.value, reason: reason.value,
    };
    const n = Number(hours.value);
    if (hours.value !== "") body.hours = Number.isFinite(n) ? n : hours.value;
    submit.disabled = true;
    try {
      const g = await api("POST", "/api/grants", body);
      errors.ok(g.state === "pending" ? "Requested: " : "Granted at once: ",
        h("a", {href: grantHref(g.id)}, g.id), ` (${shownState(g)}). `,
        h("a", {href: "#/access"}, "My requests and grants"));
      ticket.value = "";
      reason.value = "";
    } catch (e) {
      errors.show(e);
    } finally {
      submit.disabled = false;
    }
  });
  root.append(form);
}

// -- my requests and grants ---------------------------------------------------------------------

/** A button that opens a small inline form (comment, maybe a time) and runs ``act`` with it. */
function inlineAction(label, opts, act) {
  const wrap = h("span", {class: "inline-action"});
  const open = h("button", {type: "button", class: opts.danger ? "danger" : "secondary"}, label);
  const status = liveStatus();
  const errors = new FormErrors(status);
  const comment = h("input", {name: "comment", autocomplete: "off"});
  const until = opts.until ? h("input", {name: "until", type: "datetime-local",
    value: isoToLocal(opts.until)}) : null;
  const go = h("button", {type: "submit", class: opts.danger ? "danger" : null},
    opts.confirm || label);
  const cancel = h("button", {type: "button", class: "secondary"}, "Cancel");
  const form = h("form", {class: "inline-form", hidden: true, novalidate: true,
    "aria-label": opts.what || label},
  until ? errors.add("until", field(`New end (${timeZone()})`, until), until) : null,
  errors.add("comment", field(opts.commentLabel || "Comment", comment,
    opts.commentRequired ? "required" : "optional"), comment),
  h("div", {class: "actions"}, go, cancel));
  revealForm(open, form, cancel, () => until || comment, errors);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    errors.clear();
    go.disabled = true;
    try {
      const arg = {comment: comment.value};
      if (until) arg.until = localToIso(until.value) || until.value;
      const text = await act(arg);
      form.hidden = true;
      open.hidden = false;
      errors.ok(text);
    } catch (e) {
      errors.show(e);
    } finally {
      go.disabled = false;
    }
  });
  wrap.append(open, form, status);
  return wrap;
}

function grantActions(g, ctx, done) {
  const out = [];
  const path = `/api/grants/${encodeURIComponent(g.id)}`;
  const state = g.state;
  if (state === "pending" && mine(g, ctx)) {
    out.push(inlineAction("Withdraw", {what: `Withdraw ${g.id}`, confirm: "Withdraw request"},
      async ({comment}) => {
        const r = await api("POST", path + "/withdraw", {comment});
        done(r);
        return `${r.id} withdrawn.`;
      }));
  }
  if (state === "approved" && isApprover(ctx)) {
    out.push(inlineAction("Change end", {what: `Change the end of ${g.id}`, until: g.expires_at,
      confirm: "Save end time"}, async ({comment, until}) => {
      const r = await api("POST", path + "/extend", {until, comment});
      done(r);
      return h("span", {}, `${r.id} now ends `, when(r.expires_at), ".");
    }));
  }
  if ((state === "approved" && (grantee(g, ctx) || isApprover(ctx))) ||
      (state === "pending" && isApprover(ctx) && !mine(g, ctx))) {
    out.push(inlineAction("Revoke", {what: `Revoke ${g.id}`, danger: true,
      confirm: "Revoke now"}, async ({comment}) => {
      const r = await api("POST", path + "/revoke", {comment});
      done(r);
      return `${r.id} revoked.`;
    }));
  }
  return out;
}

export async function accessPage(root, ctx) {
  document.title = "My requests and grants · bastion-broker";
  const everyone = ctx.params.get("who") === "all" && isApprover(ctx);
  root.append(heading(everyone ? "Requests and grants" : "My requests and grants"),
    h("p", {}, h("a", {href: "#/request", class: "button"}, "Request access")));
  const state = ctx.params.get("state") || "";
  const who = h("select", {name: "who"}, h("option", {value: ""}, "mine"),
    h("option", {value: "all", selected: everyone}, "everyone's"));
  const stateSel = h("select", {name: "state"}, STATES.map((s) =>
    h("option", {value: s, selected: s === state}, s || "any")));
  const filter = h("form", {class: "row filters", role: "search"},
    isApprover(ctx) ? field("Whose", who) : null, field("State", stateSel),
    h("button", {type: "submit"}, "Show"));
  filter.addEventListener("submit", (ev) => {
    ev.preventDefault();
    ctx.go("#/access" + qs({who: who.value, state: stateSel.value}));
  });
  root.append(filter);
  const [myUser] = splitUser(ctx.me.user);
  const rows = await api("GET", "/api/grants" + qs({user: everyone ? "" : myUser, state,
    limit: 200}));
  if (ctx.stale()) return;
  const results = h("section", {"aria-label": "Requests and grants", "aria-live": "polite"});
  root.append(results);
  if (!rows.length) {
    results.append(h("p", {class: "muted"}, "No requests or grants."));
    return;
  }
  rows.sort((a, b) => String(b.created_at || b.starts_at).localeCompare(String(a.created_at || a.starts_at)));
  const tbody = h("tbody");
  const render = (g) => h("tr", {"data-grant": g.id},
    h("td", {}, h("a", {href: grantHref(g.id)}, g.id), h("div", {class: "muted small"},
      when(g.created_at))),
    everyone ? h("td", {}, `${g.user}@${g.domain}`) : null,
    h("td", {}, (g.stacks || []).join(", "), h("div", {class: "muted small"}, g.vpc)),
    h("td", {}, g.level),
    h("td", {}, statusBadge(shownState(g))),
    h("td", {}, when(g.starts_at), h("div", {}, "until ", when(g.expires_at))),
    h("td", {}, g.ticket),
    h("td", {class: "actions-cell"}, grantActions(g, ctx, (r) => {
      const tr = tbody.querySelector(`tr[data-grant="${CSS.escape(g.id)}"]`);
      // the row shows the new state; the action's own message stays in the old row's place
      setTimeout(() => tr && tr.replaceWith(render(r)), 1500);
    })));
  for (const g of rows) tbody.append(render(g));
  results.append(h("table", {class: "grants"},
    h("thead", {}, h("tr", {},
      h("th", {scope: "col"}, "Request"), everyone ? h("th", {scope: "col"}, "User") : null,
      h("th", {scope: "col"}, "Stacks / VPC"), h("th", {scope: "col"}, "Level"),
      h("th", {scope: "col"}, "State"), h("th", {scope: "col"}, `Valid (${timeZone()})`),
      h("th", {scope: "col"}, "Ticket"), h("th", {scope: "col"}, "Actions"))),
    tbody));
}

// -- the approvers' queue -----------------------------------------------------------------------

function decisionForm(g, ctx, onDone) {
  const status = liveStatus();
  const errors = new FormErrors(status);
  const comment = h("textarea", {name: "comment", rows: "2"});
  const approve = h("button", {type: "button"}, "Approve");
  const reject = h("button", {type: "button", class: "danger"}, "Reject");
  const form = h("form", {class: "decision", novalidate: true, "aria-label": `Decide ${g.id}`},
    errors.add("comment", field("Comment", comment, "shown in the history; required to reject"),
      comment),
    h("div", {class: "actions"}, approve, reject), status);
  const decide = async (verb) => {
    errors.clear();
    approve.disabled = reject.disabled = true;
    try {
      const r = await api("POST", `/api/grants/${encodeURIComponent(g.id)}/${verb}`,
        {comment: comment.value});
      comment.value = "";
      onDone(r, verb);
      if (verb === "reject") errors.ok(`${r.id} rejected.`);
      else if (r.state === "pending") {
        errors.ok(`Your approval is recorded: ${(r.approved_by || []).length} of 2 approvals.`);
      } else errors.ok(h("span", {}, `${r.id} approved, valid until `, when(r.expires_at), "."));
    } catch (e) {
      errors.show(e);
    } finally {
      approve.disabled = reject.disabled = false;
    }
  };
  approve.addEventListener("click", () => decide("approve"));
  reject.addEventListener("click", () => decide("reject"));
  form.addEventListener("submit", (ev) => ev.preventDefault());
  return form;
}

function requestFacts(g, ctx, policy, first = []) {
  const forOther = `${g.user}@${g.domain}`.toLowerCase() !== String(g.requested_by).toLowerCase();
  return dl([...first,
    ["Requester", g.requested_by + (forOther ? ` for ${g.user}@${g.domain}` : "")],
    ["Stacks", (g.stacks || []).join(", ")], ["VPC", g.vpc],
    ["Level", h("span", {class: g.level === "admin" ? "level-admin" : null}, g.level)],
    ["Trigger", g.trigger], ["Ticket", g.ticket],
    ["Reason", h("span", {class: "reason"}, g.reason)],
    ["Requested at", when(g.created_at)],
    ["Window", h("span", {}, when(g.starts_at), " – ", when(g.expires_at))],
    ["Pending until", pendingUntil(g, policy)],
    ["Approvals", h("span", {class: "approvals"}, approvalsText(g, policy))],
  ]);
}

export async function approvalsPage(root, ctx) {
  document.title = "Approvals · bastion-broker";
  root.append(heading("Approvals"));
  if (!isApprover(ctx)) {
    root.append(message("error", "The approval queue is for approvers and admins."));
    return;
  }
  const [rows, policy] = await Promise.all([api("GET", "/api/grants?state=pending&limit=500"),
    loadPolicy()]);
  if (ctx.stale()) return;
  const list = h("section", {"aria-label": "Pending requests", "aria-live": "polite"});
  root.append(h("p", {class: "muted"}, "Requests waiting for a decision, oldest first. " +
    "Nobody approves their own admin request" +
    (policy && policy.two_approvers_for_admin ? "; admin access needs two approvers." : ".")), list);
  if (!rows.length) {
    list.append(h("p", {class: "muted"}, "No request is waiting."));
    return;
  }
  rows.sort((a, b) => String(a.created_at).localeCompare(String(b.created_at)));
  for (const g of rows) {
    const facts = h("div", {}, requestFacts(g, ctx, policy));
    const card = h("article", {class: "request-card", "data-grant": g.id,
      "aria-labelledby": `req-${g.id}`},
    h("h2", {id: `req-${g.id}`}, h("a", {href: grantHref(g.id)}, g.id), " ",
      statusBadge(g.state), g.level === "admin" ? statusBadge("admin") : null,
      mine(g, ctx) ? h("span", {class: "muted small"}, " your own request") : null),
    facts);
    card.append(decisionForm(g, ctx, (r) => {
      clear(facts).append(requestFacts(r, ctx, policy));
      card.querySelector("h2 .badge").replaceWith(statusBadge(shownState(r)));
    }));
    list.append(card);
  }
}

// -- one grant, with its history ----------------------------------------------------------------

const TIME_RE = /^\d{4}-\d\d-\d\dT\d\d:\d\d/;

function value(v) {
  if (v === null || v === undefined || v === "") return h("span", {class: "muted"}, "—");
  if (Array.isArray(v)) return v.length ? v.join(", ") : h("span", {class: "muted"}, "none");
  if (typeof v === "string" && TIME_RE.test(v)) return when(v);
  if (typeof v === "object") return JSON.stringify(v);
  return String(v);
}

function changesList(details) {
  const entries = Object.entries(details || {});
  if (!entries.length) return null;
  return h("ul", {class: "changes"}, entries.map(([k, v]) => {
    if (v && typeof v === "object" && !Array.isArray(v) && ("before" in v || "after" in v)) {
      return h("li", {}, h("span", {class: "field-name"}, k), ": ", value(v.before), " → ",
        value(v.after));
    }
    return h("li", {}, h("span", {class: "field-name"}, k), ": ", value(v));
  }));
}

export async function grantPage(root, id, ctx) {
  document.title = `Grant ${id} · bastion-broker`;
  root.append(heading(`Grant ${id}`));
  const [g, policy] = await Promise.all([api("GET", `/api/grants/${encodeURIComponent(id)}`),
    loadPolicy()]);
  if (ctx.stale()) return;
  const reload = () => ctx.go(location.hash);
  const summary = h("section", {"aria-label": "Grant", class: "summary"},
    requestFacts(g, ctx, policy, [["State", statusBadge(shownState(g))],
      ["User", `${g.user}@${g.domain}`]]));
  root.append(summary);
  const actions = h("section", {"aria-labelledby": "actions-h", class: "grant-actions"},
    h("h2", {id: "actions-h"}, "Actions"));
  const after = (r) => setTimeout(reload, 1200);
  if (g.state === "pending" && isApprover(ctx)) actions.append(decisionForm(g, ctx, after));
  const more = grantActions(g, ctx, after);
  if (more.length) actions.append(h("div", {class: "actions"}, more));
  if (g.state === "approved" && !isApprover(ctx)) {
    actions.append(h("p", {class: "muted small"}, "Extending or shortening a grant is an " +
      "approver's decision: ask one, or request again."));
  }
  if (actions.children.length > 1) root.append(actions);
  const hist = g.history || [];
  root.append(h("section", {"aria-labelledby": "hist-h", class: "history"},
    h("h2", {id: "hist-h"}, "History"),
    hist.length ? h("ol", {class: "timeline"}, hist.map((e) => h("li", {},
      when(e.at), " ", h("strong", {class: "action"}, e.action), " by ",
      h("span", {class: "actor"}, e.actor),
      e.state ? h("span", {class: "muted"}, ` → ${e.state}`) : null,
      e.comment ? h("q", {}, e.comment) : null,
      changesList(e.details)))) : h("p", {class: "muted"}, "No history.")));
  if (g.state === "approved" || g.state === "expired" || g.state === "revoked") {
    root.append(h("p", {}, h("a", {href: "#/sessions" + qs({grant: g.id})},
      "Sessions under this grant")));
  }
}
