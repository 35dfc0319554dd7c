// cnnkit's page: choose, drop or draw an image; show the probabilities, then the feature
// maps and Grad-CAM. Everything a user or a model supplies is written with textContent or
// as an image source, never parsed as HTML. No inline script: the CSP forbids it.
"use strict";

const $ = (id) => document.getElementById(id);
let model = null; // GET /model
let busy = false;

function setStatus(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// A server started with --token needs it on every API request: open the page once as
// /#token=TOKEN; the token is kept for this tab only and taken out of the address bar.
const TOKEN_KEY = "cnnkit-token";
const tokenInUrl = /^#token=([^&]+)/.exec(window.location.hash);
if (tokenInUrl) {
  try {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(tokenInUrl[1]));
  } catch (err) {
    // a malformed %-escape: no token kept, the server will say what is missing
  }
  history.replaceState(null, "", window.location.pathname + window.location.search);
}

async function fetchJson(url, options = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const auth = token ? { Authorization: `Bearer ${token}` } : {};
  const response = await fetch(url, { ...options, headers: { ...auth, ...options.headers } });
  let body = null;
  try {
    body = await response.json();
  } catch (err) {
    body = { error: `unexpected answer (${response.status})` };
  }
  if (!response.ok) {
    const hint = response.status === 401 ? " (open this page as /#token=TOKEN)" : "";
    throw new Error((body && body.error ? body.error : `request failed (${response.status})`) + hint);
  }
  return body;
}

// ----------------------------------------------------------------------------- the model

async function loadModel() {
  try {
    model = await fetchJson("/model");
    const name = model.model_name ? `${model.model_name}, ` : "";
    $("model-info").textContent =
      `${name}${model.classes.length} classes (${model.classes.join(", ")}), ` +
      `${model.preprocessing.size}×${model.preprocessing.size} input, ${model.format}`;
    if (!model.explain) {
      $("explain-status").textContent =
        `This server runs an exported ${model.format} file: ` +
        "feature maps and Grad-CAM need a run directory.";
    }
  } catch (err) {
    $("model-info").textContent = `The model is not available: ${err.message}`;
  }
}

// ----------------------------------------------------------------------------- images

// An <img> is shown only once its picture has loaded: before that (and when it fails) its
// container stays hidden, so no state of the page shows a broken-image icon.
function showImage(img, src, container) {
  container.hidden = true;
  img.onload = () => { container.hidden = false; };
  img.onerror = () => {
    img.removeAttribute("src");
    container.hidden = true;
  };
  img.src = src;
}

function clearImage(img) {
  img.onload = null;
  img.onerror = null;
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  img.removeAttribute("src");
}

// Forget the previous image's feature maps and Grad-CAM, so they never sit beside another.
function clearExplanation(text) {
  $("gradcam").hidden = true;
  clearImage($("model-input"));
  clearImage($("gradcam-image"));
  $("layers").replaceChildren();
  $("explain-status").textContent = text;
}

// ----------------------------------------------------------------------------- results

function showProbabilities(prediction) {
  const list = $("probabilities");
  list.replaceChildren();
  const entries = Object.entries(prediction.probabilities).sort((a, b) => b[1] - a[1]);
  entries.forEach(([name, p], i) => {
    const row = el("li", i === 0 ? "bar-row top" : "bar-row");
    row.dataset.class = name;
    const label = el("span", "bar-label", name);
    label.title = name;
    const track = el("span", "bar-track");
    const fill = el("span", "bar-fill");
    fill.style.width = `${(100 * p).toFixed(1)}%`; // CSSOM, allowed by the CSP
    track.append(fill);
    row.append(label, track, el("span", "bar-value", `${(100 * p).toFixed(1)}%`));
    list.append(row);
  });
  setStatus(`${prediction.class} (${(100 * prediction.confidence).toFixed(1)}%)`);
}

function showExplanation(data) {
  $("model-input").src = data.input;
  $("gradcam-image").src = data.gradcam;
  $("gradcam-caption").textContent =
    `Grad-CAM for “${data.class}” (layer ${data.gradcam_layer}): bright means evidence`;
  $("gradcam").hidden = false; // data: URIs made by the server, never a broken link
  const layers = $("layers");
  layers.replaceChildren();
  for (const layer of data.layers) {
    const section = el("section", "layer");
    section.dataset.layer = layer.name;
    const [c, h, w] = layer.shape;
    section.append(el("h3", "", `${layer.name} · ${layer.type} · ${c} maps of ${h}×${w}`));
    const shown = layer.maps.length < c ? ` (first ${layer.maps.length} shown)` : "";
    section.append(
      el("p", "range note", `values from ${layer.min.toPrecision(3)} (black) to ` +
        `${layer.max.toPrecision(3)} (white)${shown}`),
    );
    const maps = el("div", "maps");
    layer.maps.forEach((src, i) => {
      const img = el("img", "map");
      img.src = src;
      img.alt = `${layer.name} map ${i + 1}`;
      maps.append(img);
    });
    section.append(maps);
    layers.append(section);
  }
  $("explain-status").textContent =
    `${data.layers.length} layers with feature maps, from the first convolution to the last.`;
}

// ----------------------------------------------------------------------------- classify

async function classify(blob, name) {
  if (busy) return;
  busy = true;
  document.querySelectorAll("button").forEach((b) => { b.disabled = true; });
  const preview = $("preview");
  clearImage(preview);
  $("preview-name").textContent = name;
  // shown once the browser could draw it: a file it cannot decode leaves no broken icon
  showImage(preview, URL.createObjectURL(blob), $("preview-figure"));
  if (model && model.explain) clearExplanation("Waiting for the prediction…");
  $("probabilities").replaceChildren();
  $("latency").textContent = "";
  setStatus("Classifying…");
  const form = () => {
    const data = new FormData();
    data.append("file", blob, name);
    return data;
  };
  try {
    const result = await fetchJson("/predict", { method: "POST", body: form() });
    showProbabilities(result.predictions[0]);
    $("latency").textContent = `answered in ${result.latency_ms.total.toFixed(1)} ms`;
    if (model && model.explain) {
      $("explain-status").textContent = "Computing feature maps and Grad-CAM…";
      showExplanation(await fetchJson("/explain", { method: "POST", body: form() }));
    }
  } catch (err) {
    setStatus(err.message, true);
    if (model && model.explain) {
      clearExplanation("No feature maps: the image could not be classified.");
    }
  } finally {
    busy = false;
    document.querySelectorAll("button").forEach((b) => { b.disabled = false; });
  }
}

document.addEventListener("DOMContentLoaded", () => {
  setUpDropzone(classify);
  setUpCanvas(classify, "classify-drawing");
  loadModel();
});
