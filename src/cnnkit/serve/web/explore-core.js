// cnnkit's explorer: the network's maps for one image, where a map comes from, and the
// arithmetic behind any value (POST /explore/maps, /explore/map, /explore/pixel). Every number
// shown comes from the server's JSON (data-value holds it exactly); text from a user or a
// model is written with textContent, never parsed as HTML. No inline script: the CSP forbids it.
//
// Four classic scripts share one global scope, loaded in order: explore-core.js (state,
// helpers, colours), explore-inputs.js (file, drawing, camera, validation images),
// explore-pixel.js (one value's arithmetic and its animation), explore.js (overview, one map).
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  pixels: null, // the model-sized PNG of the current image (sent with every later request)
  overview: null, // POST /explore/maps
  mapData: null, // POST /explore/map
  pixel: null, // POST /explore/pixel
  selection: null, // {layer, map}
  cursor: [0, 0], // keyboard position on the map
  steps: [], // the animation's steps
  step: -1,
  timer: null,
  slider: null,
};
const SHOWN_CHANNELS = 8; // input maps written out before "show all"

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function fmt(v) {
  if (v === null || v === undefined) return "–";
  if (Number.isInteger(v)) return String(v);
  return String(Number(v.toPrecision(5)));
}

// A number as shown: rounded text, the exact JSON value in data-value.
function num(v, part) {
  const node = el("span", "num", fmt(v));
  node.dataset.value = String(v);
  if (part) node.dataset.part = part;
  return node;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function fetchJson(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try {
    body = await response.json();
  } catch (err) {
    body = { error: `unexpected answer (${response.status})` };
  }
  if (!response.ok) throw new Error(body && body.error ? body.error : `request failed (${response.status})`);
  return body;
}

function postImage(url, blob, name = "image.png") {
  const form = new FormData();
  form.append("file", blob, name);
  return fetchJson(url, { method: "POST", body: form });
}

function blobFromDataUrl(url) {
  const [head, data] = url.split(",");
  const bytes = atob(data);
  const array = new Uint8Array(bytes.length);
  for (let i = 0; i < bytes.length; i++) array[i] = bytes.charCodeAt(i);
  return new Blob([array], { type: head.slice(5).split(";")[0] });
}

// ----------------------------------------------------------------------------- colours

// Blue for negative, white for zero, red for positive: the scale is centred on zero.
function colour(v, range) {
  const t = range > 0 ? Math.max(-1, Math.min(1, v / range)) : 0;
  const [r, g, b] = t >= 0 ? [178, 24, 43] : [33, 102, 172];
  const a = Math.abs(t);
  return `rgb(${Math.round(255 + a * (r - 255))},${Math.round(255 + a * (g - 255))},${Math.round(255 + a * (b - 255))})`;
}

function rangeOf(grids) {
  let m = 0;
  for (const grid of grids) for (const row of grid) for (const v of row) if (v !== null) m = Math.max(m, Math.abs(v));
  return m;
}

function legend(node, label, range) {
  node.replaceChildren();
  node.append(el("span", "legend-label", label), num(-range), el("span", "legend-bar"), num(range));
  node.title = `${label}: blue below zero, white at zero, red above`;
}

// Draw a 2-D grid of values with `pad` cells of padding around it; outline `window` cells
// ({top, left, rows, cols, step}) and mark one cell.
function paint(canvas, values, { range, size, pad = [0, 0], window = null, mark = null, active = null }) {
  const h = values.length;
  const w = values[0].length;
  const cell = Math.max(2, Math.min(28, Math.floor(size / Math.max(h + 2 * pad[0], w + 2 * pad[1]))));
  canvas.width = (w + 2 * pad[1]) * cell;
  canvas.height = (h + 2 * pad[0]) * cell;
  canvas.dataset.cell = String(cell);
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#e3e7ec"; // the padding: zeros outside the map
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  for (let r = 0; r < h; r++) {
    for (let c = 0; c < w; c++) {
      ctx.fillStyle = colour(values[r][c], range);
      ctx.fillRect((c + pad[1]) * cell, (r + pad[0]) * cell, cell, cell);
    }
  }
  const box = (r, c, colourName, width) => {
    ctx.strokeStyle = colourName;
    ctx.lineWidth = width;
    ctx.strokeRect((c + pad[1]) * cell + width / 2, (r + pad[0]) * cell + width / 2, cell - width, cell - width);
  };
  if (window) {
    for (let i = 0; i < window.rows; i++) {
      for (let j = 0; j < window.cols; j++) box(window.top + i * window.step[0], window.left + j * window.step[1], "#111", Math.max(1, cell / 8));
    }
  }
  if (active) box(active[0], active[1], "#f5a300", Math.max(2, cell / 4));
  if (mark) box(mark[0], mark[1], "#111", Math.max(2, cell / 4));
}
