// Replay with asciinema-player, in windows of the recording.
//
// A recording can be hundreds of MiB. The player parses and keeps a whole recording in memory,
// so it never gets the whole file: the session is cut into time windows of about WINDOW_BYTES
// each (from the session's duration and recording size), the first is fetched with
// recording.cast?from=&to= (the broker streams it, rebased to 0) and shown at once, and the next
// is fetched while the current one plays and takes over when it ends. The last 64 KiB of
// output before a window are replayed at its first instant, so the screen a window starts from
// is the one the previous window left (a shell's scrollback, a full-screen program's last
// redraw). Idle time is limited here, not in the player, so positions in the session, search
// hits and the player's timeline map onto each other exactly.

import {bytes, clock, clear, h, message} from "./util.js";

const WINDOW_BYTES = 4 * 1024 * 1024;
const CARRY_BYTES = 64 * 1024;
const CONTEXT_SECONDS = 10;
const SPEEDS = [0.5, 1, 2, 4, 8, 16];
const IDLE_LIMITS = [0, 1, 2, 5, 30];

let playerReady = null;

/** Loads the player's script and stylesheet once; false when the broker does not serve them. */
function loadPlayer() {
  if (playerReady) return playerReady;
  playerReady = new Promise((resolve) => {
    if (window.AsciinemaPlayer) {
      resolve(true);
      return;
    }
    const css = h("link", {rel: "stylesheet", href: "/console/player/asciinema-player.css"});
    document.head.append(css);
    const script = h("script", {src: "/console/player/asciinema-player.min.js"});
    script.addEventListener("load", () => resolve(Boolean(window.AsciinemaPlayer)));
    script.addEventListener("error", () => resolve(false));
    document.head.append(script);
  });
  return playerReady;
}

/** Windows [from, to) covering the session; the last one is open-ended. */
export function planWindows(durationS, recordingBytes) {
  const dur = Math.max(0, Number(durationS) || 0);
  const n = Math.max(1, Math.min(10000, Math.ceil((Number(recordingBytes) || 0) / WINDOW_BYTES)));
  if (n === 1 || dur === 0) return [{from: 0, to: null}];
  const w = dur / n;
  const out = [];
  for (let i = 0; i < n; i++) {
    out.push({from: +(i * w).toFixed(3), to: i === n - 1 ? null : +((i + 1) * w).toFixed(3)});
  }
  return out;
}

function parseCast(text) {
  const lines = text.split("\n");
  let header = {version: 2, width: 80, height: 24};
  try {
    header = JSON.parse(lines[0]);
  } catch (e) {
    throw new Error("the recording is not asciicast v2");
  }
  const events = [];
  for (let i = 1; i < lines.length; i++) {
    const line = lines[i];
    if (line[0] !== "[") continue;
    let ev;
    try {
      ev = JSON.parse(line);
    } catch (e) {
      continue;
    }
    if (Array.isArray(ev) && (ev[1] === "o" || ev[1] === "r") && typeof ev[2] === "string") {
      events.push(ev);
    }
  }
  return {header, events};
}

function tail(events, limit) {
  const parts = [];
  let size = 0;
  let cols = null;
  let rows = null;
  for (let i = events.length - 1; i >= 0; i--) {
    const [, type, data] = events[i];
    if (type === "r") {
      if (cols === null) [cols, rows] = data.split("x").map(Number);
      continue;
    }
    if (size >= limit) continue;
    const piece = data.length + size > limit ? data.slice(data.length - (limit - size)) : data;
    parts.push(piece);
    size += piece.length;
  }
  return {text: parts.reverse().join(""), cols, rows};
}

/** Times with every pause cut to ``limit`` seconds (0: none), and the maps both ways. */
function compress(events, limit) {
  const orig = [];
  const comp = [];
  let prev = 0;
  let now = 0;
  for (const ev of events) {
    const gap = Math.max(0, ev[0] - prev);
    now += limit > 0 ? Math.min(gap, limit) : gap;
    prev = ev[0];
    orig.push(ev[0]);
    comp.push(now);
  }
  const interp = (xs, ys, x) => {
    if (!xs.length) return x;
    let lo = 0;
    let hi = xs.length - 1;
    if (x <= xs[0]) return ys[0] - (xs[0] - x);
    if (x >= xs[hi]) return ys[hi] + (x - xs[hi]);
    while (lo + 1 < hi) {
      const mid = (lo + hi) >> 1;
      if (xs[mid] <= x) lo = mid;
      else hi = mid;
    }
    const span = xs[hi] - xs[lo];
    return span > 0 ? ys[lo] + (ys[hi] - ys[lo]) * (x - xs[lo]) / span : ys[lo];
  };
  return {
    events: events.map((ev, i) => [comp[i], ev[1], ev[2]]),
    toPlayer: (t) => Math.max(0, interp(orig, comp, t)),
    fromPlayer: (t) => Math.max(0, interp(comp, orig, t)),
  };
}

/**
 * Puts the replay of session ``s`` into ``section``. Returns {seek(t), setMarkers(hits)};
 * ``t`` is seconds from the session's start.
 */
export async function mountReplay(section, s, {hits = [], startAt} = {}) {
  const box = h("div", {class: "replay"});
  section.append(box);
  const noop = {seek() {}, setMarkers() {}};
  if (s.status === "live" || !s.ended_at) {
    box.append(message("muted", "The session is live: its recording can be replayed when it ends."));
    return noop;
  }
  if (!(await loadPlayer())) {
    box.append(message("error", "The asciinema player is not installed on this broker " +
      "([web] player_dir; scripts/bootstrap installs it), so recordings cannot be replayed here. " +
      "Download the recording and play it with asciinema play or bastion-broker play."));
    return noop;
  }
  const base = `/api/sessions/${encodeURIComponent(s.id)}/recording.cast`;
  const windows = planWindows(s.duration_s, s.recording_bytes);
  const total = Number(s.duration_s) || 0;
  const fetched = new Map(); // window index -> Promise<{header, events}>; at most 3 kept
  let markers = hits.map((x) => [Number(x.t), String(x.snippet || x.source || "match")]);
  let speed = 1;
  let idle = 2;
  let current = null; // {index, player, map, carry}
  let generation = 0;

  const status = h("p", {class: "muted small", "aria-live": "polite"});
  const playerEl = h("div", {class: "player", "data-testid": "player"});
  const speedSel = h("select", {id: "replay-speed"}, SPEEDS.map((v) =>
    h("option", {value: String(v), selected: v === speed}, `${v}×`)));
  const idleSel = h("select", {id: "replay-idle"}, IDLE_LIMITS.map((v) =>
    h("option", {value: String(v), selected: v === idle}, v ? `${v} s` : "off")));
  const position = h("input", {type: "range", id: "replay-position", min: "0",
    max: String(Math.max(1, Math.ceil(total))), step: "1", value: "0"});
  const posText = h("output", {for: "replay-position"}, `0:00 / ${clock(total)}`);
  const prev = h("button", {type: "button"}, "◀ Previous part");
  const next = h("button", {type: "button"}, "Next part ▶");
  const part = h("span", {class: "muted small"});
  const tools = h("div", {class: "replay-tools"},
    h("label", {for: "replay-speed"}, "Speed"), speedSel,
    h("label", {for: "replay-idle"}, "Idle time limit"), idleSel,
    h("label", {for: "replay-position"}, "Position"), position, posText);
  box.append(tools);
  if (windows.length > 1) {
    box.append(h("div", {class: "replay-parts"}, prev, part, next,
      h("span", {class: "muted small"},
        ` The recording (${bytes(s.recording_bytes)}) is replayed in parts of about ` +
        `${bytes(WINDOW_BYTES)}; the next part loads while this one plays.`)));
  }
  box.append(playerEl, status);

  const windowAt = (t) => {
    for (let i = windows.length - 1; i >= 0; i--) if (t >= windows[i].from) return i;
    return 0;
  };

  function fetchWindow(i) {
    if (!fetched.has(i)) {
      const w = windows[i];
      const url = windows.length === 1 ? base
        : base + `?from=${w.from}` + (w.to !== null ? `&to=${w.to}` : "");
      const p = fetch(url, {credentials: "same-origin"}).then(async (resp) => {
        if (!resp.ok) throw new Error(`the recording could not be loaded (HTTP ${resp.status})`);
        return parseCast(await resp.text());
      });
      p.catch(() => fetched.delete(i));
      fetched.set(i, p);
      for (const k of [...fetched.keys()]) if (Math.abs(k - i) > 1) fetched.delete(k);
    }
    return fetched.get(i);
  }

  /** The output just before window i, to rebuild its first screen. */
  async function carryFor(i) {
    if (i === 0) return {text: "", cols: null, rows: null};
    if (current && current.index === i - 1) return current.carry;
    const w = windows[i];
    const from = Math.max(0, w.from - CONTEXT_SECONDS);
    const resp = await fetch(`${base}?from=${from}&to=${w.from}`, {credentials: "same-origin"});
    if (!resp.ok) return {text: "", cols: null, rows: null};
    return tail(parseCast(await resp.text()).events, CARRY_BYTES);
  }

  function updatePosition() {
    if (!current || !current.player) return;
    let t = 0;
    try {
      t = windows[current.index].from + current.map.fromPlayer(current.player.getCurrentTime() || 0);
    } catch (e) {
      return;
    }
    if (document.activeElement !== position) position.value = String(Math.floor(t));
    posText.textContent = `${clock(t)} / ${clock(total)}`;
    const w = windows[current.index];
    if (w.to !== null && current.index + 1 < windows.length) {
      const left = w.to - t;
      if (left < Math.max(3, (w.to - w.from) / 3)) fetchWindow(current.index + 1);
    }
  }

  async function show(i, tInSession, autoPlay) {
    const gen = ++generation;
    status.textContent = windows.length > 1 ? `Loading part ${i + 1} of ${windows.length}…` : "Loading…";
    let cast;
    let carry;
    try {
      [cast, carry] = await Promise.all([fetchWindow(i), carryFor(i)]);
    } catch (e) {
      if (gen === generation) status.textContent = String(e.message || e);
      return;
    }
    if (gen !== generation) return;
    const w = windows[i];
    const header = {...cast.header};
    delete header.idle_time_limit;
    let events = cast.events;
    if (carry.text) {
      events = [[0, "o", carry.text], ...events];
      if (carry.cols) [header.width, header.height] = [carry.cols, carry.rows];
    }
    const map = compress(events, idle);
    const local = Math.max(0, (tInSession ?? w.from) - w.from);
    const end = w.to === null ? Infinity : w.to;
    const ownMarkers = markers.filter(([t]) => t >= w.from && t < end)
      .map(([t, label]) => [map.toPlayer(t - w.from), label]);
    if (current && current.player) {
      try {
        current.player.dispose();
      } catch (e) {
        // already gone
      }
    }
    clear(playerEl);
    const opts = {speed, autoPlay, preload: true, fit: "width", controls: true,
      markers: ownMarkers, startAt: map.toPlayer(local), terminalFontSize: "14px"};
    if (!autoPlay) opts.poster = "npt:" + map.toPlayer(local).toFixed(3);
    const player = window.AsciinemaPlayer.create({data: [header, ...map.events]}, playerEl, opts);
    current = {index: i, player, map, carry: tail(cast.events, CARRY_BYTES)};
    if (carry.text && !current.carry.text) current.carry = carry;
    player.addEventListener("ended", () => {
      if (gen !== generation) return;
      if (i + 1 < windows.length) show(i + 1, windows[i + 1].from, true);
    });
    part.textContent = windows.length > 1
      ? `Part ${i + 1} of ${windows.length} (${clock(w.from)}–${clock(w.to ?? total)})` : "";
    prev.disabled = i === 0;
    next.disabled = i + 1 >= windows.length;
    status.textContent = "";
    updatePosition();
  }

  function seek(t) {
    const target = Math.max(0, Math.min(Number(t) || 0, total || Number(t) || 0));
    const i = windowAt(target);
    if (current && current.index === i && current.player) {
      current.player.seek(current.map.toPlayer(target - windows[i].from));
      current.player.play();
      playerEl.querySelector(".ap-player, .ap-wrapper")?.focus?.();
      return;
    }
    show(i, target, true);
  }

  speedSel.addEventListener("change", () => {
    speed = Number(speedSel.value);
    reload();
  });
  idleSel.addEventListener("change", () => {
    idle = Number(idleSel.value);
    reload();
  });
  position.addEventListener("change", () => seek(Number(position.value)));
  prev.addEventListener("click", () => current && current.index > 0 &&
    show(current.index - 1, windows[current.index - 1].from, false));
  next.addEventListener("click", () => current && current.index + 1 < windows.length &&
    show(current.index + 1, windows[current.index + 1].from, false));

  function reload() {
    if (!current) return;
    const t = windows[current.index].from + current.map.fromPlayer(current.player.getCurrentTime() || 0);
    show(current.index, t, false);
  }

  const timer = setInterval(() => {
    if (!box.isConnected) {
      clearInterval(timer);
      if (current && current.player) current.player.dispose();
      return;
    }
    updatePosition();
  }, 500);

  const startT = startAt !== undefined ? Math.max(0, startAt - 1) : 0;
  await show(windowAt(startT), startT, startAt !== undefined);
  return {
    seek,
    setMarkers(newHits) {
      markers = newHits.map((x) => [Number(x.t), String(x.snippet || x.source || "match")]);
      reload();
    },
  };
}
