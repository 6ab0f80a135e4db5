// Session search (filters, text search with hits, keyset "more") and the session page (replay,
// integrity, file operations, tunnel metadata, jump children, grant and its approvals).

import {api, bytes, clear, clock, duration, field, h, heading, isoToLocal, localToIso, message,
  qs, statusBadge, timeZone, when} from "./util.js";
import {mountReplay} from "./replay.js";
import {endSessionPanel} from "./locks.js";

const KINDS = ["", "shell", "exec", "subsystem", "tunnel", "jump"];
const STATUSES = ["", "live", "ok", "failed"];
const FILTERS = ["q", "user", "target", "stack", "kind", "status", "since", "until", "grant",
  "ticket", "trigger", "parent"];
const PAGE = 50;

function sessionHref(id, extra = {}) {
  return `#/session/${encodeURIComponent(id)}${qs(extra)}`;
}

function select(name, values, current, labels = {}) {
  return h("select", {name}, values.map((v) =>
    h("option", {value: v, selected: v === current}, labels[v] || v || "any")));
}

function targetText(s) {
  return s.target_name && s.target_name !== s.target ? `${s.target_name} (${s.target})`
    : (s.target || "—");
}

function statusCell(s) {
  const title = s.outcome || s.exit_status || null;
  return h("td", {}, statusBadge(s.status, title),
    s.status !== "live" && s.outcome ? h("span", {class: "muted small"}, " ", s.outcome) : null);
}

function hitsList(s, q) {
  if (!s.hits || !s.hits.length) return null;
  return h("ul", {class: "hits"}, s.hits.map((hit) => h("li", {},
    h("a", {href: sessionHref(s.id, {q, t: hit.t.toFixed(3)})}, clock(hit.t)), " ",
    h("span", {class: "source"}, hit.source), " ",
    h("code", {class: "snippet"}, hit.snippet))));
}

/** One table row per session (search results, jump children). */
export function sessionRow(s, q) {
  return h("tr", {},
    h("td", {}, h("a", {href: sessionHref(s.id, q ? {q} : {})}, when(s.started_at))),
    h("td", {}, s.user),
    h("td", {}, targetText(s), s.stack ? h("div", {class: "muted small"}, s.stack) : null),
    h("td", {}, s.kind, s.command ? h("div", {class: "muted small cmd"}, s.command) : null),
    h("td", {class: "num"}, s.status === "live" ? "live" : duration(s.duration_s)),
    statusCell(s),
    h("td", {}, hitsList(s, q)));
}

function sessionTable(rows, caption) {
  return h("table", {class: "sessions"},
    caption ? h("caption", {}, caption) : null,
    h("thead", {}, h("tr", {},
      h("th", {scope: "col"}, `Start (${timeZone()})`), h("th", {scope: "col"}, "User"),
      h("th", {scope: "col"}, "Target"), h("th", {scope: "col"}, "Kind"),
      h("th", {scope: "col"}, "Duration"), h("th", {scope: "col"}, "Status"),
      h("th", {scope: "col"}, "Matches"))),
    h("tbody", {}, rows));
}

export async function sessionsPage(root, ctx) {
  document.title = "Sessions · bastion-broker";
  const p = ctx.params;
  const inputs = {
    q: h("input", {type: "search", name: "q", value: p.get("q") || "",
      placeholder: "words the session printed or typed"}),
    user: h("input", {name: "user", value: p.get("user") || "", spellcheck: "false"}),
    target: h("input", {name: "target", value: p.get("target") || "", spellcheck: "false"}),
    stack: h("input", {name: "stack", value: p.get("stack") || "", spellcheck: "false"}),
    kind: select("kind", KINDS, p.get("kind") || ""),
    status: select("status", STATUSES, p.get("status") || "",
      {live: "live", ok: "ended well", failed: "failed"}),
    since: h("input", {type: "datetime-local", name: "since", value: isoToLocal(p.get("since"))}),
    until: h("input", {type: "datetime-local", name: "until", value: isoToLocal(p.get("until"))}),
    grant: h("input", {name: "grant", value: p.get("grant") || "", spellcheck: "false"}),
    ticket: h("input", {name: "ticket", value: p.get("ticket") || ""}),
    trigger: h("input", {name: "trigger", value: p.get("trigger") || ""}),
  };
  const top = h("input", {type: "checkbox", name: "top", checked: p.get("top") !== "0"});
  const form = h("form", {class: "filters", role: "search"},
    h("div", {class: "row"}, field("Text", inputs.q), h("button", {type: "submit"}, "Search")),
    h("details", {open: FILTERS.slice(1).some((k) => p.get(k)) || null},
      h("summary", {}, "Filters"),
      h("div", {class: "grid"},
        ctx.isAuditor ? field("User", inputs.user) : null,
        field("Target (name or id)", inputs.target), field("Stack", inputs.stack),
        field("Kind", inputs.kind), field("Status", inputs.status),
        field(`From (${timeZone()})`, inputs.since), field(`To (${timeZone()})`, inputs.until),
        field("Grant", inputs.grant), field("Ticket", inputs.ticket),
        field("Trigger", inputs.trigger),
        h("div", {class: "field check"}, h("label", {}, top,
          " Connections only (jump sessions under their connection)")))));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const params = {};
    for (const [k, el] of Object.entries(inputs)) {
      params[k] = k === "since" || k === "until" ? localToIso(el.value) : el.value.trim();
    }
    if (p.get("parent")) params.parent = p.get("parent");
    if (!top.checked) params.top = "0";
    ctx.go("#/sessions" + qs(params));
  });
  root.append(heading("Sessions"), form);
  if (!ctx.isAuditor) {
    root.append(h("p", {class: "muted"}, "You see your own sessions."));
  }

  const limit = Number(p.get("limit"));
  const query = {limit: Number.isInteger(limit) && limit > 0 && limit <= 200 ? limit : PAGE};
  for (const k of FILTERS) if (p.get(k)) query[k] = p.get(k);
  if (p.get("top") !== "0" && !p.get("parent")) query.top = 1;
  const results = h("section", {"aria-label": "Results", "aria-live": "polite"});
  root.append(results);
  results.append(message("muted", "Searching…"));
  const first = await api("GET", "/api/sessions" + qs(query));
  if (ctx.stale()) return;
  clear(results);
  if (!first.items.length) {
    results.append(message("muted", "No session matches."));
    return;
  }
  const tbody = sessionTable([], null);
  const rows = tbody.querySelector("tbody");
  results.append(tbody);
  const more = h("button", {type: "button", class: "more"}, "More sessions");
  const addPage = (page) => {
    for (const s of page.items) rows.append(sessionRow(s, p.get("q") || ""));
    if (page.next_cursor) {
      more.hidden = false;
      more.onclick = async () => {
        more.disabled = true;
        try {
          addPage(await api("GET", "/api/sessions" + qs({...query, cursor: page.next_cursor})));
        } catch (e) {
          results.append(message("error", e.message));
        } finally {
          more.disabled = false;
        }
      };
    } else {
      more.hidden = true;
    }
  };
  results.append(more);
  addPage(first);
}

// -- the session page -------------------------------------------------------------------------

const INTEGRITY = {
  verified: ["ok", "Recording verified",
    "The signed manifest matches the recording's size and SHA-256, and the signature is the bastion's."],
  failed: ["bad", "Integrity check FAILED",
    "The recording or its manifest does not match what was sealed: treat this replay as untrusted."],
  unsealed: ["warn", "Not sealed",
    "The session is live, or its manifest was never written (the broker stopped mid-session)."],
  "not recorded": ["muted", "Not recorded",
    "This kind of session keeps no recording (a tunnel's payload is not stored)."],
};

function integrityBanner(integ) {
  const status = (integ && integ.status) || "not recorded";
  const [cls, title, text] = INTEGRITY[status] || ["warn", status, ""];
  const box = h("section", {class: `integrity ${cls}`, role: status === "failed" ? "alert" : null,
    "aria-label": "Integrity", "data-status": status},
  h("h2", {}, title), h("p", {}, text));
  const errors = (integ && integ.errors) || [];
  if (errors.length) {
    box.append(h("ul", {}, errors.map((e) => h("li", {},
      h("code", {}, e.code || "error"), " ", e.message || ""))));
  }
  const warnings = (integ && integ.warnings) || [];
  if (warnings.length) {
    box.append(h("ul", {class: "warnings"}, warnings.map((w) => h("li", {},
      typeof w === "string" ? w : `${w.code || "warning"}: ${w.message || ""}`))));
  }
  return box;
}

function dl(pairs) {
  return h("dl", {class: "facts"}, pairs.filter(([, v]) => v !== undefined && v !== null && v !== "")
    .map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

function offsetFrom(startIso, iso) {
  const t = (new Date(iso) - new Date(startIso)) / 1000;
  return Number.isFinite(t) ? t : null;
}

function filesSection(s) {
  const files = s.files || [];
  const sec = h("section", {"aria-labelledby": "files-h"}, h("h2", {id: "files-h"}, "File operations"));
  if (!files.length) {
    sec.append(h("p", {class: "muted"}, "No file operations (SFTP and scp) in this session."));
    return sec;
  }
  const shown = files.filter((e) => e.event !== "sftp.summary");
  sec.append(h("ol", {class: "timeline"}, shown.map((e) => {
    const at = offsetFrom(s.started_at, e.ts);
    const op = String(e.event || "").replace(/^sftp\./, "");
    const what = [e.path, e.target_path || e.new_path || e.newpath].filter(Boolean).join(" → ");
    return h("li", {class: `op op-${op}`},
      h("span", {class: "at"}, at === null ? "" : `+${clock(at)}`), " ",
      h("strong", {}, op), " ", h("code", {}, what || "—"),
      e.transfer ? h("span", {class: "badge"}, e.transfer) : null,
      e.size !== undefined ? h("span", {class: "muted"}, " ", bytes(e.size)) : null,
      e.status && e.status !== "ok" ? h("span", {class: "badge status-failed"}, e.status) : null,
      e.sha256 ? h("div", {class: "sha"}, "SHA-256 ", h("code", {}, e.sha256)) : null);
  })));
  const summary = files.find((e) => e.event === "sftp.summary");
  if (summary) {
    const counts = Object.entries(summary).filter(([k]) =>
      !["seq", "ts", "event", "prev", "session", "user", "session_id"].includes(k));
    sec.append(h("p", {class: "muted small"}, "Summary: ",
      counts.map(([k, v]) => `${k} ${typeof v === "object" ? JSON.stringify(v) : v}`).join(", ")));
  }
  return sec;
}

function grantSection(s) {
  const g = s.grant;
  const sec = h("section", {"aria-labelledby": "grant-h"}, h("h2", {id: "grant-h"}, "Grant"));
  if (!g) {
    sec.append(h("p", {class: "muted"}, s.grant_id ? `Grant ${s.grant_id} (not visible)` : "No grant."));
    return sec;
  }
  sec.append(dl([
    ["Grant", h("code", {}, g.id)], ["State", statusBadge(g.state)], ["Level", g.level],
    ["User", `${g.user}@${g.domain}`], ["Stacks", (g.stacks || []).join(", ")],
    ["Trigger", g.trigger], ["Ticket", g.ticket], ["Reason", g.reason],
    ["Requested by", g.requested_by],
    ["Approved by", (g.approved_by || []).join(", ") || "—"],
    ["Valid", h("span", {}, when(g.starts_at), " – ", when(g.expires_at))],
  ]));
  const hist = s.grant_history || g.history || [];
  if (hist.length) {
    sec.append(h("h3", {}, "Requests and approvals"), h("ol", {class: "timeline"}, hist.map((e) =>
      h("li", {}, when(e.at), " ", h("strong", {}, e.action), " by ", e.actor,
        e.state ? h("span", {class: "muted"}, ` → ${e.state}`) : null,
        e.comment ? h("q", {}, e.comment) : null))));
  }
  return sec;
}

/** A tunnel's protocol events from the audit log (tunnel.rdp: what the RDP client announced and
 * the server chose), for those who may read the log. */
async function tunnelEvents(s, into) {
  let page;
  try {
    page = await api("GET", "/api/audit" + qs({session: s.id, event: "tunnel.*", limit: 50}));
  } catch (e) {
    return;
  }
  if (!page.items.length) return;
  into.append(h("h3", {}, "Protocol"), h("ul", {class: "tunnel-events"}, page.items.map((ev) =>
    h("li", {}, h("code", {}, ev.event), " ", when(ev.ts), " ", Object.entries(ev)
      .filter(([k]) => !["seq", "ts", "event", "prev", "session_id", "user"].includes(k))
      .map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(" ")))));
}

function tunnelSection(s, ctx) {
  if (s.kind !== "tunnel" && s.kind !== "jump") return null;
  const meta = [["Destination / protocol", s.command ? h("code", {}, s.command) : "—"],
    ["From", s.peer], ["Bytes to target", bytes(s.bytes_in)], ["Bytes from target", bytes(s.bytes_out)]];
  for (const key of ["rdp", "tunnel", "forward", "destination"]) {
    if (s[key] && typeof s[key] === "object") {
      for (const [k, v] of Object.entries(s[key])) meta.push([`${key} ${k}`, String(v)]);
    }
  }
  const sec = h("section", {"aria-labelledby": "tunnel-h"},
    h("h2", {id: "tunnel-h"}, s.kind === "jump" ? "Jump connection" : "Tunnel"), dl(meta),
    s.kind === "tunnel" ? h("p", {class: "muted"}, "A tunnel's payload is not recorded; " +
      "for RDP, what the client announced and the server chose is its protocol event.") : null);
  if (ctx.isAuditor) tunnelEvents(s, sec);
  return sec;
}

function childrenSection(s, q) {
  const kids = s.children || [];
  if (!kids.length && s.kind !== "jump") return null;
  const sec = h("section", {"aria-labelledby": "kids-h"},
    h("h2", {id: "kids-h"}, "Sessions inside this connection"));
  if (!kids.length) sec.append(h("p", {class: "muted"}, "None."));
  else sec.append(sessionTable(kids.map((k) => sessionRow(k, q))));
  return sec;
}

export async function sessionPage(root, id, ctx) {
  const q = ctx.params.get("q") || "";
  const t = Number(ctx.params.get("t"));
  const base = `/api/sessions/${encodeURIComponent(id)}`;
  const detail = api("GET", base + qs({q}));
  detail.catch(() => {});
  document.title = `Session ${id} · bastion-broker`;
  root.append(heading(`Session ${id}`));
  // the integrity check reads the whole recording: the replay starts meanwhile
  const integrity = h("section", {class: "integrity muted", "aria-label": "Integrity",
    "data-status": "checking"}, h("h2", {}, "Checking integrity…"));
  const summary = h("div", {class: "summary-slot"});
  const replaySec = h("section", {"aria-labelledby": "replay-h", class: "replay-section"},
    h("h2", {id: "replay-h"}, "Replay"));
  root.append(integrity, summary, replaySec);
  const replay = mountReplay(replaySec, id, {
    startAt: Number.isFinite(t) && ctx.params.has("t") ? t : undefined});
  let s;
  try {
    s = await detail;
  } catch (e) {
    replaySec.remove();
    integrity.remove();
    throw e;
  }
  if (ctx.stale()) return;
  document.title = `Session ${s.id} · bastion-broker`;
  integrity.replaceWith(integrityBanner(s.integrity));
  const downloads = h("p", {class: "downloads"});
  if (s.recorded) {
    downloads.append(
      h("a", {href: `${base}/recording.cast?download=1`, download: `${s.id}.cast`, class: "button"},
        "Download recording (.cast)"), " ",
      h("a", {href: `${base}/manifest`, download: `${s.id}.manifest.json`, class: "button"},
        "Download signed manifest"));
  }
  const parent = s.parent_id ? h("a", {href: sessionHref(s.parent_id)}, s.parent_id) : null;
  const summaryOf = (s) => h("section", {"aria-label": "Summary", class: "summary"}, dl([
    ["User", s.user], ["Target", targetText(s)], ["Stack", s.stack], ["Login", s.login],
    ["Level", s.level], ["Kind", s.kind], ["Command", s.command ? h("code", {}, s.command) : null],
    ["From", s.peer], ["Bastion", s.bastion || null], ["Started", when(s.started_at)],
    ["Ended", s.ended_at ? when(s.ended_at) : "live"],
    ["Duration", duration(s.duration_s)],
    ["Status", h("span", {}, statusBadge(s.status), " ", s.outcome || s.exit_status || "")],
    ["Bytes in / out", `${bytes(s.bytes_in)} / ${bytes(s.bytes_out)}`],
    ["Recording", s.recorded ? bytes(s.recording_bytes) : "none"],
    ["Inside connection", parent],
  ]), downloads);
  let summarySec = summaryOf(s);
  summary.replaceWith(summarySec);
  if (s.status === "live" && ctx.isAuditor) {
    summarySec.after(endSessionPanel(s, (ended) => {  // its end, status and outcome now
      if (ctx.stale()) return;
      const fresh = summaryOf(ended);
      summarySec.replaceWith(fresh);
      summarySec = fresh;
    }));
  }
  replay.details(s);
  if (s.recorded) {
    const hitsBox = h("div", {class: "session-hits"});
    const findInput = h("input", {type: "search", name: "q", value: q});
    const findForm = h("form", {class: "row find", role: "search"},
      field("Find in this session", findInput), h("button", {type: "submit"}, "Find"));
    const showHits = (hits, query) => {
      clear(hitsBox);
      if (!query) return;
      if (!hits.length) {
        hitsBox.append(message("muted", `"${query}" does not occur in this session's text.`));
        return;
      }
      hitsBox.append(h("ol", {class: "hits", "aria-label": "Matches"}, hits.map((hit) =>
        h("li", {}, h("button", {type: "button", class: "link",
          onclick: () => replay.seek(hit.t)}, clock(hit.t)), " ",
        h("span", {class: "source"}, hit.source), " ", h("code", {class: "snippet"}, hit.snippet)))));
    };
    findForm.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const query = findInput.value.trim();
      if (!query) {
        showHits([], "");
        replay.setMarkers([]);
        return;
      }
      try {
        const res = await api("GET", `${base}/hits` + qs({q: query}));
        const hits = Array.isArray(res) ? res : (res.items || res.hits || []);
        replay.setMarkers(hits);
        showHits(hits, query);
      } catch (e) {
        clear(hitsBox).append(message("error", e.message));
      }
    });
    replaySec.append(findForm, hitsBox);
    showHits(s.hits || [], q);
  }
  for (const sec of [tunnelSection(s, ctx), childrenSection(s, q), filesSection(s), grantSection(s)]) {
    if (sec) root.append(sec);
  }
  await replay.ready;
}
