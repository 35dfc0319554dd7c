// cnnkit explorer: the overview and one map (see explore-core.js).
"use strict";

// ----------------------------------------------------------------------------- the overview

async function loadModel() {
  try {
    const model = await fetchJson("/model");
    const name = model.model_name ? `${model.model_name}, ` : "";
    const pre = model.preprocessing;
    $("model-info").textContent =
      `${name}${model.classes.length} classes (${model.classes.join(", ")}), ` +
      `${pre.size}×${pre.size}×${pre.channels} input`;
    if (!model.explain) setStatus("This server runs an ONNX file: the explorer needs a run directory.", true);
  } catch (err) {
    $("model-info").textContent = `The model is not available: ${err.message}`;
  }
}

async function analyse(blob, name, trueLabel = null) {
  setStatus(`Looking inside the network for ${name}…`);
  stopAnimation();
  stopSlide();
  try {
    const data = await postImage("/explore/maps", blob, name);
    state.overview = data;
    state.pixels = blobFromDataUrl(data.input);
    renderOverview(data, name, trueLabel);
    const sure = (100 * Math.max(...data.probabilities)).toFixed(1);
    const truth = trueLabel ? `; true label ${trueLabel}` : "";
    setStatus(`${name}: ${data.class} (${sure}%)${truth}. Click a map to see where it comes from.`);
    if (state.selection && state.selection.at !== undefined) await reselect();
  } catch (err) {
    setStatus(err.message, true);
  }
}

function shapeText(shape) {
  return shape.length === 3 ? `${shape[0]} maps of ${shape[1]}×${shape[2]}` : `${shape[0]} values`;
}

function renderOverview(data, name, trueLabel) {
  const root = $("overview");
  root.replaceChildren();
  const first = el("section", "column input-column");
  first.append(el("h3", "", "input"), el("p", "note", shapeText(data.input_shape)));
  const img = el("img", "input-image pixelated");
  img.src = data.input;
  img.alt = `The image as the model sees it: ${name}`;
  first.append(img, el("p", "note", name));
  if (trueLabel) first.append(el("p", "true-label", `true label: ${trueLabel}`));
  root.append(first);
  data.layers.forEach((layer, i) => {
    const column = el("section", "column");
    column.dataset.layer = layer.name;
    column.append(el("h3", "", layer.name), el("p", "note", `${layer.type} · ${shapeText(layer.out_shape)}`));
    if (layer.maps) column.append(thumbs(layer));
    else if (i === data.layers.length - 1 && layer.values) column.append(classRows(layer, data));
    else if (layer.values) column.append(valueCells(layer));
    else {
      const strip = el("img", "strip pixelated");
      strip.src = layer.strip;
      strip.alt = `${layer.name}: ${layer.out_shape[0]} values, normalised together`;
      column.append(strip);
    }
    root.append(column);
  });
  $("overview-card").hidden = false;
}

function thumbs(layer) {
  const grid = el("div", "thumbs");
  grid.style.gridTemplateColumns = `repeat(${Math.min(6, Math.ceil(layer.maps.length / 16))}, auto)`;
  layer.maps.forEach((m, k) => {
    const button = el("button", "map-thumb");
    button.type = "button";
    button.dataset.layer = layer.name;
    button.dataset.map = String(k);
    button.setAttribute("aria-label", `${layer.name} map ${k}, values ${fmt(m.min)} to ${fmt(m.max)}`);
    button.title = `${layer.name} map ${k}: ${fmt(m.min)} (black) to ${fmt(m.max)} (white)`;
    const img = el("img", "pixelated");
    img.src = m.image;
    img.alt = "";
    button.append(img);
    button.addEventListener("click", () => selectMap(layer.name, k));
    grid.append(button);
  });
  const box = el("div");
  box.append(grid);
  if (layer.maps.length < layer.out_shape[0]) box.append(el("p", "note", `first ${layer.maps.length} of ${layer.out_shape[0]}`));
  return box;
}

function valueCells(layer) {
  const grid = el("div", "cells");
  const lo = Math.min(...layer.values);
  const hi = Math.max(...layer.values);
  layer.values.forEach((v, k) => {
    const button = el("button", "value-cell");
    button.type = "button";
    const grey = hi > lo ? Math.round(((v - lo) * 255) / (hi - lo)) : 0;
    button.style.backgroundColor = `rgb(${grey},${grey},${grey})`;
    button.setAttribute("aria-label", `${layer.name} value ${k}: ${fmt(v)}`);
    button.title = `${layer.name} value ${k}: ${fmt(v)}`;
    button.addEventListener("click", () => selectValue(layer.name, k));
    grid.append(button);
  });
  return grid;
}

function classRows(layer, data) {
  const list = el("ol", "bars classes");
  const best = data.probabilities.indexOf(Math.max(...data.probabilities));
  data.classes.forEach((name, k) => {
    const item = el("li");
    const button = el("button", k === best ? "class-row top" : "class-row");
    button.type = "button";
    button.dataset.class = name;
    button.setAttribute("aria-label", `${name}: logit ${fmt(layer.values[k])}, probability ${(100 * data.probabilities[k]).toFixed(1)}%`);
    const track = el("span", "bar-track");
    const fill = el("span", "bar-fill");
    fill.style.width = `${(100 * data.probabilities[k]).toFixed(1)}%`;
    track.append(fill);
    button.append(el("span", "bar-label", name), track, el("span", "bar-value", `${(100 * data.probabilities[k]).toFixed(1)}%`));
    button.addEventListener("click", () => selectValue(layer.name, k));
    item.append(button);
    list.append(item);
  });
  return list;
}

function markSelected() {
  document.querySelectorAll(".map-thumb.selected").forEach((b) => b.classList.remove("selected"));
  const s = state.selection;
  if (!s) return;
  const b = document.querySelector(`.map-thumb[data-layer="${CSS.escape(s.layer)}"][data-map="${s.map}"]`);
  if (b) b.classList.add("selected");
}

// ----------------------------------------------------------------------------- one map

async function selectMap(layer, k) {
  stopAnimation();
  stopSlide();
  state.selection = { layer, map: k, at: null };
  markSelected();
  try {
    state.mapData = await postImage(`/explore/map?layer=${encodeURIComponent(layer)}&map=${k}`, state.pixels);
    state.pixel = null;
    state.cursor = [0, 0];
    renderMap();
    $("pixel-card").hidden = true;
    $("map-card").hidden = false;
    $("map-card").scrollIntoView({ block: "start" });
  } catch (err) {
    setStatus(err.message, true);
  }
}

async function reselect() {
  const s = state.selection;
  if (!state.overview.layers.some((l) => l.name === s.layer)) return;
  if (s.at === null || Array.isArray(s.at)) {
    const isMap = state.overview.layers.find((l) => l.name === s.layer).maps;
    if (isMap) {
      const at = s.at;
      await selectMap(s.layer, s.map);
      if (at) await selectPixel(at[0], at[1]);
    } else await selectValue(s.layer, s.map);
  }
}

function renderMap() {
  const d = state.mapData;
  const p = state.pixel;
  $("map-title").textContent = `3. ${d.layer}, map ${d.map}`;
  const n = d.input_channels;
  let summary;
  if (d.kernels) {
    const [kh, kw] = [d.kernels[0].values.length, d.kernels[0].values[0].length];
    const bias = d.bias === null ? "this layer has none" : fmt(d.bias);
    const over = d.input_layer === "the image" ? `the image's ${n} channel${n > 1 ? "s" : ""} (each normalised)` : `${n} map${n > 1 ? "s" : ""} of ${d.input_layer}`;
    summary = `${d.type}: each value is the sum over ${over} of a ${kh}×${kw} patch times its kernel, plus the bias (${bias}).`;
  } else if (n) {
    summary = `${d.type}: computed from map ${d.map} of ${d.input_layer}, one window or one value at a time.`;
  } else summary = `${d.type}: computed from ${d.input_layer}.`;
  if (d.inputs.length < n) summary += ` The first ${d.inputs.length} of the ${n} input maps are shown.`;
  $("map-summary").textContent = summary + (d.explain ? " Click a value to see its arithmetic." : " This layer type has no pixel explanation yet.");
  const range = Math.max(Math.abs(d.min), Math.abs(d.max));
  paint($("map-canvas"), d.values, { range, size: 288, mark: p ? p.at : null, active: document.activeElement === $("map-canvas") ? state.cursor : null });
  $("map-caption").textContent = `${d.layer} map ${d.map}: ${d.values.length}×${d.values[0].length}, values ${fmt(d.min)} to ${fmt(d.max)}`;
  legend($("map-legend"), "this map", range);
  renderSources();
}

function windowOf(p) {
  if (!p || p.at === null) return null;
  if (p.kernel) return { top: p.origin[0], left: p.origin[1], rows: p.kernel[0].length, cols: p.kernel[0][0].length, step: p.dilation };
  if (p.window && p.origin) return { top: p.origin[0], left: p.origin[1], rows: p.size[0], cols: p.size[1], step: p.dilation || [1, 1] };
  return { top: p.at[0], left: p.at[1], rows: 1, cols: 1, step: [1, 1] };
}

function renderSources(active = null) {
  const d = state.mapData;
  const p = state.pixel;
  const root = $("sources");
  root.replaceChildren();
  if (!d.inputs.length) {
    $("inputs-legend").replaceChildren();
    $("kernels-legend").replaceChildren();
    return;
  }
  const inRange = rangeOf(d.inputs.map((i) => i.values));
  const kRange = d.kernels ? rangeOf(d.kernels.map((k) => k.values)) : 0;
  const win = windowOf(p);
  const pad = p && p.padding ? p.padding : [0, 0];
  d.inputs.forEach((input, i) => {
    const fig = el("figure", "source-pair");
    fig.dataset.channel = String(input.channel);
    if (active && active.channel === i) fig.classList.add("active");
    const canvas = el("canvas", "input-canvas");
    const cell = active && active.channel === i && active.cell ? [win.top + active.cell[0] * win.step[0], win.left + active.cell[1] * win.step[1]] : null;
    paint(canvas, input.values, { range: inRange, size: 150, pad, window: win, active: cell });
    canvas.setAttribute("role", "img");
    const where = d.input_layer === "the image" ? "the image" : d.input_layer;
    canvas.setAttribute("aria-label", `${where}, map ${input.channel}`);
    fig.append(canvas);
    if (d.kernels) {
      const kc = el("canvas", "kernel-canvas");
      const kv = d.kernels[i].values;
      paint(kc, kv, { range: kRange, size: 72, active: active && active.channel === i && active.cell ? active.cell : null });
      kc.setAttribute("role", "img");
      kc.setAttribute("aria-label", `kernel of map ${d.map} for input map ${input.channel}`);
      fig.append(kc);
    }
    const label = d.input_layer === "the image" ? `image channel ${input.channel}` : `${d.input_layer} map ${input.channel}`;
    fig.append(el("figcaption", "", d.kernels ? `${label} × its kernel` : label));
    root.append(fig);
  });
  legend($("inputs-legend"), "input maps", inRange);
  if (d.kernels) legend($("kernels-legend"), "kernels", kRange);
  else $("kernels-legend").replaceChildren();
}

function setUpMapCanvas() {
  const canvas = $("map-canvas");
  const cellAt = (event) => {
    const box = canvas.getBoundingClientRect();
    const d = state.mapData;
    const h = d.values.length;
    const w = d.values[0].length;
    const r = Math.floor(((event.clientY - box.top) / box.height) * h);
    const c = Math.floor(((event.clientX - box.left) / box.width) * w);
    return [Math.max(0, Math.min(h - 1, r)), Math.max(0, Math.min(w - 1, c))];
  };
  canvas.addEventListener("click", (event) => {
    if (!state.mapData || !state.mapData.explain) return;
    state.cursor = cellAt(event);
    selectPixel(state.cursor[0], state.cursor[1]);
  });
  canvas.addEventListener("keydown", (event) => {
    const d = state.mapData;
    if (!d) return;
    const moves = { ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1] };
    if (moves[event.key]) {
      event.preventDefault();
      const [dr, dc] = moves[event.key];
      state.cursor = [
        Math.max(0, Math.min(d.values.length - 1, state.cursor[0] + dr)),
        Math.max(0, Math.min(d.values[0].length - 1, state.cursor[1] + dc)),
      ];
      renderMap();
    } else if ((event.key === "Enter" || event.key === " ") && d.explain) {
      event.preventDefault();
      selectPixel(state.cursor[0], state.cursor[1]);
    }
  });
  canvas.addEventListener("focus", () => state.mapData && renderMap());
  canvas.addEventListener("blur", () => state.mapData && renderMap());
}

document.addEventListener("DOMContentLoaded", () => {
  setUpDropzone(analyse);
  setUpCanvas(analyse, "use-drawing");
  setUpCamera();
  setUpSamples();
  setUpMapCanvas();
  $("animate").addEventListener("click", toggleAnimation);
  $("step-next").addEventListener("click", () => { stopAnimation(); showStep(state.step + 1); });
  $("step-back").addEventListener("click", () => { stopAnimation(); showStep(state.step - 1); });
  $("slide").addEventListener("click", toggleSlide);
  loadModel();
});
