// cnnkit: the image sources both pages share (a file by dialog or drag and drop, a drawing).
// Each calls use(fileOrBlob, name) with what the user gave.
"use strict";

function setUpDropzone(use) {
  const zone = document.getElementById("dropzone");
  const input = document.getElementById("file");
  const take = (file) => file && use(file, file.name || "image");
  input.addEventListener("change", () => take(input.files[0]));
  zone.addEventListener("click", (event) => {
    if (event.target !== input && event.target.tagName !== "LABEL") input.click();
  });
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      input.click();
    }
  });
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    take(event.dataTransfer.files[0]);
  });
}

// The drawing canvas (#canvas, cleared by #clear-drawing); the button useId sends it.
function setUpCanvas(use, useId) {
  const canvas = document.getElementById("canvas");
  const ctx = canvas.getContext("2d");
  const clear = () => {
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
  };
  clear();
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  let stroke = null; // the points of the current stroke
  const point = (event) => {
    const box = canvas.getBoundingClientRect();
    return [
      ((event.clientX - box.left) * canvas.width) / box.width,
      ((event.clientY - box.top) * canvas.height) / box.height,
    ];
  };
  canvas.addEventListener("pointerdown", (event) => {
    canvas.setPointerCapture(event.pointerId);
    stroke = [point(event)];
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!stroke) return;
    const [last, next] = [stroke[stroke.length - 1], point(event)];
    ctx.strokeStyle = "#222";
    ctx.lineWidth = 14;
    ctx.beginPath();
    ctx.moveTo(last[0], last[1]);
    ctx.lineTo(next[0], next[1]);
    ctx.stroke();
    stroke.push(next);
  });
  // A stroke that ends near where it started is a closed outline: fill it, because the
  // shapes a model learns from are filled shapes, not outlines.
  const stop = () => {
    if (stroke && stroke.length > 8) {
      const [first, end] = [stroke[0], stroke[stroke.length - 1]];
      if (Math.hypot(end[0] - first[0], end[1] - first[1]) < canvas.width / 6) {
        ctx.fillStyle = "#222";
        ctx.beginPath();
        stroke.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
        ctx.closePath();
        ctx.fill();
      }
    }
    stroke = null;
  };
  canvas.addEventListener("pointerup", stop);
  canvas.addEventListener("pointercancel", stop);
  document.getElementById("clear-drawing").addEventListener("click", clear);
  document.getElementById(useId).addEventListener("click", () => {
    canvas.toBlob((blob) => blob && use(blob, "drawing.png"), "image/png");
  });
}
