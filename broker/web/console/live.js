// Live view: a session as it happens, from GET /api/sessions/{id}/live (a WebSocket).
//
// The broker sends an asciicast v2 header (the terminal's size now), then events as the
// session's recording grows (viewer-safe, as in a replay), {"lag": s} now and then, and
// {"end": {...}} last. The page draws them with asciinema-player through a driver of its own:
// it feeds the player's terminal what arrives (the player's own WebSocket driver speaks the
// stock protocols only, and could show neither the lag nor why a watch ended). Nothing is ever
// sent: a watch is read-only. A failed handshake says nothing to a page, so the same URL is then
// asked over plain HTTP why (ended: the session page offers the replay; elsewhere: another
// bastion of the fleet holds it).

import {api, clock, h} from "./util.js";

/** Watches session ``id`` in ``box``; ``onEnded()`` runs once the session has ended. */
export function mountLive(box, id, {loadPlayer, onEnded}) {
  const path = `/api/sessions/${encodeURIComponent(id)}/live`;
  const status = h("p", {class: "live-status", role: "status", "data-testid": "live-status",
    "data-state": "connecting"}, "Connecting…");
  const playerEl = h("div", {class: "player", "data-testid": "live-player"});
  const withheld = h("p", {class: "muted small", "data-testid": "live-input", hidden: true});
  box.append(status, playerEl, withheld);

  let dispatch = null;
  let queued = [];
  let header = null;
  let player = null;
  let lag = 0;
  let ended = false;
  let closed = false;
  const feed = (name, data) => {
    if (dispatch) dispatch(name, data);
    else queued.push([name, data]);
  };
  const show = (state, text) => {
    status.dataset.state = state;
    status.textContent = text;
  };
  const liveText = () => `● Live: ${lag < 0.05 ? "up to date" : `${lag.toFixed(1)} s behind`}`;

  /** A player driver (asciinema-player 3.18) that shows what the socket brings. */
  const driver = ({dispatch: d}) => ({
    play() {
      dispatch = d;
      d("play");
      d("reset", {size: {cols: header.width, rows: header.height}, theme: null});
      d("playing");
      for (const [name, data] of queued) d(name, data);
      queued = [];
      return true;
    },
    stop() {
      dispatch = null;
    },
    getTiming: () => ({time: null, rate: 0, sampledAt: performance.timeOrigin + performance.now()}),
  });

  async function start() {
    if (!(await loadPlayer())) {
      show("error", "The asciinema player is not installed on this broker ([web] player_dir), " +
        "so the live view cannot be shown here; run bastion-broker sessions watch on the bastion.");
      ws.close();
      return;
    }
    if (closed) return;
    player = window.AsciinemaPlayer.create(driver, playerEl, {autoPlay: true, controls: false,
      fit: "width", terminalFontSize: "14px"});
  }

  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${scheme}//${location.host}${path}`);
  ws.addEventListener("message", (ev) => {
    let msg;
    try {
      msg = JSON.parse(ev.data);
    } catch (e) {
      return;
    }
    if (header === null) {
      header = msg;
      show("live", liveText());
      start();
      return;
    }
    if (Array.isArray(msg)) {
      const [t, code, data] = msg;
      if (code === "o") feed("output", data);
      else if (code === "r") {
        const [cols, rows] = String(data).split("x").map(Number);
        if (cols > 0 && rows > 0) feed("resize", {cols, rows});
      } else if (code === "i") {
        withheld.hidden = false;
        withheld.textContent = `${clock(t)} ${data}`;
      }
    } else if (msg && typeof msg.lag === "number") {
      lag = msg.lag;
      if (!ended) show("live", liveText());
    } else if (msg && msg.end) {
      ended = true;
      const e = msg.end;
      show("ended", e.exit_status ? `Session ended (exit status ${e.exit_status}).`
        : `Session ended: ${e.message || e.reason}.`);
      if (onEnded) onEnded();
    }
  });
  ws.addEventListener("close", async () => {
    if (ended || closed) return;
    if (header !== null) {
      show("error", "The live view was interrupted (the broker restarted, or the network). " +
        "Reload the page to watch again.");
      return;
    }
    try {
      await api("GET", path);
      show("error", "The live view could not be opened; reload the page to try again.");
    } catch (e) {
      const code = e.error;
      show(code === "ended" ? "ended" : "error", e.message || String(e));
      if (code === "ended" && onEnded) onEnded();
    }
  });

  return {
    close() {
      closed = true;
      ws.close();
      if (player) player.dispose();
    },
  };
}
