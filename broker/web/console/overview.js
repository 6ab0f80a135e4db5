// The audit log page and the dashboard.

import {api, field, h, heading, isoToLocal, localToIso, message, qs, statusBadge,
  timeZone, when} from "./util.js";

const CORE = new Set(["seq", "ts", "event", "prev", "user"]);

function details(ev) {
  const rest = Object.entries(ev).filter(([k]) => !CORE.has(k));
  if (!rest.length) return "";
  return h("dl", {class: "inline"}, rest.map(([k, v]) => [
    h("dt", {}, k),
    h("dd", {}, k === "session_id"
      ? h("a", {href: `#/session/${encodeURIComponent(String(v))}`}, String(v))
      : typeof v === "object" ? JSON.stringify(v) : String(v)),
  ]));
}

function auditTable(items) {
  return h("table", {class: "audit"},
    h("thead", {}, h("tr", {}, h("th", {scope: "col"}, `Time (${timeZone()})`),
      h("th", {scope: "col"}, "Event"), h("th", {scope: "col"}, "User"),
      h("th", {scope: "col"}, "Details"))),
    h("tbody", {}, items.map(auditRow)));
}

function auditRow(ev) {
  return h("tr", {}, h("td", {}, when(ev.ts)), h("td", {}, h("code", {}, ev.event)),
    h("td", {}, ev.user || ""), h("td", {}, details(ev)));
}

export async function auditPage(root, ctx) {
  document.title = "Audit log · bastion-broker";
  const p = ctx.params;
  root.append(heading("Audit log"));
  if (!ctx.isAuditor) {
    root.append(message("error", "The audit log is for auditors."));
    return;
  }
  const inputs = {
    event: h("input", {name: "event", value: p.get("event") || "", spellcheck: "false",
      placeholder: "auth.failure, session.start, sftp.* …"}),
    user: h("input", {name: "user", value: p.get("user") || "", spellcheck: "false"}),
    session: h("input", {name: "session", value: p.get("session") || "", spellcheck: "false"}),
    since: h("input", {type: "datetime-local", name: "since", value: isoToLocal(p.get("since"))}),
    until: h("input", {type: "datetime-local", name: "until", value: isoToLocal(p.get("until"))}),
  };
  const form = h("form", {class: "filters"}, h("div", {class: "grid"},
    field("Event", inputs.event), field("User", inputs.user), field("Session", inputs.session),
    field(`From (${timeZone()})`, inputs.since), field(`To (${timeZone()})`, inputs.until)),
  h("button", {type: "submit"}, "Show"));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const params = {};
    for (const [k, el] of Object.entries(inputs)) {
      params[k] = k === "since" || k === "until" ? localToIso(el.value) : el.value.trim();
    }
    ctx.go("#/audit" + qs(params));
  });
  root.append(form);
  const query = {limit: 100};
  for (const k of Object.keys(inputs)) if (p.get(k)) query[k] = p.get(k);
  const out = h("section", {"aria-label": "Events", "aria-live": "polite"});
  root.append(out);
  const first = await api("GET", "/api/audit" + qs(query));
  if (ctx.stale()) return;
  if (!first.items.length) {
    out.append(message("muted", "No event matches."));
    return;
  }
  const table = auditTable([]);
  const body = table.querySelector("tbody");
  const more = h("button", {type: "button", class: "more"}, "More events");
  const add = (page) => {
    for (const ev of page.items) body.append(auditRow(ev));
    more.hidden = !page.next_cursor;
    more.onclick = async () => {
      more.disabled = true;
      try {
        add(await api("GET", "/api/audit" + qs({...query, cursor: page.next_cursor})));
      } catch (e) {
        out.append(message("error", e.message));
      } finally {
        more.disabled = false;
      }
    };
  };
  out.append(table, more);
  add(first);
}

function card(title, value, link) {
  return h("div", {class: "card"}, h("h2", {}, title),
    h("p", {class: "big"}, link ? h("a", {href: link}, String(value)) : String(value)));
}

function perDayChart(rows) {
  const max = Math.max(1, ...rows.map(([, n]) => Number(n) || 0));
  const list = h("ol", {class: "bars", "aria-label": "Sessions per day"});
  for (const [day, n] of rows) {
    const bar = h("span", {class: "bar"});
    // a CSSOM property, not a style attribute: allowed by style-src 'self'
    bar.style.setProperty("--w", `${Math.round((Number(n) / max) * 100)}%`);
    list.append(h("li", {},
      h("a", {href: "#/sessions" + qs({since: `${day}T00:00:00Z`, until: `${day}T23:59:59Z`})},
        h("span", {class: "day"}, day)), bar, h("span", {class: "n"}, String(n))));
  }
  return list;
}

export async function dashboardPage(root, ctx) {
  document.title = "Dashboard · bastion-broker";
  root.append(heading("Dashboard"));
  const d = await api("GET", "/api/dashboard");
  if (ctx.stale()) return;
  if (d.scope && d.scope !== "all") {
    root.append(h("p", {class: "muted"}, "Your own sessions, logins and grants."));
  }
  root.append(h("div", {class: "cards"},
    card("Live sessions", d.live_sessions, "#/sessions?status=live"),
    card("Failed logins (24 h)", d.failed_logins_24h,
      ctx.isAuditor ? "#/audit?event=auth.failure" : null),
    card("Grants ending within a day", (d.grants_expiring || []).length, null)));
  const days = d.sessions_per_day || [];
  root.append(h("section", {"aria-labelledby": "perday-h"}, h("h2", {id: "perday-h"},
    "Sessions per day (UTC)"), days.length ? perDayChart(days) : message("muted", "No sessions.")));
  const fails = d.recent_failed_logins || [];
  const failSec = h("section", {"aria-labelledby": "fails-h"},
    h("h2", {id: "fails-h"}, "Recent failed logins"));
  failSec.append(fails.length ? auditTable(fails) : message("muted", "None."));
  root.append(failSec);
  const grants = d.grants_expiring || [];
  const gSec = h("section", {"aria-labelledby": "exp-h"}, h("h2", {id: "exp-h"}, "Grants expiring soon"));
  if (!grants.length) {
    gSec.append(message("muted", "None."));
  } else {
    gSec.append(h("table", {}, h("thead", {}, h("tr", {},
      h("th", {scope: "col"}, "Grant"), h("th", {scope: "col"}, "User"),
      h("th", {scope: "col"}, "Stacks"), h("th", {scope: "col"}, "Level"),
      h("th", {scope: "col"}, "State"), h("th", {scope: "col"}, `Ends (${timeZone()})`),
      h("th", {scope: "col"}, "Ticket"))),
    h("tbody", {}, grants.map((g) => h("tr", {},
      h("td", {}, h("a", {href: "#/sessions" + qs({grant: g.id})}, g.id)),
      h("td", {}, `${g.user}${g.domain ? "@" + g.domain : ""}`),
      h("td", {}, (g.stacks || []).join(", ")), h("td", {}, g.level),
      h("td", {}, statusBadge(g.state)), h("td", {}, when(g.expires_at)),
      h("td", {}, g.ticket || ""))))));
  }
  root.append(gSec);
  if (ctx.isAuditor) root.append(await bastionsSection(ctx));
}

// The fleet as its heartbeats say (GET /api/bastions): a lost bastion's open sessions are
// closed by the others; its recordings stay on its own disk.
async function bastionsSection(ctx) {
  const sec = h("section", {"aria-labelledby": "bastions-h"}, h("h2", {id: "bastions-h"}, "Bastions"));
  const rows = await api("GET", "/api/bastions");
  if (ctx.stale() || !rows.length) {
    sec.append(message("muted", "No heartbeat yet."));
    return sec;
  }
  sec.append(h("table", {class: "bastions"}, h("thead", {}, h("tr", {},
    h("th", {scope: "col"}, "Bastion"), h("th", {scope: "col"}, "State"),
    h("th", {scope: "col"}, `Last heartbeat (${timeZone()})`),
    h("th", {scope: "col"}, `Up since (${timeZone()})`), h("th", {scope: "col"}, "Open sessions"))),
  h("tbody", {}, rows.map((b) => h("tr", {},
    h("td", {}, b.name, b.this ? h("span", {class: "muted"}, " (this one)") : null),
    h("td", {}, statusBadge(b.state)), h("td", {}, when(b.seen_at)),
    h("td", {}, when(b.started_at)), h("td", {}, String(b.live_sessions)))))));
  return sec;
}
