// ELIT-stream live view: draws what the view server sends over one websocket; sends operator
// actions back. Plain JS, no libraries, no build step (docs/view.md).
"use strict";

const $ = (id) => document.getElementById(id);
const S = { status: null, result: null, images: null, nextId: 1, unc_max: 0.25 };

// ---------------------------------------------------------------- colour maps
// viridis (uncertainty, low = dark blue, high = yellow), from 9 control points
const VIRIDIS = [[68, 1, 84], [72, 40, 120], [62, 73, 137], [49, 104, 142], [38, 130, 142],
  [31, 158, 137], [53, 183, 121], [109, 205, 89], [180, 222, 44], [253, 231, 37]];
function lut(points) {
  const out = new Uint8ClampedArray(256 * 3);
  for (let i = 0; i < 256; i++) {
    const f = (i / 255) * (points.length - 1), k = Math.min(points.length - 2, Math.floor(f));
    const t = f - k;
    for (let c = 0; c < 3; c++) out[3 * i + c] = points[k][c] * (1 - t) + points[k + 1][c] * t;
  }
  return out;
}
const LUT_UNC = lut(VIRIDIS);
// atoms on the grey frame: green (members agree) -> yellow -> red (members disagree)
const LUT_ATOM = lut([[0, 200, 90], [150, 230, 40], [255, 220, 0], [255, 120, 0], [240, 30, 60]]);
const LUT_GRAY = lut([[0, 0, 0], [255, 255, 255]]);
const LUT_HOT = lut([[0, 0, 0], [120, 20, 0], [230, 90, 0], [255, 200, 40], [255, 255, 220]]);
const unc_rgb = (u) => {
  const i = 3 * Math.max(0, Math.min(255, Math.round((255 * u) / S.unc_max)));
  return `rgb(${LUT_ATOM[i]},${LUT_ATOM[i + 1]},${LUT_ATOM[i + 2]})`;
};

function decode(img) {            // {w, h, data: base64 uint8} -> Uint8Array
  const bin = atob(img.data), a = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) a[i] = bin.charCodeAt(i);
  return a;
}
function toCanvas(img, table) {   // an offscreen canvas at the image's own size
  const c = document.createElement("canvas");
  c.width = img.w; c.height = img.h;
  const ctx = c.getContext("2d"), id = ctx.createImageData(img.w, img.h), v = decode(img);
  for (let i = 0; i < v.length; i++) {
    id.data[4 * i] = table[3 * v[i]]; id.data[4 * i + 1] = table[3 * v[i] + 1];
    id.data[4 * i + 2] = table[3 * v[i] + 2]; id.data[4 * i + 3] = 255;
  }
  ctx.putImageData(id, 0, 0);
  return c;
}
function drawScaled(canvas, src) {
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.fillStyle = "#000"; ctx.fillRect(0, 0, canvas.width, canvas.height);
  const z = Math.min(canvas.width / src.width, canvas.height / src.height);
  ctx.drawImage(src, 0, 0, src.width * z, src.height * z);
  return z;
}
function colourBar(canvas, table) {
  const ctx = canvas.getContext("2d");
  for (let y = 0; y < canvas.height; y++) {
    const i = 3 * Math.round(255 * (1 - y / (canvas.height - 1)));
    ctx.fillStyle = `rgb(${table[i]},${table[i + 1]},${table[i + 2]})`;
    ctx.fillRect(0, y, canvas.width, 1);
  }
}

// ---------------------------------------------------------------- the frame with atoms
const MARKERS = ["circle", "square", "triangle", "diamond"];
function marker(ctx, kind, x, y, r) {
  ctx.beginPath();
  if (kind === "square") ctx.rect(x - r, y - r, 2 * r, 2 * r);
  else if (kind === "triangle") { ctx.moveTo(x, y - 1.3 * r); ctx.lineTo(x + 1.2 * r, y + r); ctx.lineTo(x - 1.2 * r, y + r); ctx.closePath(); }
  else if (kind === "diamond") { ctx.moveTo(x, y - 1.4 * r); ctx.lineTo(x + 1.4 * r, y); ctx.lineTo(x, y + 1.4 * r); ctx.lineTo(x - 1.4 * r, y); ctx.closePath(); }
  else ctx.arc(x, y, r, 0, 2 * Math.PI);
}
function drawFrame() {
  const canvas = $("frame"), ctx = canvas.getContext("2d");
  const im = S.images, res = (im && im.result) || S.result;
  let pxPerFramePx;                                  // display px per input-frame px
  if (im) {
    const z = drawScaled(canvas, toCanvas(im.image, LUT_GRAY));
    pxPerFramePx = z / im.frame_px_per_px;
  } else if (res && res.frame_shape) {
    ctx.fillStyle = "#000"; ctx.fillRect(0, 0, canvas.width, canvas.height);
    pxPerFramePx = Math.min(canvas.width / res.frame_shape[1], canvas.height / res.frame_shape[0]);
  } else return;
  let drawn = 0;
  if (res) {
    const a = res.atoms, r = Math.max(2.5, Math.min(7, 0.35 * pxPerFramePx * 5));
    for (let i = 0; i < a.x.length; i++) {
      const kind = MARKERS[a.cls[i] % MARKERS.length];
      marker(ctx, kind, (a.x[i] + 0.5) * pxPerFramePx, (a.y[i] + 0.5) * pxPerFramePx,
        a.cls[i] ? 1.4 * r : r);
      ctx.lineWidth = 3.2; ctx.strokeStyle = "rgba(0,0,0,0.7)"; ctx.stroke();
      ctx.lineWidth = 1.6; ctx.strokeStyle = unc_rgb(a.u[i]); ctx.stroke(); drawn++;
    }
    scaleBar(ctx, canvas, pxPerFramePx, res.pixel_size_pm);
    $("legend").textContent = "markers: " + (res.classes || []).map((c, i) =>
      `${c} ${["○", "□", "△", "◇"][i % 4]}`).join("  ·  ") +
      (res.atoms_shown < res.n_atoms ? `  (first ${res.atoms_shown} of ${res.n_atoms} drawn)` : "");
    $("frame-meta").textContent = `${res.acquisition} · frame ${res.frame_id}` +
      (im && im.result ? "" : " (no image: maps off)");
  }
  canvas.dataset.atomsDrawn = String(drawn);
}
function scaleBar(ctx, canvas, pxPerFramePx, pixelSizePm) {
  if (!pixelSizePm) { ctx.fillStyle = "#fff"; ctx.fillText("pixel size unknown", 8, canvas.height - 10); return; }
  const nmPerPx = pixelSizePm / 1000 / pxPerFramePx, want = (canvas.width / 5) * nmPerPx;
  const nice = [0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100].reduce((b, v) => (v <= want ? v : b), 0.1);
  const len = nice / nmPerPx, x0 = 12, y0 = canvas.height - 14;
  ctx.fillStyle = "rgba(0,0,0,0.55)"; ctx.fillRect(x0 - 6, y0 - 20, len + 12, 28);
  ctx.fillStyle = "#fff"; ctx.fillRect(x0, y0, len, 4);
  ctx.font = "12px system-ui"; ctx.fillText(`${nice} nm`, x0, y0 - 6);
}

// ---------------------------------------------------------------- uncertainty map, members
function drawImages() {
  const im = S.images;
  drawFrame();
  if (!im) return;
  drawScaled($("unc"), toCanvas(im.uncertainty, LUT_UNC));
  $("unc-frame-max").textContent = im.unc_frame_max.toFixed(3);
  im.members.forEach((m, i) => {
    const c = document.querySelector(`#member-${i} canvas`);
    if (c) drawScaled(c, toCanvas(m, LUT_HOT));
  });
}
function memberCards() {
  const st = S.status, res = S.result || (S.images && S.images.result);
  if (!st || !st.members) return;
  const strip = $("members"), active = new Set(st.active || []);
  st.members.forEach((m, i) => {
    let card = $(`member-${m.id}`);
    if (!card) {
      card = document.createElement("div");
      card.id = `member-${m.id}`; card.className = "member"; card.dataset.member = m.id;
      card.innerHTML = `<div class="name"><span>member ${m.id}</span><span class="state"></span></div>
        <canvas width="122" height="122"></canvas><div class="fig"></div>
        <button type="button"></button>`;
      card.addEventListener("click", () => toggleMember(card));
      strip.appendChild(card);
    }
    const on = active.has(m.id), streak = m.outlier_streak || 0;
    card.classList.toggle("inactive", !on);
    card.classList.toggle("outlier", on && streak >= 3);
    card.classList.toggle("watch", on && streak > 0 && streak < 3);
    card.querySelector(".state").textContent = on ? "active" : "off";
    card.querySelector("button").textContent = on ? "deselect" : "select";
    const count = res && res.count_per_member ? res.count_per_member[i] : m.count_last;
    const dis = res && res.disagreement_per_member ? res.disagreement_per_member[i] : m.disagreement_last;
    card.querySelector(".fig").innerHTML =
      `<span></span><i>now</i><i>avg</i>` +
      `<span>count</span><b>${fmt(count, 0)}</b><i>${fmt(m.count_mean, 0)}</i>` +
      `<span>disagr.</span><b>${fmt(dis, 3)}</b><i>${fmt(m.disagreement_mean, 3)}</i>` +
      `<span>z</span><b>${fmt(m.z_last, 1)}</b><i></i>` +
      `<span>streak</span><b>${streak}</b><i></i>`;
  });
}
const fmt = (v, d) => (v === null || v === undefined || Number.isNaN(v) ? "–" : Number(v).toFixed(d));
function toggleMember(card) {     // what the operator sees on the card decides
  const id = Number(card.dataset.member);
  act({ cmd: card.classList.contains("inactive") ? "select" : "deselect", members: [id] });
}

// ---------------------------------------------------------------- status, events, health
function drawStatus() {
  const st = S.status;
  $("service").textContent = st.ok ? `service ${st.model ? st.model.provider + " · " + st.model.precision : ""}` : st.error;
  $("service").className = "pill " + (st.ok ? "ok" : "bad");
  if (st.ok) {
    $("model").textContent = st.model.name;
    $("active").textContent = `${st.active.length}/${st.model.members.length} (v${st.active_version})`;
    if (document.activeElement !== $("threshold")) $("threshold").value = st.params.threshold;
  }
  const sel = $("models"), names = st.models || [];
  if (sel.dataset.names !== names.join("|")) {
    sel.innerHTML = names.map((n) => `<option>${n}</option>`).join("");
    sel.dataset.names = names.join("|");
  }
  memberCards();
}
function drawResult() {
  const r = S.result;
  $("frame-counter").textContent = String(r.seq);
  $("n-atoms").textContent = String(r.n_atoms) +
    (r.unconfirmed ? ` (+${r.unconfirmed} unconfirmed)` : "");
  $("mean-unc").textContent = r.mean_uncertainty.toFixed(3);
  if (!S.images) drawFrame();
  memberCards();
}
function drawEvents(list) {
  const ol = $("events");
  ol.innerHTML = "";
  for (const e of list.slice().reverse()) {
    const li = document.createElement("li");
    li.className = e.kind;
    const when = new Date(e.time * 1000).toLocaleTimeString();
    const where = e.frame !== undefined && e.frame !== null ? ` · from frame ${e.frame}` :
      (e.frame_seq !== undefined ? ` · from frame seq ${e.frame_seq}` :
        (e.kind === "subset" ? " · from the next frame" : ""));
    li.innerHTML = `<span class="when">${when}</span><b>${e.event}</b>${where}<br>`;
    li.appendChild(document.createTextNode(e.text));
    ol.appendChild(li);
  }
}
function plot(canvas, t, series, opts = {}) {
  const ctx = canvas.getContext("2d"), W = canvas.width, H = canvas.height, L = 34, B = 14;
  ctx.clearRect(0, 0, W, H);
  let ymax = opts.ymin || 1;
  for (const s of series) for (const v of s.v) if (v !== null && v > ymax) ymax = v;
  ymax *= 1.1;
  const t0 = t.length ? Math.min(t[0], -60) : -60;
  const X = (x) => L + ((x - t0) / (0 - t0)) * (W - L - 4), Y = (y) => H - B - (y / ymax) * (H - B - 6);
  ctx.strokeStyle = "#444c56"; ctx.fillStyle = "#9aa3ad"; ctx.font = "10px system-ui";
  ctx.beginPath(); ctx.moveTo(L, 4); ctx.lineTo(L, H - B); ctx.lineTo(W, H - B); ctx.stroke();
  ctx.fillText(ymax >= 100 ? String(Math.round(ymax)) : ymax.toPrecision(2), 2, 12); ctx.fillText("0", 24, H - B);
  ctx.fillText(`${Math.round(t0)} s`, L, H - 2); ctx.fillText("now", W - 22, H - 2);
  series.forEach((s, k) => {
    ctx.strokeStyle = s.c; ctx.lineWidth = 1.4; ctx.setLineDash(s.dash || []); ctx.beginPath();
    let pen = false;
    s.v.forEach((v, i) => {
      if (v === null) { pen = false; return; }
      if (pen) ctx.lineTo(X(t[i]), Y(v)); else ctx.moveTo(X(t[i]), Y(v));
      pen = true;
    });
    ctx.stroke(); ctx.setLineDash([]);
    if (series.length > 1) { ctx.fillStyle = s.c; ctx.fillText(s.n, L + 6 + 52 * k, 12); }
  });
}
function drawHealth(h) {
  const t = h.t;
  $("health-span").textContent = t.length ? `${Math.round(-t[0] / 60 * 10) / 10} min` : "–";
  plot($("h-fps"), t, [{ n: "fps", v: h.fps, c: "#58a6ff" }]);
  plot($("h-stage"), t, [{ n: "total", v: h.total, c: "#e6e6e6", dash: [4, 3] }, { n: "infer", v: h.infer, c: "#f0883e" },
    { n: "analyse", v: h.analyse, c: "#3fb950" }, { n: "prepare", v: h.prepare, c: "#bc8cff" }]);
  plot($("h-queue"), t, [{ n: "queue", v: h.queue_depth, c: "#d29922" }]);
  plot($("h-drop"), t, [{ n: "dropped", v: h.dropped, c: "#d29922" }, { n: "rejected", v: h.rejected, c: "#f85149" }]);
  $("drop-totals").textContent = `(total ${h.dropped_total ?? "–"} / ${h.rejected_total ?? "–"})`;
}

// ---------------------------------------------------------------- actions
let ws = null;
function act(req) {
  const id = S.nextId++;
  $("reply").className = "reply"; $("reply").textContent = `${req.cmd} … waiting for the service`;
  ws.send(JSON.stringify({ type: "action", id, ...req }));
}
function showReply(msg) {
  const r = msg.reply, el = $("reply");
  el.className = "reply " + (r.ok ? "ok" : "err");
  el.textContent = r.ok
    ? `${msg.cmd}: ok` + (r.active ? ` · active ${JSON.stringify(r.active)} (v${r.active_version})` : "") +
      (r.params ? ` · ${JSON.stringify(r.params)}` : "") + (r.load_s ? ` · loaded in ${r.load_s} s` : "")
    : `${msg.cmd} refused: ${r.error.code}: ${r.error.message}`;
}
$("reset").onclick = () => act({ cmd: "reset" });
$("set-threshold").onclick = () => act({ cmd: "set_params", threshold: Number($("threshold").value) });
$("load-model").onclick = () => { if ($("models").value) act({ cmd: "load_model", path: $("models").value }); };

// ---------------------------------------------------------------- the websocket
function connect() {
  const base = location.pathname.replace(/[^/]*$/, "");
  ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}${base}ws${location.search}`);
  ws.onopen = () => { $("conn").textContent = "live"; $("conn").className = "pill ok"; };
  ws.onclose = () => { $("conn").textContent = "disconnected, retrying"; $("conn").className = "pill bad"; setTimeout(connect, 2000); };
  ws.onmessage = (ev) => {
    const m = JSON.parse(ev.data);
    if (m.type === "hello") { S.unc_max = m.unc_max; $("cbar-top").textContent = $("cbar-map-top").textContent = `≥ ${m.unc_max}`; }
    else if (m.type === "status") {   // a missed poll keeps the last known members on screen
      S.status = m.ok || !S.status ? m : { ...S.status, ok: false, error: m.error, models: m.models };
      drawStatus();
    }
    else if (m.type === "result") { S.result = m; drawResult(); }
    else if (m.type === "images") { S.images = m; if (m.result) { S.result = S.result && S.result.seq > m.result.seq ? S.result : m.result; } drawImages(); if (S.result) drawResult(); }
    else if (m.type === "events") drawEvents(m.events);
    else if (m.type === "health") drawHealth(m);
    else if (m.type === "reply") showReply(m);
  };
}
colourBar($("cbar-atoms"), LUT_ATOM); colourBar($("cbar-map"), LUT_UNC);
connect();
