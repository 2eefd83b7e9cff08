"""The review page: pick a talk group, see its bursts on a timeline (who, when, how long,
empty or not) and play them in order with the browser's audio element.

One HTML document, no build step and nothing fetched from elsewhere. It holds no data:
it calls the API with the token the user gives it (typed in, or in the URL's fragment
``/review#token=…``, which browsers never send to the server) and keeps it in the tab's
``sessionStorage``. Audio plays from the presigned S3 URL, or through this server
(``/v1/recordings/{id}/audio``) when "via this server" is picked or the S3 URL fails: an
audio element cannot send an ``Authorization`` header, so that way fetches the burst
with ``fetch`` and plays it from a ``blob:`` URL (talk bursts are small).

``window.review`` is the page's small interface for the browser test
(``tests/e2e/test_review_page.py``): ``ready``, ``bursts``, ``load(grp)``, ``play(id)``.
"""

from __future__ import annotations

import base64
import hashlib

STYLE = """
body { font: 14px system-ui, sans-serif; margin: 1em 2em; color: #222; }
header { display: flex; gap: 1em; align-items: center; flex-wrap: wrap; }
#timeline { position: relative; height: 56px; margin: 1em 0; background: #f3f3f3;
  border: 1px solid #ccc; }
.burst { position: absolute; top: 8px; height: 40px; min-width: 3px; background: #2a7;
  cursor: pointer; opacity: .85; }
.burst.empty { background: #bbb; }
.burst.unknown { background: #48c; }
.burst.playing, tr.playing { outline: 2px solid #e60; }
table { border-collapse: collapse; }
td, th { padding: 2px 10px; text-align: left; border-bottom: 1px solid #eee; }
#status { color: #666; }
"""

SCRIPT = r"""
"use strict";
const $ = (id) => document.getElementById(id);
const state = { token: "", bursts: [], order: [], index: -1, ready: false };
function token() { return $("token").value.trim(); }
async function api(path) {
  const r = await fetch(path, { headers: { Authorization: "Bearer " + token() } });
  if (!r.ok) {
    let detail = r.status + "";
    try { detail += " " + (await r.json()).detail; } catch (e) {}
    throw new Error(detail);
  }
  return r;
}
function status(text) { $("status").textContent = text; }
function fmtTime(iso) { return new Date(iso).toLocaleString(); }
async function loadGroups() {
  sessionStorage.setItem("fileserver-token", token());
  const data = await (await api("/v1/talkgroups")).json();
  const sel = $("group");
  sel.innerHTML = "";
  for (const g of data.items) {
    const o = document.createElement("option");
    o.value = g.grp_id; o.textContent = "talk group " + g.grp_id;
    sel.appendChild(o);
  }
  status(data.items.length + " talk group(s)");
  if (data.items.length) await load(data.items[0].grp_id);
}
async function load(grp) {
  $("group").value = grp;
  state.ready = false;
  const items = [];
  let cursor = null;
  const max = Number($("max").value) || 200;
  do {
    const q = new URLSearchParams({ grp_id: grp, limit: Math.min(200, max - items.length) });
    if ($("hide-empty").checked) q.set("empty", "false");
    if (cursor) q.set("cursor", cursor);
    const page = await (await api("/v1/recordings?" + q)).json();
    items.push(...page.items);
    cursor = page.next_cursor;
  } while (cursor && items.length < max);
  state.bursts = items.slice().reverse();  // oldest first: the order they are played in
  render();
  state.ready = true;
  status(items.length + " burst(s) in talk group " + grp);
  return items.length;
}
function kind(b) { return b.empty === null ? "unknown" : b.empty ? "empty" : "speech"; }
function render() {
  const tl = $("timeline"), rows = $("rows");
  tl.innerHTML = ""; rows.innerHTML = "";
  if (!state.bursts.length) return;
  const t0 = Date.parse(state.bursts[0].event_time);
  const last = state.bursts[state.bursts.length - 1];
  const t1 = Date.parse(last.event_time) + last.duration_ms;
  const span = Math.max(1, t1 - t0);
  for (const b of state.bursts) {
    const start = Date.parse(b.event_time);
    const bar = document.createElement("div");
    bar.className = "burst " + kind(b);
    bar.dataset.id = b.id;
    bar.style.left = (100 * (start - t0) / span) + "%";
    bar.style.width = (100 * b.duration_ms / span) + "%";
    bar.title = "uid " + b.uid + " · " + fmtTime(b.event_time) + " · " +
      (b.duration_ms / 1000).toFixed(1) + " s · " + kind(b);
    bar.onclick = () => play(b.id);
    tl.appendChild(bar);
    const tr = document.createElement("tr");
    tr.dataset.burst = b.id;
    for (const text of [fmtTime(b.event_time), b.uid, (b.duration_ms / 1000).toFixed(1) + " s",
                        kind(b)]) {
      const td = document.createElement("td"); td.textContent = text; tr.appendChild(td);
    }
    const td = document.createElement("td");
    const btn = document.createElement("button");
    btn.textContent = "play"; btn.onclick = () => play(b.id);
    td.appendChild(btn); tr.appendChild(td);
    rows.appendChild(tr);
  }
}
function mark(id) {
  for (const el of document.querySelectorAll(".playing")) el.classList.remove("playing");
  for (const el of document.querySelectorAll('[data-id="' + id + '"], [data-burst="' + id + '"]'))
    el.classList.add("playing");
}
async function source(id, via) {
  if (via === "proxy") {
    const blob = await (await api("/v1/recordings/" + id + "/audio")).blob();
    return URL.createObjectURL(blob);
  }
  return (await (await api("/v1/recordings/" + id + "/audio/url")).json()).url;
}
function loaded(audio) {
  return new Promise((resolve, reject) => {
    const ok = () => { cleanup(); resolve(audio.duration); };
    const bad = () => { cleanup(); reject(new Error("the audio element could not load it")); };
    const cleanup = () => { audio.removeEventListener("loadedmetadata", ok);
                            audio.removeEventListener("error", bad); };
    audio.addEventListener("loadedmetadata", ok);
    audio.addEventListener("error", bad);
  });
}
async function play(id, via) {
  via = via || $("via").value;
  const audio = $("player");
  state.index = state.bursts.findIndex((b) => b.id === id);
  mark(id);
  let duration;
  try {
    audio.src = await source(id, via);
    const metadata = loaded(audio);
    audio.play().catch(() => {});
    duration = await metadata;
  } catch (e) {
    if (via === "proxy") throw e;
    status("S3 link failed (" + e.message + "): playing through this server");
    audio.src = await source(id, "proxy");
    const metadata = loaded(audio);
    audio.play().catch(() => {});
    duration = await metadata;
    via = "proxy";
  }
  const b = state.bursts[state.index];
  status("playing uid " + b.uid + " at " + fmtTime(b.event_time) + " (" + via + ")");
  return { id, duration, via };
}
function playInOrder() {
  if (state.bursts.length) play(state.bursts[0].id).catch((e) => status(e.message));
}
$("player").addEventListener("ended", () => {
  const next = state.bursts[state.index + 1];
  if (next) play(next.id).catch((e) => status(e.message));
});
$("connect").onclick = () => loadGroups().catch((e) => status("error: " + e.message));
$("group").onchange = () => load($("group").value).catch((e) => status("error: " + e.message));
$("hide-empty").onchange = $("group").onchange;
$("play-all").onclick = playInOrder;
const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
if (fromHash) history.replaceState(null, "", location.pathname);  // off the address bar
$("token").value = fromHash || sessionStorage.getItem("fileserver-token") || "";
window.review = { state, load, play, loadGroups,
  get ready() { return state.ready; }, get bursts() { return state.bursts; } };
if (token()) loadGroups().catch((e) => status("error: " + e.message));
"""

BODY = """
<header>
  <label>token <input id="token" type="password" size="30" autocomplete="off"></label>
  <button id="connect">connect</button>
  <select id="group" aria-label="talk group"></select>
  <label><input id="hide-empty" type="checkbox"> hide empty</label>
  <label>last <input id="max" type="number" value="200" min="1" max="2000"> bursts</label>
  <label>audio <select id="via"><option value="s3">from S3</option>
    <option value="proxy">via this server</option></select></label>
  <button id="play-all">play in order</button>
</header>
<div id="timeline" aria-label="timeline"></div>
<audio id="player" controls preload="auto"></audio>
<p id="status">give a token and connect</p>
<table><thead><tr><th>when</th><th>who (uid)</th><th>how long</th><th>speech</th><th></th>
</tr></thead><tbody id="rows"></tbody></table>
"""


def _hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


HTML = (
    "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
    "<title>fileserver: review talk groups</title>"
    f"<style>{STYLE}</style></head><body>{BODY}<script>{SCRIPT}</script></body></html>\n"
)

#: Only this page's own script and style run; audio from S3 (any origin) or ``blob:``.
CSP = (
    f"default-src 'none'; script-src {_hash(SCRIPT)}; style-src {_hash(STYLE)}; "
    "connect-src 'self'; media-src 'self' blob: http: https:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
