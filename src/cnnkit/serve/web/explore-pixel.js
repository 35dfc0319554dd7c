// cnnkit explorer: one value's arithmetic, step by step (see explore-core.js).
"use strict";

// ----------------------------------------------------------------------------- one value

async function selectPixel(y, x) {
  const s = state.selection;
  stopAnimation();
  try {
    const url = `/explore/pixel?layer=${encodeURIComponent(s.layer)}&map=${s.map}&y=${y}&x=${x}`;
    state.pixel = await postImage(url, state.pixels);
    s.at = [y, x];
    state.cursor = [y, x];
    renderMap();
    renderPixel();
  } catch (err) {
    setStatus(err.message, true);
  }
}

async function selectValue(layer, k) {
  stopAnimation();
  stopSlide();
  state.selection = { layer, map: k, at: null };
  markSelected();
  try {
    state.pixel = await postImage(`/explore/pixel?layer=${encodeURIComponent(layer)}&map=${k}`, state.pixels);
    $("map-card").hidden = true;
    renderPixel();
  } catch (err) {
    setStatus(err.message, true);
  }
}

// A small matrix of numbers; with `range`, each cell tinted on the zero-centred scale.
function table(grid, className, highlight = null, caption = null, range = 0) {
  const t = el("table", `grid ${className}`);
  if (caption) t.append(el("caption", "", caption));
  grid.forEach((row, r) => {
    const tr = el("tr");
    row.forEach((v, c) => {
      const td = el("td");
      if (v === null) {
        td.textContent = "0";
        td.className = "padding";
        td.title = "padding: outside the map";
      } else {
        td.append(num(v));
        if (range > 0) {
          td.style.backgroundColor = colour(v, range);
          if (Math.abs(v) > 0.6 * range) td.classList.add("strong");
        }
      }
      if (highlight && highlight[0] === r && highlight[1] === c) td.classList.add("hit");
      tr.append(td);
    });
    t.append(tr);
  });
  return t;
}

function convBlocks(p, root, showAll) {
  const n = p.input_channels.length;
  const shown = showAll ? n : Math.min(n, SHOWN_CHANNELS);
  const ranges = { patch: rangeOf(p.patch), kernel: rangeOf(p.kernel), products: rangeOf(p.products) };
  for (let i = 0; i < shown; i++) {
    const block = el("div", "term");
    block.dataset.channel = String(i);
    const c = p.input_channels[i];
    const what = p.input_layer === "the image" ? `image channel ${c}` : `${p.input_layer} map ${c}`;
    block.append(el("h4", "", what));
    const row = el("div", "equation");
    if (p.pixels) row.append(table(p.pixels[i], "pixels", null, "pixels"), el("span", "op", "→"));
    const patch = p.patch[i].map((r, y) => r.map((v, x) => (p.inside[y][x] ? v : null)));
    row.append(table(patch, "patch", null, "patch", ranges.patch), el("span", "op", "×"));
    row.append(table(p.kernel[i], "kernel", null, "kernel", ranges.kernel), el("span", "op", "="));
    row.append(table(p.products[i], "products", null, "products", ranges.products));
    const sum = el("span", "op");
    sum.append("sum ", num(p.channel_sums[i], `channel-sum-${i}`));
    row.append(sum);
    block.append(row);
    root.append(block);
  }
  if (p.normalisation) {
    root.append(el("p", "note", "The image's pixels p enter the network as (p / 255 − mean) / std of their colour channel, as in training."));
  }
  if (shown < n) {
    const more = el("button", "secondary", `Show all ${n} input maps`);
    more.type = "button";
    more.addEventListener("click", () => renderPixel(true));
    root.append(more);
  }
}

function sumsRow(body, label, value, part, extra) {
  const tr = el("tr");
  tr.append(el("th", "", label));
  const td = el("td");
  td.append(num(value, part));
  tr.append(td, el("td", "note", extra || ""));
  body.append(tr);
}

function renderPixel(showAll = false) {
  const p = state.pixel;
  const root = $("pixel-view");
  root.replaceChildren();
  const where = p.at ? `row ${p.at[0]}, column ${p.at[1]}` : `value ${p.map}${p.label ? ` (${p.label})` : ""}`;
  root.append(el("h3", "", `${p.layer} (${p.type}), ${p.at ? `map ${p.map}, ` : ""}${where}`));
  const work = el("div", "work");
  if (p.products) convBlocks(p, work, showAll);
  else if (p.window && p.origin) {
    const winner = p.winner ? [p.winner[0] - p.origin[0], p.winner[1] - p.origin[1]] : null;
    work.append(table(p.window, "window", winner, `window of ${p.input_layer} map ${p.map}`));
  } else if (p.contributions) {
    const t = el("table", "contributions");
    t.append(el("caption", "", `the largest of ${p.inputs} contributions (input × weight)`));
    const head = el("tr");
    ["input", "from", "value", "weight", "product"].forEach((h) => head.append(el("th", "", h)));
    t.append(head);
    p.contributions.forEach((c) => {
      const tr = el("tr");
      const from = c.source ? (c.source.length === 3 ? `map ${c.source[0]} (${c.source[1]}, ${c.source[2]})` : `value ${c.source[0]}`) : "";
      tr.append(el("td", "", String(c.index)), el("td", "", from));
      for (const v of [c.input, c.weight, c.product]) {
        const td = el("td");
        td.append(num(v));
        tr.append(td);
      }
      t.append(tr);
    });
    if (p.others.count) {
      const tr = el("tr");
      tr.append(el("td", "", `${p.others.count} others`), el("td"), el("td"), el("td"));
      const td = el("td");
      td.append(num(p.others.sum));
      tr.append(td);
      t.append(tr);
    }
    work.append(t);
  }
  const text = el("pre", "lines", p.lines.join("\n"));
  if (p.products || p.contributions) {
    const details = el("details");
    details.append(el("summary", "", "The same as text"), text);
    work.append(details);
  } else work.append(text);
  root.append(work);

  const sums = el("table", "sums");
  const body = el("tbody");
  if (p.sum !== undefined && p.products) sumsRow(body, `sum of the ${p.input_channels.length} input maps`, p.sum, "sum");
  if (p.sum !== undefined && p.contributions) sumsRow(body, `sum of all ${p.inputs} contributions`, p.sum, "sum");
  if (p.bias !== undefined) sumsRow(body, "+ bias", p.bias, "bias", p.has_bias ? "" : "this layer has no bias");
  sumsRow(body, "= value", p.value, "value", "this explanation's arithmetic (float64)");
  sumsRow(body, "the model's own value", p.model_value, "model_value", `difference ${p.difference.toExponential(1)}, float32 tolerance ${p.tolerance.toExponential(1)}${p.matches ? " ✓" : " ✗"}`);
  if (p.activation) {
    sumsRow(body, "before the activation", p.pre_activation, "pre_activation");
    p.after.forEach((step, i) => sumsRow(body, `then ${step.layer}`, step.value, `after-${i}`, step.formula));
    sumsRow(body, `after ${p.activation}`, p.post_activation, "post_activation");
  }
  const [lo, hi] = p.display_range;
  const minus = (v) => (v < 0 ? `(${fmt(v)})` : fmt(v));
  const scale = hi > lo ? `(${fmt(p.model_value)} − ${minus(lo)}) × 255 / (${fmt(hi)} − ${minus(lo)}), rounded` : "a constant map is drawn black";
  sumsRow(body, "on the 0-255 display scale", p.display_value, "display_value", scale);
  sums.append(body);
  root.append(sums);
  $("pixel-card").hidden = false;
  $("slide").disabled = !p.at;
  state.steps = buildSteps(p);
  state.step = -1;
  $("step-back").disabled = true;
  $("step-next").disabled = state.steps.length === 0;
  $("step-status").textContent =
    `${p.layer} ${where}: ${fmt(p.value)}. ${state.steps.length} steps: press “Animate step by step” or “Next step” to follow them.`;
}

// ----------------------------------------------------------------------------- animation

// One step per product when there are few (the material's own example has nine), else one
// per input map; then the bias, the activation and the display value.
function buildSteps(p) {
  const steps = [];
  let running = 0;
  if (p.products) {
    const n = p.input_channels.length;
    const kh = p.kernel[0].length;
    const kw = p.kernel[0][0].length;
    const each = n * kh * kw <= 81;
    for (let i = 0; i < n; i++) {
      if (each) {
        for (let r = 0; r < kh; r++) {
          for (let c = 0; c < kw; c++) {
            running += p.products[i][r][c];
            const text = `map ${p.input_channels[i]}, row ${r}, column ${c}: ${fmt(p.patch[i][r][c])} × ${fmt(p.kernel[i][r][c])} = ${fmt(p.products[i][r][c])}; running sum ${fmt(running)}`;
            steps.push({ text, channel: i, cell: [r, c] });
          }
        }
      } else {
        running += p.channel_sums[i];
        steps.push({ text: `map ${p.input_channels[i]}: its ${kh * kw} products add up to ${fmt(p.channel_sums[i])}; running sum ${fmt(running)}`, channel: i });
      }
    }
    steps.push({ text: `+ bias ${fmt(p.bias)} = ${fmt(p.value)}` });
  } else if (p.window && p.origin) {
    p.window.forEach((row, r) => row.forEach((v, c) => {
      if (v !== null) steps.push({ text: `window row ${r}, column ${c}: ${fmt(v)}`, channel: 0, cell: [r, c] });
    }));
    steps.push({ text: `${p.type === "maxpool" ? "the largest" : "the mean"}: ${fmt(p.value)}` });
  } else p.lines.forEach((line) => steps.push({ text: line }));
  p.after.forEach((step) => steps.push({ text: `${step.layer}: ${step.formula}` }));
  steps.push({ text: `on the 0-255 display scale: ${p.display_value}` });
  return steps;
}

function showStep(i) {
  state.step = Math.max(0, Math.min(state.steps.length - 1, i));
  const step = state.steps[state.step];
  $("step-status").textContent = `Step ${state.step + 1} of ${state.steps.length}: ${step.text}`;
  document.querySelectorAll(".term.active, td.hit-step").forEach((n) => n.classList.remove("active", "hit-step"));
  if (step.channel !== undefined && state.pixel.products) {
    const block = document.querySelector(`.term[data-channel="${step.channel}"]`);
    if (block) {
      block.classList.add("active");
      if (step.cell) {
        block.querySelectorAll("table.grid").forEach((t) => {
          const cell = t.rows[step.cell[0]] && t.rows[step.cell[0]].cells[step.cell[1]];
          if (cell) cell.classList.add("hit-step");
        });
      }
    }
  }
  if (state.mapData && state.pixel.at && step.channel !== undefined) renderSources(step);
  $("step-back").disabled = state.step <= 0;
  $("step-next").disabled = state.step >= state.steps.length - 1;
}

function stopAnimation() {
  if (state.timer) clearInterval(state.timer);
  state.timer = null;
  $("animate").textContent = "Animate step by step";
}

function toggleAnimation() {
  if (state.timer) return stopAnimation();
  if (!state.steps.length) return;
  if (state.step >= state.steps.length - 1) state.step = -1;
  $("animate").textContent = "Pause";
  showStep(state.step + 1);
  state.timer = setInterval(() => {
    if (state.step >= state.steps.length - 1) return stopAnimation();
    showStep(state.step + 1);
  }, 900);
}

// Slide the kernel along the map, one position after another, as the material's animation does.
function stopSlide() {
  if (state.slider) clearInterval(state.slider);
  state.slider = null;
  $("slide").textContent = "Slide the kernel along";
}

function toggleSlide() {
  if (state.slider) return stopSlide();
  if (!state.pixel || !state.pixel.at || !state.mapData) return;
  $("slide").textContent = "Stop sliding";
  let busy = false;
  state.slider = setInterval(async () => {
    if (busy) return;
    const d = state.mapData;
    let [y, x] = state.pixel.at;
    x += 1;
    if (x >= d.values[0].length) [y, x] = [y + 1, 0];
    if (y >= d.values.length) return stopSlide();
    busy = true;
    await selectPixel(y, x);
    busy = false;
  }, 700);
}
