// flickd search page: no framework, no build step. Every catalog value is inserted with
// textContent (never innerHTML): titles and brands come from third-party feeds.
"use strict";

const $ = (selector) => document.querySelector(selector);
const statusLine = $("#status");
const results = $("#results");
const preview = $("#query-preview");

function topK() { return Number($("#top-k").value) || 10; }
function detect() { return $("#detect").checked; }

// The filter controls, as the API's query parameters (only the ones set).
const FILTER_FIELDS = {
  category: "#f-category", brand: "#f-brand", colour: "#f-colour",
  min_price: "#f-min-price", max_price: "#f-max-price", catalog: "#f-catalog",
};
function filterParams(params) {
  for (const [name, selector] of Object.entries(FILTER_FIELDS)) {
    const value = $(selector).value.trim();
    if (value) params.set(name, value);
  }
  if ($("#f-in-stock").checked) params.set("in_stock", "true");
  return params;
}

// Fill the controls with what the catalog holds now (GET /search/filters).
async function loadFilterValues() {
  try {
    const response = await fetch("/search/filters");
    if (!response.ok) return;
    const facets = await response.json();
    const fill = (selector, values) => {
      const node = $(selector);
      (values || []).forEach((value) => node.append(new Option(value, value)));
    };
    fill("#f-colour", facets.colour_families);
    fill("#f-catalog", facets.catalogs);
    fill("#f-categories", facets.categories);  // datalists: suggestions, free text still works
    fill("#f-brands", facets.brands);
  } catch (_) { /* the controls still work as free text */ }
}

function setStatus(text, isError = false) {
  statusLine.textContent = text;
  statusLine.classList.toggle("error", isError);
}

function showPreview(src) {
  preview.hidden = !src;
  if (src) preview.querySelector("img").src = src;
}

// Every failure the API sends is JSON {detail, reason}; FastAPI's own 422s carry a list.
async function errorText(response) {
  try {
    const body = await response.json();
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) return body.detail.map((d) => d.msg).join("; ");
  } catch (_) { /* not JSON: fall through */ }
  return `${response.status} ${response.statusText}`;
}

async function run(label, request) {
  setStatus(`Searching ${label}…`);
  results.replaceChildren();
  try {
    const response = await request();
    if (!response.ok) {
      setStatus(await errorText(response), true);
      return;
    }
    render(await response.json());
  } catch (err) {
    setStatus(`Search failed: ${err.message}`, true);
  }
}

function searchText(q) {
  showPreview(null);
  const params = filterParams(new URLSearchParams({ q, k: topK() }));
  return run(`for “${q}”`, () => fetch(`/search?${params}`));
}

function searchUrl(url) {
  showPreview(url);
  const body = JSON.stringify({ url, k: topK(), detect: detect() });
  const params = filterParams(new URLSearchParams());
  return run("the image at that URL", () =>
    fetch(`/search/url?${params}`, { method: "POST", headers: { "Content-Type": "application/json" }, body }));
}

function searchFile(file) {
  showPreview(URL.createObjectURL(file));
  const form = new FormData();
  form.append("file", file);
  const params = filterParams(new URLSearchParams({ k: topK(), detect: detect() }));
  return run(`with ${file.name}`, () => fetch(`/search/image?${params}`, { method: "POST", body: form }));
}

function itemHeading(item, index, count) {
  if (item.label === null && item.detection_score === null && !item.whole_image) return null;
  const what = item.label || (item.whole_image ? "whole image" : "item");
  const parts = [count > 1 ? `Item ${index + 1}: ${what}` : what];
  if (item.colour) parts.push(item.colour);
  if (item.detection_score !== null) parts.push(`detected ${item.detection_score.toFixed(2)}`);
  return parts.join(" · ");
}

function card(hit) {
  const node = $("#card-template").content.firstElementChild.cloneNode(true);
  node.dataset.productId = hit.product_id;
  node.dataset.score = hit.score.toFixed(4);
  node.dataset.match = hit.match;
  node.dataset.colourFamily = hit.colour_family || "";
  const img = node.querySelector("img");
  img.src = hit.thumbnail_url;
  img.alt = hit.title || hit.product_id;
  const badge = node.querySelector(".badge");
  badge.textContent = hit.match;
  badge.classList.add(hit.match);
  node.querySelector(".score").textContent = hit.score.toFixed(3);
  node.querySelector(".title").textContent = hit.title || "(untitled)";
  const link = node.querySelector(".product-id");
  link.textContent = hit.product_id;
  link.href = `/products/${encodeURIComponent(hit.product_id)}?catalog=${encodeURIComponent(hit.catalog)}`;
  const price = hit.price === null ? null : hit.price.toFixed(2);
  const stock = hit.in_stock === false ? "out of stock" : null;
  node.querySelector(".sub").textContent =
    [hit.brand, hit.category, price, stock].filter(Boolean).join(" · ");
  node.querySelector(".swatch").style.background = hit.colour_rgb || "transparent";
  // The coarse class reads better on a card ("top"); the fine label is in the tooltip.
  node.querySelector(".item-text").textContent =
    [hit.colour_family || hit.colour, hit.coarse_label || hit.label].filter(Boolean).join(" ");
  node.title = [hit.prompt, hit.label && `detected as: ${hit.label}`].filter(Boolean).join("\n");
  return node;
}

function render(response) {
  const total = response.items.reduce((n, item) => n + item.results.length, 0);
  const notes = (response.notes || []).map((note) => ` · ${note}`).join("");
  setStatus(`${total} result${total === 1 ? "" : "s"} in ${Math.round(response.took_ms)} ms ` +
            `from ${response.index_vectors} indexed crops${notes}`);
  response.items.forEach((item, index) => {
    const group = document.createElement("section");
    group.className = "result-group";
    const heading = itemHeading(item, index, response.items.length);
    if (heading) {
      const h2 = document.createElement("h2");
      h2.textContent = heading;
      group.append(h2);
    }
    const grid = document.createElement("div");
    grid.className = "gallery";
    item.results.forEach((hit) => grid.append(card(hit)));
    if (!item.results.length) grid.textContent = "No matching products.";
    group.append(grid);
    results.append(group);
  });
}

function wire() {
  $("#text-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const q = $("#text-input").value.trim();
    if (q) searchText(q);
  });
  $("#url-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const url = $("#url-input").value.trim();
    if (url) searchUrl(url);
  });
  const zone = $("#drop-zone");
  const input = $("#file-input");
  zone.addEventListener("click", () => input.click());
  zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") input.click(); });
  input.addEventListener("change", () => { if (input.files[0]) searchFile(input.files[0]); });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    const file = e.dataTransfer.files[0];
    if (file) searchFile(file);
  });
}

// A link like /?q=red+dress or /?url=https://… runs its search on load (shareable results).
function searchFromLocation() {
  const params = new URLSearchParams(window.location.search);
  const k = Number(params.get("k"));
  if (k > 0) {
    const select = $("#top-k");
    if (![...select.options].some((option) => Number(option.value) === k)) select.add(new Option(k));
    select.value = String(k);
  }
  // Filters in the link (/?q=dress&colour=red&max_price=50) fill the controls first.
  for (const [name, selector] of Object.entries(FILTER_FIELDS)) {
    const value = params.get(name);
    if (!value) continue;
    const control = $(selector);
    if (control.tagName === "SELECT" && ![...control.options].some((o) => o.value === value)) {
      control.add(new Option(value, value));
    }
    control.value = value;
  }
  if (params.get("in_stock") === "true") $("#f-in-stock").checked = true;
  if (params.get("q")) {
    $("#text-input").value = params.get("q");
    searchText(params.get("q"));
  } else if (params.get("url")) {
    $("#url-input").value = params.get("url");
    searchUrl(params.get("url"));
  }
}

wire();
loadFilterValues();
searchFromLocation();
