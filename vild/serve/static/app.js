// The vild page: send an image and a vocabulary to POST detect, draw what comes back.
// Detections are fetched at the slider's threshold; raising the slider filters them here, lowering it
// below the fetched threshold asks the server again.
"use strict";

const $ = (id) => document.getElementById(id);
const PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
                 "#469990", "#9a6324", "#800000", "#808000", "#000075", "#fabed4", "#ffe119", "#aaffc3"];
const state = { file: null, bitmap: null, result: null, fetchedAt: null, busy: false, again: false };

function setStatus(text, kind) {
  $("status").textContent = text;
  document.body.dataset.state = kind;
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = $("key").value.trim();
  if (key) headers.set("Authorization", "Bearer " + key);
  const response = await fetch(path, { ...options, headers });
  let body = null;
  try { body = await response.json(); } catch (e) { /* not JSON: reported by status below */ }
  if (!response.ok) {
    const detail = body && body.detail ? (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail))
                                       : response.statusText;
    throw new Error(`${response.status}: ${detail}`);
  }
  return body;
}

// COCO RLE text counts (pycocotools' rleFrString) → run lengths, alternating background and mask,
// column-major. Values stay below 2^30 for any image under a billion pixels, within JS's 32-bit shifts.
function decodeRle(counts) {
  const runs = [];
  let p = 0;
  while (p < counts.length) {
    let x = 0, k = 0, more = 1;
    while (more) {
      const c = counts.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = c & 0x20;
      p++; k++;
      if (!more && (c & 0x10)) x |= -1 << (5 * k);
    }
    if (runs.length > 2) x += runs[runs.length - 2];
    runs.push(x);
  }
  return runs;
}

function maskArea(rle) {
  return decodeRle(rle.counts).reduce((sum, run, i) => (i % 2 ? sum + run : sum), 0);
}

function paintMask(data, width, rle, rgb) {
  const h = rle.size[0];
  const runs = decodeRle(rle.counts);
  let i = 0;
  for (let r = 0; r < runs.length; r++) {
    if (r % 2) {
      for (let j = i; j < i + runs[r]; j++) {
        const o = ((j % h) * width + Math.floor(j / h)) * 4;
        data[o] = rgb[0]; data[o + 1] = rgb[1]; data[o + 2] = rgb[2]; data[o + 3] = 110;
      }
    }
    i += runs[r];
  }
}

function rgbOf(hex) {
  return [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
}

function visible() {
  if (!state.result) return [];
  const t = parseFloat($("threshold").value);
  return state.result.detections.filter((d) => d.score >= t);
}

function colorOf(label) {
  const k = state.result.vocabulary.indexOf(label);
  return PALETTE[(k < 0 ? 0 : k) % PALETTE.length];
}

// small images are shown enlarged (whole pixels, no smoothing) so that boxes and labels stay readable
function displayScale(width, height) {
  return Math.max(1, Math.min(8, Math.floor(640 / Math.max(width, height))));
}

function render() {
  const canvas = $("canvas");
  const ctx = canvas.getContext("2d");
  const res = state.result;
  if (!res) return;
  const s = displayScale(res.width, res.height);
  canvas.width = res.width * s;
  canvas.height = res.height * s;
  canvas.dataset.scale = String(s);
  ctx.imageSmoothingEnabled = false;
  if (state.bitmap) ctx.drawImage(state.bitmap, 0, 0, canvas.width, canvas.height);
  else { ctx.fillStyle = "#ddd"; ctx.fillRect(0, 0, canvas.width, canvas.height); }
  const dets = visible();
  const withMasks = dets.filter((d) => d.mask);
  if (withMasks.length) {
    const overlay = new ImageData(res.width, res.height);
    for (const d of withMasks) paintMask(overlay.data, res.width, d.mask, rgbOf(colorOf(d.label)));
    const layer = document.createElement("canvas");
    layer.width = res.width; layer.height = res.height;
    layer.getContext("2d").putImageData(overlay, 0, 0);
    ctx.drawImage(layer, 0, 0, canvas.width, canvas.height);
  }
  const line = Math.max(2, Math.round(Math.max(canvas.width, canvas.height) / 400));
  const fontPx = Math.max(12, line * 6);
  ctx.font = `${fontPx}px system-ui, sans-serif`;
  ctx.textBaseline = "top";
  for (const d of dets) {
    const b = d.box, color = colorOf(d.label), text = `${d.label} ${d.score.toFixed(2)}`;
    const x0 = b.xmin * s, y0 = b.ymin * s;
    ctx.strokeStyle = color; ctx.lineWidth = line;
    ctx.strokeRect(x0, y0, (b.xmax - b.xmin) * s, (b.ymax - b.ymin) * s);
    const tw = ctx.measureText(text).width + 2 * line, th = fontPx + 2 * line;
    const ty = y0 - th >= 0 ? y0 - th : y0;
    ctx.fillStyle = color; ctx.fillRect(x0, ty, tw, th);
    ctx.fillStyle = "#fff"; ctx.fillText(text, x0 + line, ty + line);
  }
  const list = $("detections");
  list.replaceChildren(...dets.map((d) => {
    const li = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = "swatch"; swatch.style.background = colorOf(d.label);
    li.append(swatch, `${d.label} ${d.score.toFixed(2)}`);  // text nodes: names are the user's, never markup
    li.dataset.label = d.label; li.dataset.score = d.score;
    return li;
  }));
  $("count").textContent = `${dets.length} detection${dets.length === 1 ? "" : "s"}`;
  canvas.dataset.drawn = String(dets.length);
}

async function detect() {
  if (!state.file) { setStatus("Choose an image first.", "error"); return; }
  if (!$("vocab").value.trim()) { setStatus('Type what to find, e.g. "cat,dog".', "error"); return; }
  if (state.busy) { state.again = true; return; }
  state.busy = true;
  const threshold = parseFloat($("threshold").value);
  const form = new FormData();
  form.append("image", state.file);
  form.append("vocabulary", $("vocab").value);
  form.append("score_threshold", String(threshold));
  form.append("masks", $("masks").checked ? "true" : "false");
  setStatus("Detecting…", "busy");
  const started = performance.now();
  try {
    state.result = await api("detect", { method: "POST", body: form });
    state.fetchedAt = threshold;
    render();
    setStatus(`${state.result.detections.length} found in ${Math.round(performance.now() - started)} ms.`, "done");
  } catch (e) {
    setStatus(e.message, "error");
  } finally {
    state.busy = false;
    if (state.again) { state.again = false; detect(); }
  }
}

async function useFile(file) {
  if (!file) return;
  state.file = file;
  state.result = null;
  try { state.bitmap = await createImageBitmap(file); } catch (e) { state.bitmap = null; }  // the server decides
  if (state.bitmap) {
    const canvas = $("canvas"), s = displayScale(state.bitmap.width, state.bitmap.height);
    canvas.width = state.bitmap.width * s; canvas.height = state.bitmap.height * s;
    const ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(state.bitmap, 0, 0, canvas.width, canvas.height);
  }
  $("detections").replaceChildren();
  $("count").textContent = "";
  if ($("vocab").value.trim()) detect();
  else setStatus('Now type what to find, e.g. "cat,dog".', "idle");
}

let refetch = null;
function onThreshold() {
  const t = parseFloat($("threshold").value);
  $("threshold-value").textContent = t.toFixed(2);
  if (state.result && state.fetchedAt !== null && t < state.fetchedAt) {
    clearTimeout(refetch);
    refetch = setTimeout(detect, 250);
  } else {
    render();
  }
}

async function start() {
  $("file").addEventListener("change", (e) => useFile(e.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault(); drop.classList.remove("over");
    useFile(e.dataTransfer.files[0]);
  });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
  $("detect").addEventListener("click", detect);
  $("vocab").addEventListener("keydown", (e) => { if (e.key === "Enter") detect(); });
  $("threshold").addEventListener("input", onThreshold);
  $("masks").addEventListener("change", () => { if (state.result) detect(); });
  $("key").addEventListener("change", loadInfo);
  $("key-row").addEventListener("submit", (e) => { e.preventDefault(); loadInfo(); });
  try {
    const health = await api("healthz");
    $("key-row").hidden = !health.api_key;
    if (health.api_key && !$("key").value) { setStatus("This server needs an API key.", "idle"); return; }
    await loadInfo();
  } catch (e) {
    setStatus(`The server did not answer: ${e.message}`, "error");
  }
}

async function loadInfo() {
  try {
    const info = await api("info");
    $("threshold").value = info.score_threshold;
    $("masks").checked = info.masks;
    if (!$("vocab").value) $("vocab").value = info.training_vocabulary.join(",");
    onThreshold();
    setStatus("Ready: drop an image.", "idle");
  } catch (e) {
    setStatus(e.message, "error");
  }
}

window.vild = { decodeRle, maskArea, palette: PALETTE, state };  // for tests and the console
start();
