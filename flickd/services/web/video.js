// Video search on the flickd page (uses $, setStatus, errorText, showPreview, topK and
// results from app.js). A short clip is answered at once; a long one is a job whose status
// endpoint this polls, showing its progress, until its result is stored.
"use strict";

const videoProgress = $("#video-progress");
const videoNotes = $("#video-notes");
const POLL_MS = 1000;

function clock(seconds) {
  const minutes = Math.floor(seconds / 60);
  const rest = (seconds - minutes * 60).toFixed(1).padStart(4, "0");
  return `${minutes}:${rest}`;
}

function showProgress(fraction) {
  videoProgress.hidden = fraction === null;
  if (fraction !== null) videoProgress.value = fraction;
}

function showNotes(notes) {
  videoNotes.replaceChildren(...notes.map((note) => {
    const li = document.createElement("li");
    li.textContent = note;
    return li;
  }));
  videoNotes.hidden = notes.length === 0;
}

async function searchVideo(file) {
  showPreview(null);
  showNotes([]);
  results.replaceChildren();
  showProgress(0);
  setStatus(`Uploading ${file.name}…`);
  const form = new FormData();
  form.append("file", file);
  const params = new URLSearchParams({ top_k: topK() });
  try {
    const response = await fetch(`/search/video?${params}`, { method: "POST", body: form });
    if (!response.ok) return videoFailed(await errorText(response));
    const body = await response.json();
    if (response.status === 202) return pollJob(body.status_url);
    renderVideo(body);
  } catch (err) {
    videoFailed(`Video search failed: ${err.message}`);
  }
}

function videoFailed(message) {
  showProgress(null);
  setStatus(message, true);
}

async function pollJob(statusUrl) {
  for (;;) {
    const response = await fetch(statusUrl);
    if (!response.ok) return videoFailed(await errorText(response));
    const job = await response.json();
    if (job.status === "done") return renderVideo(job.result);
    if (job.status === "failed") return videoFailed(`${job.detail} (${job.reason})`);
    showProgress(job.progress);
    const percent = Math.round(job.progress * 100);
    setStatus(`Analysing the video (job ${job.job_id}, ${job.status}): ${percent}%`);
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

function videoCard(product) {
  const node = $("#video-card-template").content.firstElementChild.cloneNode(true);
  node.dataset.productId = product.product_id;
  node.dataset.score = product.score.toFixed(4);
  node.dataset.match = product.match;
  node.dataset.timeRanges = product.time_ranges.map(([a, b]) => `${a.toFixed(2)}-${b.toFixed(2)}`).join(";");
  const img = node.querySelector("img");
  img.src = product.thumbnail;  // the best frame's crop, a data: URI
  img.alt = `best frame of ${product.title || product.product_id}`;
  const badge = node.querySelector(".badge");
  badge.textContent = product.match;
  badge.classList.add(product.match);
  node.querySelector(".score").textContent = product.score.toFixed(3);
  node.querySelector(".title").textContent = product.title || "(untitled)";
  const link = node.querySelector(".product-id");
  link.textContent = product.product_id;
  link.href = `/products/${encodeURIComponent(product.product_id)}?catalog=${encodeURIComponent(product.catalog)}`;
  node.querySelector(".sub").textContent = product.brand || "";
  node.querySelector(".times").textContent =
    product.time_ranges.map(([a, b]) => `${clock(a)}–${clock(b)}`).join(", ");
  return node;
}

function renderVideo(result) {
  showProgress(null);
  const count = result.products.length;
  const seconds = result.cut_at_s ?? result.duration_s;
  const span = seconds === null ? "" : ` in ${seconds.toFixed(1)} s of video`;
  setStatus(`${count} product${count === 1 ? "" : "s"}${span} · ${result.frames_analysed} ` +
            `frames analysed · ${result.tracks.length} tracks`);
  showNotes(result.notes);
  const grid = document.createElement("div");
  grid.className = "gallery";
  result.products.forEach((product) => grid.append(videoCard(product)));
  if (!count) grid.textContent = "No catalog products found in this video.";
  results.append(grid);
}

$("#video-input").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (file) searchVideo(file);
});
