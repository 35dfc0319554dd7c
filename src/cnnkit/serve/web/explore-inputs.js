// cnnkit explorer: where the image comes from (see explore-core.js).
"use strict";

// ----------------------------------------------------------------------------- the sources

function setUpDropzone() {
  const zone = $("dropzone");
  const input = $("file");
  input.addEventListener("change", () => input.files[0] && analyse(input.files[0], input.files[0].name || "image"));
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
    const file = event.dataTransfer.files[0];
    if (file) analyse(file, file.name || "image");
  });
}

function setUpCanvas() {
  const canvas = $("canvas");
  const ctx = canvas.getContext("2d");
  const clear = () => {
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
  };
  clear();
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  let stroke = null;
  const point = (event) => {
    const box = canvas.getBoundingClientRect();
    return [((event.clientX - box.left) * canvas.width) / box.width, ((event.clientY - box.top) * canvas.height) / box.height];
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
  const stop = () => {
    // a closed outline is filled: the shapes a model learns from are filled shapes
    if (stroke && stroke.length > 8) {
      const [a, b] = [stroke[0], stroke[stroke.length - 1]];
      if (Math.hypot(b[0] - a[0], b[1] - a[1]) < canvas.width / 6) {
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
  $("clear-drawing").addEventListener("click", clear);
  $("use-drawing").addEventListener("click", () => canvas.toBlob((blob) => blob && analyse(blob, "drawing.png"), "image/png"));
}

function setUpCamera() {
  const video = $("camera");
  let stream = null;
  const say = (text) => { $("camera-status").textContent = text; };
  const stop = () => {
    if (stream) stream.getTracks().forEach((t) => t.stop());
    stream = null;
    video.srcObject = null;
    video.hidden = true;
    $("camera-capture").hidden = true;
    $("camera-stop").hidden = true;
    $("camera-start").hidden = false;
  };
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    $("camera-start").disabled = true;
    say("This browser offers no camera to this page.");
    return;
  }
  $("camera-start").addEventListener("click", async () => {
    say("Asking for the camera…");
    try {
      stream = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
      video.srcObject = stream;
      video.hidden = false;
      await video.play();
      $("camera-start").hidden = true;
      $("camera-capture").hidden = false;
      $("camera-stop").hidden = false;
      say("Point the camera at something and take the picture.");
    } catch (err) {
      stop();
      say(`No camera: ${err.message || err.name}`);
    }
  });
  $("camera-capture").addEventListener("click", () => {
    const shot = document.createElement("canvas");
    shot.width = video.videoWidth;
    shot.height = video.videoHeight;
    if (!shot.width || !shot.height) return say("The camera has no picture yet.");
    shot.getContext("2d").drawImage(video, 0, 0);
    shot.toBlob((blob) => blob && analyse(blob, "camera.png"), "image/png");
  });
  $("camera-stop").addEventListener("click", () => {
    stop();
    say("");
  });
}

function setUpSamples() {
  $("samples-load").addEventListener("click", async () => {
    $("samples-status").textContent = "Loading the validation images…";
    try {
      const data = await fetchJson("/explore/samples");
      const root = $("samples");
      root.replaceChildren();
      data.samples.forEach((s) => {
        const button = el("button", "sample");
        button.type = "button";
        button.dataset.label = s.label;
        button.setAttribute("aria-label", `validation image ${s.index}, true label ${s.label}`);
        const img = el("img", "pixelated");
        img.src = s.image;
        img.alt = "";
        button.append(img, el("span", "", s.label));
        button.addEventListener("click", () => analyse(blobFromDataUrl(s.image), `validation image ${s.index}`, s.label));
        root.append(button);
      });
      $("samples-status").textContent = `${data.samples.length} of the ${data.total} validation images, with their true labels.`;
    } catch (err) {
      $("samples-status").textContent = err.message;
    }
  });
}
