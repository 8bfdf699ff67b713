// The siamesedb web page: upload one image, show its neighbours, its predicted class and a verify form.
// Plain JS against the same HTTP API as every other client (see /docs).
"use strict";

const $ = (id) => document.getElementById(id);
let currentFile = null;

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

// POST the image's raw bytes; the server reads the type from Content-Type and the name from ?name=.
async function postImage(path, params, file) {
  const query = new URLSearchParams(params);
  query.set("name", file.name || "upload");
  const response = await fetch(`${path}?${query}`, {
    method: "POST",
    headers: { "Content-Type": file.type || "application/octet-stream" },
    body: file,
  });
  const body = await response.json();
  if (!response.ok) throw new Error(body.detail || `${response.status} ${response.statusText}`);
  return body;
}

function renderHits(hits, predicted) {
  const gallery = $("gallery");
  gallery.replaceChildren();
  hits.forEach((hit, rank) => {
    const card = document.createElement("figure");
    card.className = "hit" + (hit.label === predicted ? " same" : "");
    card.dataset.label = hit.label;
    card.dataset.score = hit.score;
    const img = document.createElement("img");
    img.src = `/items/${hit.id}/image`;
    img.alt = hit.label;
    const label = document.createElement("figcaption");
    label.className = "hit-label";
    label.textContent = `${rank + 1}. ${hit.label}`;
    const score = document.createElement("div");
    score.className = "hit-score";
    score.textContent = hit.score.toFixed(4);
    card.append(img, label, score);
    gallery.append(card);
  });
}

function renderPrediction(prediction) {
  $("predicted-label").textContent = prediction.label;
  $("predicted-score").textContent = `(score ${prediction.score.toFixed(4)})`;
  const body = $("ranking").querySelector("tbody");
  body.replaceChildren();
  prediction.ranking.slice(0, 5).forEach((entry, rank) => {
    const row = document.createElement("tr");
    for (const text of [String(rank + 1), entry.label, entry.score.toFixed(4)]) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.append(cell);
    }
    body.append(row);
  });
  $("verify-label").value = prediction.label;
}

async function analyse(file) {
  currentFile = file;
  showError("");
  $("verify-result").textContent = "";
  const preview = $("query-preview");
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("drop-text").hidden = true;
  $("status").textContent = `searching for ${file.name}…`;
  try {
    const k = $("k").value;
    const [found, prediction] = await Promise.all([
      postImage("/search", { k }, file),
      postImage("/classify", {}, file),
    ]);
    renderPrediction(prediction);
    renderHits(found.hits, prediction.label);
    $("results").hidden = false;
    $("status").textContent = `${found.query}: ${found.hits.length} neighbours`;
    document.body.dataset.state = "done";
  } catch (err) {
    $("results").hidden = true;
    $("status").textContent = "";
    showError(err.message);
    document.body.dataset.state = "error";
  }
}

async function verify(event) {
  event.preventDefault();
  if (!currentFile) return;
  const label = $("verify-label").value.trim();
  const out = $("verify-result");
  out.textContent = "verifying…";
  out.className = "";
  try {
    const result = await postImage("/verify", { label }, currentFile);
    out.textContent = `${result.accepted ? "ACCEPTED" : "REJECTED"} as ${result.label}: ` +
      `score ${result.score.toFixed(4)}, threshold ${result.threshold.toFixed(4)}`;
    out.className = result.accepted ? "accepted" : "rejected";
  } catch (err) {
    out.textContent = err.message;
    out.className = "rejected";
  }
}

async function loadIndex() {
  try {
    const info = await (await fetch("/info")).json();
    const calibrated = info.calibration ? `threshold ${info.calibration.threshold.toFixed(3)}` : "not calibrated";
    $("index-info").textContent =
      `${info.path}: ${info.items} items in ${info.classes} classes, ${info.dimension}-d, ${calibrated}`;
    const labels = await (await fetch("/labels")).json();
    const list = $("labels");
    for (const entry of labels) {
      const option = document.createElement("option");
      option.value = entry.label;
      list.append(option);
    }
  } catch (err) {
    showError(`cannot reach the index: ${err.message}`);
  }
}

function wire() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => { if (e.target.files.length) analyse(e.target.files[0]); });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (e) => { if (e.dataTransfer.files.length) analyse(e.dataTransfer.files[0]); });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
  $("k").addEventListener("change", () => { if (currentFile) analyse(currentFile); });
  $("verify-form").addEventListener("submit", verify);
  loadIndex();
}

document.addEventListener("DOMContentLoaded", wire);
