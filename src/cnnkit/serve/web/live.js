// cnnkit's live training page: the curves, every epoch's figures and the feature maps of one
// validation image, updated by server-sent events (GET /live/events: one "epoch" event per
// epoch, then "finished"). Helpers ($, el, fmt) come from explore-core.js; the maps arrive as
// the explorer's overview JSON. Text from the run is written with textContent only.
"use strict";

const live = { rows: [], epochs: null, source: null, finished: false };
const SVG = "http://www.w3.org/2000/svg";

function pct(v) {
  return v === null || v === undefined ? "–" : `${(100 * v).toFixed(1)}%`;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

// One chart: training and validation series over the epochs, y from lo to hi.
function chart(node, keys, { lo, hi, label }) {
  const [W, H, L, R, T, B] = [320, 200, 40, 10, 10, 26];
  node.replaceChildren();
  const epochs = live.rows.map((r) => r.epoch);
  const first = Math.min(...epochs, 1);
  const last = Math.max(...epochs, live.epochs || 1, first + 1);
  const x = (e) => L + ((e - first) / (last - first)) * (W - L - R);
  const y = (v) => T + (1 - (v - lo) / (hi - lo || 1)) * (H - T - B);
  for (let i = 0; i <= 4; i++) {
    const v = lo + ((hi - lo) * i) / 4;
    node.append(svg("line", { class: "grid", x1: L, x2: W - R, y1: y(v), y2: y(v) }));
    node.append(svg("text", { x: L - 4, y: y(v) + 3, "text-anchor": "end" }, label(v)));
  }
  node.append(svg("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
  node.append(svg("text", { x: L, y: H - 8 }, `epoch ${first}`));
  node.append(svg("text", { x: W - R, y: H - 8, "text-anchor": "end" }, `${last}`));
  for (const [key, cls] of keys) {
    const points = live.rows.filter((r) => r[key] !== null && r[key] !== undefined).map((r) => [x(r.epoch), y(r[key])]);
    if (points.length > 1) node.append(svg("polyline", { class: cls, points: points.map((p) => p.join(",")).join(" ") }));
    for (const [px, py] of points) node.append(svg("circle", { class: cls, cx: px, cy: py, r: 2.5 }));
  }
}

function drawCurves() {
  const losses = live.rows.flatMap((r) => [r.train_loss, r.val_loss]).filter((v) => v !== null && v !== undefined);
  const top = Math.max(...losses, 0.1);
  chart($("loss-chart"), [["train_loss", "train"], ["val_loss", "val"]], { lo: 0, hi: top * 1.05, label: (v) => v.toFixed(2) });
  chart($("acc-chart"), [["train_acc", "train"], ["val_acc", "val"]], { lo: 0, hi: 1, label: (v) => `${Math.round(100 * v)}%` });
}

function drawTable() {
  const body = $("epochs").tBodies[0];
  body.replaceChildren();
  const scored = live.rows.filter((r) => r.val_acc !== null && r.val_acc !== undefined);
  const best = scored.length ? scored.reduce((a, b) => (b.val_acc > a.val_acc ? b : a)) : null;
  for (const r of live.rows) {
    const tr = el("tr", r === best ? "best" : "");
    tr.dataset.epoch = String(r.epoch);
    const fixed = (v, digits) => (v === null || v === undefined ? "–" : v.toFixed(digits));
    const cells = [String(r.epoch), fixed(r.train_loss, 4), fixed(r.val_loss, 4), pct(r.train_acc), pct(r.val_acc), fixed(r.seconds, 1)];
    for (const text of cells) tr.append(el("td", "", text));
    body.append(tr);
  }
}

function shapeText(shape) {
  return shape.length === 3 ? `${shape[0]} maps of ${shape[1]}×${shape[2]}` : `${shape[0]} values`;
}

// A layer's maps arrive as one block of grey levels (maps x H x W, each map normalised to
// 0-255 on its own) with each map's raw range; each map becomes a small canvas.
function greyThumbs(layer) {
  const bytes = Uint8Array.from(atob(layer.grey), (c) => c.charCodeAt(0));
  const [h, w] = layer.out_shape.slice(1);
  const grid = el("div", "thumbs");
  grid.style.gridTemplateColumns = `repeat(${Math.min(6, Math.ceil(layer.ranges.length / 16))}, auto)`;
  layer.ranges.forEach(([lo, hi], k) => {
    const canvas = el("canvas", "map pixelated");
    canvas.width = w;
    canvas.height = h;
    const image = canvas.getContext("2d").createImageData(w, h);
    for (let i = 0; i < w * h; i++) {
      const v = bytes[k * w * h + i];
      image.data.set([v, v, v, 255], 4 * i);
    }
    canvas.getContext("2d").putImageData(image, 0, 0);
    canvas.setAttribute("role", "img");
    canvas.setAttribute("aria-label", `${layer.name} map ${k}, values ${fmt(lo)} to ${fmt(hi)}`);
    canvas.title = canvas.getAttribute("aria-label");
    grid.append(canvas);
  });
  const box = el("div");
  box.append(grid);
  if (layer.ranges.length < layer.out_shape[0]) box.append(el("p", "note", `first ${layer.ranges.length} of ${layer.out_shape[0]}`));
  return box;
}

function drawMaps(maps) {
  const root = $("overview");
  root.replaceChildren();
  root.dataset.epoch = String(maps.epoch);
  const best = maps.probabilities.indexOf(Math.max(...maps.probabilities));
  const truth = maps.label ? ` (true label ${maps.label})` : "";
  $("maps-info").textContent =
    `After epoch ${maps.epoch}: ${maps.file || "the image"}${truth} is predicted ${maps.classes[best]} (${pct(maps.probabilities[best])}).`;
  const first = el("section", "column input-column");
  const img = el("img", "input-image pixelated");
  img.src = maps.input;
  img.alt = `The validation image as the model sees it${truth}`;
  first.append(el("h3", "", "input"), el("p", "note", shapeText(maps.input_shape)), img);
  root.append(first);
  maps.layers.forEach((layer, i) => {
    const column = el("section", "column");
    column.dataset.layer = layer.name;
    column.append(el("h3", "", layer.name), el("p", "note", `${layer.type} · ${shapeText(layer.out_shape)}`));
    if (layer.grey) {
      column.append(greyThumbs(layer));
    } else if (i === maps.layers.length - 1 && layer.values) {
      const list = el("ol", "bars classes");
      maps.classes.forEach((name, k) => {
        const row = el("li", k === best ? "bar-row top" : "bar-row");
        const track = el("span", "bar-track");
        const fill = el("span", "bar-fill");
        fill.style.width = `${(100 * maps.probabilities[k]).toFixed(1)}%`;
        track.append(fill);
        row.append(el("span", "bar-label", name), track, el("span", "bar-value", pct(maps.probabilities[k])));
        list.append(row);
      });
      column.append(list);
    } else {
      column.append(el("p", "note", `values ${fmt(layer.min)} to ${fmt(layer.max)}`));
    }
    root.append(column);
  });
}

function showStatus(text, finished = false) {
  $("status").textContent = text;
  $("status").classList.toggle("finished", finished);
}

function onEpoch(event) {
  const body = JSON.parse(event.data);
  live.epochs = body.epochs;
  const row = body.row;
  live.rows = live.rows.filter((r) => r.epoch !== row.epoch).concat([row]);
  drawCurves();
  drawTable();
  if (body.maps) drawMaps(body.maps);
  const of = live.epochs ? ` of ${live.epochs}` : "";
  showStatus(`Epoch ${row.epoch}${of} done: validation accuracy ${pct(row.val_acc)}, loss ${fmt(row.val_loss)}.`);
  $("epoch-progress").max = live.epochs || row.epoch;
  $("epoch-progress").value = row.epoch;
  document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
}

function onFinished(event) {
  const body = JSON.parse(event.data);
  live.finished = true;
  live.source.close(); // the server stops now: no reconnecting
  showStatus(body.message, true);
  document.body.dataset.finished = "true";
}

document.addEventListener("DOMContentLoaded", async () => {
  try {
    const state = await fetchJson("/live/state");
    live.epochs = state.epochs;
    $("run-info").textContent = state.title || "A training run";
  } catch (err) {
    $("run-info").textContent = `The training run is not reachable: ${err.message}`;
  }
  drawCurves();
  live.source = new EventSource("/live/events");
  live.source.addEventListener("epoch", onEpoch);
  live.source.addEventListener("finished", onFinished);
  live.source.addEventListener("error", () => {
    if (!live.finished) showStatus("Lost the connection to the training run; retrying…");
  });
});
