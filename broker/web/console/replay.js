// Replay with asciinema-player, one window of the recording at a time.
//
// A recording can be hundreds of MiB, and the player parses and holds a whole recording, so it
// never gets the whole file. The console reads recording.cast?from=T (the broker streams it,
// times rebased to T) as a stream, a window at a time: about FIRST_BYTES for the first window,
// to start quickly, then WINDOW_BYTES, each ending at the last instant it holds in full, so
// windows are bounded in bytes whatever the output's density in time. Between windows the
// response is simply not read: flow control holds the broker's writer, and the next window is
// read from the same response while the current one plays (asking again later would cost the
// broker a read of the recording up to there, and a new request). A jump elsewhere starts
// a new response a little before the target; the output before the target (its last 64 KiB) is
// replayed at the window's first instant, as is the end of the previous window when playing on,
// so a window starts from the right screen (a shell's scrollback, a full-screen program's last
// redraw). Idle time is limited here, not in the player, so positions in the session, search
// hits and the player's timeline map onto each other exactly.

import {mountLive} from "./live.js";
import {bytes, clock, clear, h, message} from "./util.js";

export const FIRST_BYTES = 1024 * 1024;
export const WINDOW_BYTES = 4 * 1024 * 1024;
const CARRY_BYTES = 64 * 1024;
const SPEEDS = [0.5, 1, 2, 4, 8, 16];
const IDLE_LIMITS = [0, 1, 2, 5, 30];

let playerReady = null;

/** Loads the player's script and stylesheet once; false when the broker does not serve them. */
export function loadPlayer() {
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

function parseEvent(line) {
  if (line[0] !== "[") return null;
  try {
    const ev = JSON.parse(line);
    if (Array.isArray(ev) && (ev[1] === "o" || ev[1] === "r") && typeof ev[2] === "string") {
      return ev;
    }
  } catch (e) {
    // a line cut by the end of a read is never parsed: only whole lines get here
  }
  return null;
}

/**
 * recording.cast from ``from`` (seconds into the session), read as a stream a window at a time.
 *
 * The broker reads a recording from its start whatever ``from`` is (it passes over the frames
 * before ``from`` unrendered), so playing on never asks again: the next window is read from the same response, which waits (TCP flow control; the
 * broker's writer with it) while a window plays. Event times are seconds into the session.
 */
export class CastStream {
  constructor(base, from) {
    this.from = from;
    this.header = null;
    this.pending = [];
    this.done = false;
    this.broken = null;
    this.buffered = "";
    this.decoder = new TextDecoder();
    this.busy = Promise.resolve();
    const url = base + (from > 0 ? `?from=${from.toFixed(6)}` : "");
    this.opened = fetch(url, {credentials: "same-origin"}).then((resp) => {
      if (!resp.ok) throw new Error(`the recording could not be loaded (HTTP ${resp.status})`);
      this.reader = resp.body.getReader();
    });
    this.opened.catch(() => {});
  }

  line(text) {
    if (this.header === null) {
      this.header = JSON.parse(text);
      return;
    }
    const ev = parseEvent(text);
    if (ev) {
      ev[0] += this.from;
      this.pending.push(ev);
    }
  }

  async fill() {
    let chunk;
    try {
      chunk = await this.reader.read();
    } catch (e) {
      this.broken = e;
      this.done = true;
      return;
    }
    if (chunk.done) {
      if (this.buffered) this.line(this.buffered);
      this.buffered = "";
      this.done = true;
      return;
    }
    const lines = (this.buffered + this.decoder.decode(chunk.value, {stream: true})).split("\n");
    this.buffered = lines.pop();
    for (const l of lines) this.line(l);
  }

  /**
   * The next window: the events at or after ``splitAt`` up to about ``maxBytes`` of output,
   * ending at the last instant read in full. Output before ``splitAt`` comes back as
   * ``carry`` (its last CARRY_BYTES), to rebuild the screen the window starts with. ``end`` is
   * null at the end of the recording.
   */
  take(maxBytes, splitAt) {
    const run = this.busy.then(() => this.takeNow(maxBytes, splitAt));
    this.busy = run.catch(() => {});
    return run;
  }

  async takeNow(maxBytes, splitAt) {
    await this.opened;
    let before = [];
    let beforeSize = 0;
    const events = [];
    let size = 0;
    for (;;) {
      for (const ev of this.pending) {
        if (ev[0] < splitAt) {
          before.push(ev);
          beforeSize += ev[2].length;
          if (beforeSize > 4 * CARRY_BYTES) {
            const keep = tail(before, CARRY_BYTES);
            before = [[splitAt, "o", keep.text]];
            if (keep.cols) before.push([splitAt, "r", `${keep.cols}x${keep.rows}`]);
            beforeSize = keep.text.length;
          }
        } else {
          events.push(ev);
          size += ev[2].length;
        }
      }
      this.pending = [];
      if ((size >= maxBytes && events.length) || this.done) break;
      await this.fill();
    }
    if (this.header === null) throw this.broken || new Error("the recording is empty");
    let end = null;
    if (!this.done || this.broken) {
      if (!events.length) throw this.broken || new Error("the recording could not be read");
      // the last instant read may go on in what is not read yet: it opens the next window
      const last = events[events.length - 1][0];
      let keep = events.length;
      while (keep > 0 && events[keep - 1][0] === last) keep--;
      if (keep === 0) {
        end = last + 0.000001; // one instant bigger than a window: keep it whole
      } else {
        this.pending = events.splice(keep);
        end = last;
      }
    }
    return {header: this.header, events, end, bytes: size, carry: tail(before, CARRY_BYTES)};
  }

  /** Whether the window from ``t`` is the next this stream can give. */
  continues(t) {
    return !this.broken && !this.cancelled && this.nextFrom !== undefined &&
      Math.abs(this.nextFrom - t) < 1e-6;
  }

  cancel() {
    this.cancelled = true;
    this.opened.then(() => this.reader.cancel()).catch(() => {});
  }
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
 * Puts the replay of session ``id`` into ``section`` at once: the recording's first window and
 * the player load while ``details`` (the session, whose integrity check reads the whole
 * recording) is still on its way. Returns {seek(t), setMarkers(hits), details(s)};
 * ``t`` is seconds from the session's start.
 */
export function mountReplay(section, id, {startAt} = {}) {
  const box = h("div", {class: "replay"});
  section.append(box);
  const base = `/api/sessions/${encodeURIComponent(id)}/recording.cast`;
  let total = 0;
  let rate = 0;
  let markers = [];
  let speed = 1;
  let idle = 2;
  let current = null; // {from, end, player, map, carry}
  let upcoming = null; // {from, promise}
  let generation = 0;
  let gone = false;
  let playing = false;
  let shown = 0;
  let live = null; // the live view, while the session runs
  const lookback = () => (rate > 0 ? Math.min(10, Math.max(0.2, (4 * CARRY_BYTES) / rate)) : 2);
  let stream = null;
  /** The window from ``from``: from the open stream when it is the next one it gives. */
  function windowFrom(from) {
    let st = stream;
    let size = WINDOW_BYTES;
    if (!st || !st.continues(from)) {
      if (st) st.cancel();
      st = stream = new CastStream(base, from === 0 ? 0 : Math.max(0, from - lookback()));
      if (from === 0) size = FIRST_BYTES;
    }
    st.nextFrom = undefined;
    const p = st.take(size, from).then((win) => {
      st.nextFrom = win.end === null ? undefined : win.end;
      return win;
    });
    p.catch(() => {});
    return p;
  }
  const firstStart = startAt !== undefined ? Math.max(0, startAt - 1) : 0;
  const early = windowFrom(firstStart);

  const status = h("p", {class: "muted small", "aria-live": "polite"});
  const playerEl = h("div", {class: "player", "data-testid": "player"});
  const speedSel = h("select", {id: "replay-speed"}, SPEEDS.map((v) =>
    h("option", {value: String(v), selected: v === speed}, `${v}×`)));
  const idleSel = h("select", {id: "replay-idle"}, IDLE_LIMITS.map((v) =>
    h("option", {value: String(v), selected: v === idle}, v ? `${v} s` : "off")));
  const position = h("input", {type: "range", id: "replay-position", min: "0", max: "1",
    step: "1", value: "0"});
  const posText = h("output", {for: "replay-position"}, "0:00");
  // which part is loaded: shown for recordings larger than one window
  const part = h("span", {class: "muted small", "data-testid": "window", hidden: true});
  const note = h("span", {class: "muted small"});
  box.append(h("div", {class: "replay-tools"},
    h("label", {for: "replay-speed"}, "Speed"), speedSel,
    h("label", {for: "replay-idle"}, "Idle time limit"), idleSel,
    h("label", {for: "replay-position"}, "Position"), position, posText),
  playerEl, status, h("p", {class: "replay-parts"}, part, note));

  function fetchNext(from) {
    if (!upcoming || upcoming.from !== from) {
      const promise = windowFrom(from);
      promise.catch(() => {
        if (upcoming && upcoming.promise === promise) upcoming = null;
      });
      upcoming = {from, promise};
    }
    return upcoming.promise;
  }

  function sessionTime() {
    if (!current || !current.player) return 0;
    try {
      return current.from + current.map.fromPlayer(current.player.getCurrentTime() || 0);
    } catch (e) {
      return current.from;
    }
  }

  function updatePosition() {
    if (!current || !current.player) return;
    const t = sessionTime();
    if (document.activeElement !== position) position.value = String(Math.floor(t));
    posText.textContent = total ? `${clock(t)} / ${clock(total)}` : clock(t);
    if (current.end !== null) {
      const length = current.end - current.from;
      if (current.end - t < Math.max(3, length / 2)) fetchNext(current.end);
    }
  }

  /** Window from ``from`` (its data: ``loading``, or fetched here), shown from ``startIn``. */
  async function show(from, startIn, autoPlay, loading) {
    const gen = ++generation;
    status.textContent = "Loading…";
    let win;
    try {
      if (!(await loadPlayer())) {
        clear(box).append(message("error", "The asciinema player is not installed on this " +
          "broker ([web] player_dir; scripts/bootstrap installs it), so recordings cannot be " +
          "replayed here. Download the recording and play it with asciinema play or " +
          "bastion-broker play."));
        gone = true;
        return;
      }
      if (loading) win = await loading;
      else if (current && current.end !== null && Math.abs(current.end - from) < 1e-6) {
        win = await fetchNext(from);
        if (!win.carry.text) win = {...win, carry: current.carry};
      } else win = await windowFrom(from);
    } catch (e) {
      if (gen === generation && !gone) status.textContent = String(e.message || e);
      return;
    }
    if (gen !== generation || gone) return;
    if (upcoming && upcoming.from === from) upcoming = null;
    const header = {...win.header};
    delete header.idle_time_limit;
    let events = win.events.map(([t, type, data]) => [Math.max(0, t - from), type, data]);
    const carry = win.carry || {text: ""};
    if (carry.text) {
      events = [[0, "o", carry.text], ...events];
      if (carry.cols) [header.width, header.height] = [carry.cols, carry.rows];
    }
    if (!events.length) events = [[0, "o", ""]];
    const map = compress(events, idle);
    const end = win.end === null ? Infinity : win.end;
    const ownMarkers = markers.filter(([t]) => t >= from && t < end)
      .map(([t, label]) => [map.toPlayer(t - from), label]);
    if (current && current.player) {
      try {
        current.player.dispose();
      } catch (e) {
        // already gone
      }
    }
    clear(playerEl);
    const local = map.toPlayer(Math.max(0, startIn - from));
    const opts = {speed, autoPlay, preload: true, fit: "width", controls: true,
      markers: ownMarkers, startAt: local, terminalFontSize: "14px"};
    if (!autoPlay) opts.poster = "npt:" + local.toFixed(3);
    const player = window.AsciinemaPlayer.create({data: [header, ...map.events]}, playerEl, opts);
    const own = tail(events, CARRY_BYTES);
    current = {from, end: win.end, player, map, win, carry: own.text ? own : carry};
    playing = autoPlay;
    player.addEventListener("play", () => {
      if (gen === generation) playing = true;
    });
    player.addEventListener("pause", () => {
      if (gen === generation) playing = false;
    });
    player.addEventListener("ended", () => {
      if (gen !== generation) return;
      playing = false;
      if (current.end !== null) show(current.end, current.end, true);
    });
    shown += 1;
    part.setAttribute("data-shown", String(shown)); // windows shown so far (tests, debugging)
    part.textContent = win.end === null && from === 0 ? ""
      : `Loaded: ${clock(from)}–${win.end === null ? "end" : clock(win.end)} (${bytes(win.bytes)}).`;
    status.textContent = "";
    updatePosition();
  }

  function seek(t) {
    const target = Math.max(0, Math.min(Number(t) || 0, total || Number(t) || 0));
    if (current && current.player && target >= current.from &&
        (current.end === null || target < current.end)) {
      current.player.seek(current.map.toPlayer(target - current.from));
      current.player.play();
      return;
    }
    show(target, target, true);
  }

  /** The same window again (new speed, idle limit or markers), where it was, as it was. */
  function reload() {
    if (current) show(current.from, sessionTime(), playing, Promise.resolve(current.win));
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

  const timer = setInterval(() => {
    if (!box.isConnected) {
      clearInterval(timer);
      if (live) live.close();
      if (current && current.player) current.player.dispose();
      if (stream) stream.cancel();
      return;
    }
    updatePosition();
  }, 250);

  const ready = show(firstStart, firstStart, startAt !== undefined, early);
  return {
    ready,
    seek,
    setMarkers(newHits) {
      markers = newHits.map((x) => [Number(x.t), String(x.snippet || x.source || "match")]);
      reload();
    },
    /** The session's details arrived: its length, size and search hits. */
    details(s) {
      if (s.status === "live" || !s.ended_at || !s.recorded) {
        gone = true;
        generation++;
        if (current && current.player) current.player.dispose();
        if (stream) stream.cancel();
        clear(box);
        if (s.recorded && !s.ended_at && (s.kind === "shell" || s.kind === "exec")) {
          // watch it instead: the replay is offered once it has ended
          const title = section.querySelector("h2");
          if (title) title.textContent = "Live";
          live = mountLive(box, id, {loadPlayer, onEnded: () => {
            box.append(h("p", {}, h("button", {type: "button", "data-testid": "replay-ended",
              onclick: () => window.dispatchEvent(new HashChangeEvent("hashchange"))},
            "Replay the recording")));
          }});
          return;
        }
        box.append(message("muted", !s.recorded
          ? "This session has no recording to replay."
          : "The session is live: its recording can be replayed when it ends."));
        return;
      }
      total = Number(s.duration_s) || 0;
      rate = total > 0 ? (Number(s.recording_bytes) || 0) / total : 0;
      position.max = String(Math.max(1, Math.ceil(total)));
      if ((Number(s.recording_bytes) || 0) > FIRST_BYTES) {
        part.hidden = false;
        note.textContent = ` The recording (${bytes(s.recording_bytes)}) is loaded in parts of ` +
          `at most about ${bytes(WINDOW_BYTES)}, the next while one plays.`;
      }
      updatePosition();
      const hits = s.hits || [];
      if (hits.length && !markers.length) this.setMarkers(hits);
    },
  };
}
