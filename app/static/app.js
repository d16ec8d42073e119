// Landmark tagger page: one card per chosen or dropped photo, filled from POST /api/predict.
"use strict";

const results = document.getElementById("results");
const banner = document.getElementById("server-status");
const input = document.getElementById("files");
const zone = document.getElementById("upload");
const template = document.getElementById("card-template");
let maxBytes = 10 * 1024 * 1024;

function showBanner(message) {
  banner.textContent = message || "";
  banner.hidden = !message;
}

function formatMB(bytes) {
  return `${(bytes / 1024 / 1024).toFixed(1).replace(/\.0$/, "")} MB`;
}

async function checkServer() {
  try {
    const response = await fetch("/api/health");
    const health = await response.json();
    showBanner(health.server === "ok" ? "" : `Model server unavailable: ${health.error}`);
  } catch (err) {
    showBanner("The tagging app is not reachable. Is `make app` still running?");
  }
}

function osmAnchor(loc) {
  const a = document.createElement("a");
  a.href = osmLink(loc.lat, loc.lon);
  a.textContent = "View on OpenStreetMap";
  a.target = "_blank";
  a.rel = "noopener noreferrer";
  return a;
}

function osmLink(lat, lon) {
  const la = lat.toFixed(5), lo = lon.toFixed(5);
  return `https://www.openstreetmap.org/?mlat=${la}&mlon=${lo}#map=15/${la}/${lo}`;
}

function renderAnswer(card, answer) {
  const predictions = answer.top_k;
  const list = card.querySelector(".predictions");
  for (const p of predictions) {
    const item = document.createElement("li");
    const pct = (100 * p.probability).toFixed(1);
    item.innerHTML = '<span class="row"><span class="name"></span>' +
      '<span class="bar" aria-hidden="true"><span></span></span><span class="pct"></span></span>';
    item.querySelector(".name").textContent = p.name;
    item.querySelector(".name").title = p.name;
    item.querySelector(".bar span").style.width = `${pct}%`;
    item.querySelector(".pct").textContent = `${pct}%`;
    list.appendChild(item);
  }
  list.setAttribute("aria-label", `Top ${predictions.length} known landmarks`);
  list.hidden = false;

  const place = card.querySelector(".place");
  const loc = answer.location;
  if (answer.source === "your photos") {
    // located by the place index: the nearest of the user's own geotagged photos
    const match = answer.place;
    place.textContent = `Place (from your photos): ${[loc.place, loc.country].filter(Boolean).join(", ")} · ` +
      `${loc.lat.toFixed(5)}, ${loc.lon.toFixed(5)} · similarity ${match.similarity.toFixed(3)}, ` +
      `confidence ${(100 * loc.confidence).toFixed(1)}% · like ${match.photos.map((p) => p.path).join(", ")} · `;
    place.appendChild(osmAnchor(loc));
  } else if (!answer.landmark) {
    place.textContent = `Not tagged (${answer.reason}): the model's confidence ` +
      `${(100 * answer.confidence).toFixed(1)}% is below its operating point for ` +
      `${(100 * answer.operating_point.min_precision).toFixed(0)}% precision.`;
  } else if (loc) {
    const where = [loc.place, loc.country].filter(Boolean).join(", ");
    const coords = `${loc.lat.toFixed(5)}, ${loc.lon.toFixed(5)}`;
    place.textContent = `Place: ${where ? where + " · " : ""}${coords} · `;
    place.appendChild(osmAnchor(loc));
  } else {
    place.textContent = "Place: unknown for this landmark";
  }
  place.hidden = false;
}

function fail(card, message) {
  const state = card.querySelector(".state");
  state.textContent = message;
  state.classList.add("error");
  card.classList.add("failed");
}

async function tag(file) {
  const card = template.content.firstElementChild.cloneNode(true);
  const img = card.querySelector(".thumb");
  card.querySelector(".filename").textContent = file.name;
  img.alt = `Your photo ${file.name}`;
  const noPreview = () => {  // the message on the card says why
    img.remove();
    card.querySelector(".placeholder").hidden = false;
  };
  img.addEventListener("error", noPreview, { once: true });
  if (file.type.startsWith("image/")) {
    img.src = URL.createObjectURL(file);
  } else {
    noPreview();
  }
  results.prepend(card);

  if (file.size > maxBytes) {
    fail(card, `File too large: ${file.size.toLocaleString("en")} bytes; the limit is ${formatMB(maxBytes)}.`);
    return;
  }
  let response;
  try {
    response = await fetch("/api/predict", {
      method: "POST",
      body: file,
      headers: { "Content-Type": file.type || "application/octet-stream" },
    });
  } catch (err) {
    fail(card, "The tagging app is not reachable. Is `make app` still running?");
    return;
  }
  let body = {};
  try {
    body = await response.json();
  } catch (err) {
    body = { error: `unexpected answer (HTTP ${response.status})` };
  }
  if (!response.ok) {
    const reason = response.status === 503 ? "Model server unavailable" : "Could not tag this file";
    fail(card, `${reason}: ${body.error}`);
    if (response.status === 503) showBanner(`Model server unavailable: ${body.error}`);
    return;
  }
  showBanner("");
  const state = card.querySelector(".state");
  if (body.landmark) {
    const name = body.landmark.name;
    state.textContent = `${name} (confidence ${(100 * body.confidence).toFixed(1)}%)`;
    img.alt = `Your photo ${file.name}: ${name}`;
  } else if (body.source === "your photos") {
    state.textContent = `Near ${body.location.place} (like your photos there)`;
    img.alt = `Your photo ${file.name}: near ${body.location.place}`;
  } else {
    state.textContent = "No landmark I know: nothing to tag";
    card.classList.add("unknown");
    img.alt = `Your photo ${file.name}: no landmark the model knows`;
  }
  renderAnswer(card, body);
}

function tagAll(files) {
  for (const file of files) tag(file);
}

input.addEventListener("change", () => {
  tagAll(Array.from(input.files));
  input.value = "";
});
for (const name of ["dragenter", "dragover"]) {
  zone.addEventListener(name, (e) => { e.preventDefault(); zone.classList.add("dragging"); });
}
for (const name of ["dragleave", "drop"]) {
  zone.addEventListener(name, () => zone.classList.remove("dragging"));
}
zone.addEventListener("drop", (e) => {
  e.preventDefault();
  tagAll(Array.from(e.dataTransfer.files));
});
zone.addEventListener("submit", (e) => e.preventDefault());
// A photo dropped beside the zone must not make the browser leave the page to open it.
window.addEventListener("dragover", (e) => e.preventDefault());
window.addEventListener("drop", (e) => e.preventDefault());

fetch("/api/config").then((r) => r.json()).then((cfg) => {
  maxBytes = cfg.max_upload_bytes;
  document.getElementById("limit").textContent = formatMB(maxBytes);
}).catch(() => {});
checkServer();
