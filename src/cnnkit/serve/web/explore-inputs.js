// cnnkit explorer: where the image comes from beyond a file or a drawing (inputs.js):
// the camera and the validation images (see explore-core.js).
"use strict";

// ----------------------------------------------------------------------------- the sources

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
