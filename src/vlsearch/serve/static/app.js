// vlsearch web page: text search, re-rank toggle, search by image (drop or pick), heat maps.
// No framework, no external assets: everything comes from this server.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  health: null,
  k: 24,
  rerankPool: 48,
  results: [], // hits shown in the grid
  words: [], // tokens of the current explanations
  word: null, // index of the picked word, or null
  seq: 0, // guards against out-of-order responses
  controller: null,
  lastQuery: "",
  viewerHit: null,
  nextCursor: null, // the next page of the current text search, or null
  pageParams: null,
  loadingMore: false,
};

const FILTERS = { after: "f-after", before: "f-before", folder: "f-folder", camera: "f-camera", near: "f-near", min_score: "f-min", sort: "f-sort" };

function filterParams() {
  const out = {};
  for (const [name, id] of Object.entries(FILTERS)) {
    const v = $(id).value.trim();
    if (v && !(name === "sort" && v === "score")) out[name] = v;
  }
  return out;
}

// ---- talking to the server --------------------------------------------------------------------------
async function api(url, options) {
  const t0 = performance.now();
  let resp;
  try {
    resp = await fetch(url, options);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new Error("cannot reach the server");
  }
  let body = null;
  try {
    body = await resp.json();
  } catch (e) {
    body = null;
  }
  if (!resp.ok) {
    let msg = body && body.error ? body.error : `HTTP ${resp.status}`;
    if (resp.status === 503) msg += ` (retry in ${resp.headers.get("Retry-After") || 1} s)`;
    const err = new Error(msg);
    err.status = resp.status;
    err.detail = body ? body.detail : null;
    throw err;
  }
  body.clientMs = performance.now() - t0;
  return body;
}

function showError(err) {
  const box = $("error");
  if (!err) {
    box.hidden = true;
    box.textContent = "";
    return;
  }
  let text = err.message || String(err);
  if (typeof err.detail === "string" && err.detail && !/Error$/.test(err.detail)) text += ": " + err.detail;
  box.textContent = text;
  box.hidden = false;
}

function setStatus(parts) {
  const el = $("status");
  el.replaceChildren();
  for (const p of parts) {
    if (typeof p === "string") el.append(p);
    else {
      const b = document.createElement("b");
      b.textContent = p.bold;
      el.append(b);
    }
  }
}

const ms = (x) => (x == null ? "?" : x < 10 ? x.toFixed(1) : Math.round(x).toString());
const fmt = (x) => (x == null ? "–" : Number(x).toFixed(3));

// ---- health: what the server can do --------------------------------------------------------------------
async function loadHealth() {
  try {
    const h = await api("/healthz");
    state.health = h;
    state.k = h.limits.page_k || state.k;
    state.rerankPool = Math.max(state.k, h.limits.page_rerank || state.rerankPool);
    const box = $("rerank");
    const label = $("rerank-label");
    if (!h.rerank.enabled) {
      box.checked = false;
      box.disabled = true;
      label.classList.add("disabled");
      label.title = "Re-ranking is off on this server: " + (h.rerank.note || "no Slow model");
    } else {
      box.disabled = false;
      label.classList.remove("disabled");
      label.title = `Re-rank the Fast top ${state.rerankPool} with the Slow model (${h.rerank.model}), and explain`;
    }
    const idx = h.index;
    $("info").textContent =
      `${idx.n_images.toLocaleString()} images · model ${idx.model} · ${idx.kind} index` +
      (h.rerank.enabled ? ` · re-ranker ${h.rerank.model}` : " · no re-ranker") +
      ` · vlsearch ${h.version}`;
  } catch (e) {
    showError(e);
  }
}

// ---- text search ------------------------------------------------------------------------------------
function rerankOn() {
  const box = $("rerank");
  return box.checked && !box.disabled;
}

async function runSearch(text) {
  text = (text ?? $("q").value).trim();
  if (!text) {
    showError(new Error("type a few words to search"));
    return;
  }
  $("q").value = text;
  state.lastQuery = text;
  const rerank = rerankOn();
  const filters = filterParams();
  const params = new URLSearchParams({ q: text, k: String(state.k), why: "1", ...filters });
  if (rerank) {
    params.set("rerank", String(state.rerankPool));
    params.set("explain", "1");
  }
  state.pageParams = new URLSearchParams(params);
  state.nextCursor = null;
  history.replaceState(null, "", "?" + new URLSearchParams({ q: text, ...filters, ...(rerank ? { rerank: "1" } : {}) }));
  const seq = ++state.seq;
  if (state.controller) state.controller.abort();
  state.controller = new AbortController();
  document.body.classList.add("loading");
  setStatus([rerank ? "Searching and re-ranking…" : "Searching…"]);
  try {
    const data = await api("/search?" + params, { signal: state.controller.signal });
    if (seq !== state.seq) return;
    showError(null);
    $("query-image").hidden = true;
    const t = data.timings_ms;
    const how = data.rerank ? `Fast + Slow re-rank of the top ${data.rerank}` : "Fast";
    state.nextCursor = data.next_cursor || null;
    setStatus([
      { bold: String(data.results.length) },
      ` images for “${data.query}”` + (data.n_matching < data.n_images ? ` (${data.n_matching} of ${data.n_images} match the filters)` : "") + " in ",
      { bold: `${ms(t.server)} ms` },
      ` (${how}` + (data.rerank && t.rerank != null ? `; re-rank ${ms(t.rerank)} ms` : "") +
        `; round trip ${ms(data.clientMs)} ms)`,
    ]);
    render(data.results);
    // the observer only reports changes: if the first page leaves the end in view, fetch on at once
    if (state.nextCursor && nearBottom()) loadMore();
  } catch (e) {
    if (e.name === "AbortError") return;
    if (seq !== state.seq) return;
    setStatus([]);
    showError(e);
  } finally {
    if (seq === state.seq) document.body.classList.remove("loading");
  }
}

// Infinite scroll: when the end of the grid comes into view, fetch the next page with its cursor.
async function loadMore() {
  if (!state.nextCursor || state.loadingMore || !state.pageParams) return;
  state.loadingMore = true;
  const seq = state.seq;
  const params = new URLSearchParams(state.pageParams);
  params.set("cursor", state.nextCursor);
  $("more").hidden = false;
  try {
    const data = await api("/search?" + params, { signal: state.controller ? state.controller.signal : undefined });
    if (seq !== state.seq) return;
    state.nextCursor = data.next_cursor || null;
    render(data.results, true);
  } catch (e) {
    if (e.name !== "AbortError" && seq === state.seq) showError(e);
    state.nextCursor = null;
  } finally {
    state.loadingMore = false;
    $("more").hidden = true;
    if (seq === state.seq && state.nextCursor && nearBottom()) loadMore();
  }
}

// The sentinel, not #more: a hidden element's box is all zeros, so it would always look "near".
function nearBottom() {
  return $("more-sentinel").getBoundingClientRect().top < window.innerHeight + 400;
}

// ---- search by image ------------------------------------------------------------------------------
async function searchImage(file) {
  if (!file) return;
  const limit = state.health ? state.health.limits.max_upload_bytes : 20 * 1024 * 1024;
  if (file.type && !file.type.startsWith("image/")) {
    showError(new Error(`${file.name} is not an image`));
    return;
  }
  if (file.size > limit) {
    showError(new Error(`${file.name} is too large (the limit is ${Math.round(limit / 1048576)} MB)`));
    return;
  }
  const seq = ++state.seq;
  if (state.controller) state.controller.abort();
  state.controller = new AbortController();
  const form = new FormData();
  form.append("file", file, file.name || "image");
  setStatus(["Searching with your image…"]);
  try {
    const data = await api(`/search/image?k=${state.k}&captions=5`, {
      method: "POST",
      body: form,
      signal: state.controller.signal,
    });
    if (seq !== state.seq) return;
    showError(null);
    const preview = $("query-preview");
    if (preview.src.startsWith("blob:")) URL.revokeObjectURL(preview.src);
    preview.src = URL.createObjectURL(file);
    const list = $("captions");
    list.replaceChildren();
    for (const c of data.captions) {
      const li = document.createElement("li");
      const text = document.createElement("span");
      text.className = "text";
      text.textContent = c.text;
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = `  ${fmt(c.score)}`;
      li.append(text, score);
      li.title = "search with this caption";
      li.addEventListener("click", () => runSearch(c.text));
      list.append(li);
    }
    $("query-image").hidden = false;
    setStatus([
      { bold: String(data.images.length) },
      " similar images and ",
      { bold: String(data.captions.length) },
      " captions in ",
      { bold: `${ms(data.timings_ms.server)} ms` },
      ` (round trip ${ms(data.clientMs)} ms)`,
    ]);
    render(data.images);
  } catch (e) {
    if (e.name === "AbortError" || seq !== state.seq) return;
    setStatus([]);
    showError(e);
  }
}

// ---- results grid --------------------------------------------------------------------------------------
function render(hits, append = false) {
  const grid = $("grid");
  const start = append ? state.results.length : 0;
  if (append) {
    state.results = state.results.concat(hits);
    hits.forEach((hit, i) => grid.append(card(hit, start + i)));
    return;
  }
  state.results = hits;
  const withExpl = hits.find((h) => h.explanation && h.explanation.tokens);
  state.words = withExpl ? withExpl.explanation.tokens : [];
  state.word = null;
  renderWords();
  grid.replaceChildren();
  $("empty").hidden = hits.length > 0;
  if (!hits.length) $("empty").firstElementChild.textContent = "No results.";
  hits.forEach((hit, i) => grid.append(card(hit, i)));
}

function metaLine(hit) {
  const parts = [];
  if (hit.taken != null) parts.push(new Date(hit.taken * 1000).toISOString().slice(0, 10));
  if (hit.folder) parts.push(hit.folder);
  return parts.join(" · ");
}

function card(hit, i) {
  const fig = document.createElement("figure");
  fig.className = "card";
  fig.dataset.index = String(i);
  const frame = document.createElement("div");
  frame.className = "frame";
  const img = document.createElement("img");
  img.src = hit.url;
  img.alt = hit.id;
  img.title = hit.id;
  img.loading = "lazy";
  img.decoding = "async";
  const heat = document.createElement("canvas");
  heat.className = "heat";
  heat.hidden = true;
  const rank = document.createElement("span");
  rank.className = "rank";
  rank.textContent = String(hit.rank);
  frame.append(img, heat, rank);
  img.addEventListener("load", () => {
    if (state.word != null) drawHeat(heat, img, hit.explanation, state.word);
  });
  // a result removed from the index (DELETE /images/ID, a sync) has no image any more: hide it
  img.addEventListener("error", () => {
    fig.hidden = true;
  });
  fig.dataset.id = hit.id;
  const cap = document.createElement("figcaption");
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = fmt(hit.score);
  cap.append(score);
  const meta = metaLine(hit);
  if (meta) {
    const m = document.createElement("span");
    m.className = "meta";
    m.textContent = meta;
    if (hit.camera) m.title = hit.camera;
    cap.append(m);
  }
  if (hit.slow_score != null) {
    const sub = document.createElement("span");
    sub.className = "sub";
    sub.textContent = `fast ${fmt(hit.fast_score)} · slow ${fmt(hit.slow_score)}`;
    cap.append(sub);
  }
  if (hit.concepts && hit.concepts.length) {
    // the ImageNet concepts that drove this result (name, probability in the image)
    const tags = document.createElement("span");
    tags.className = "tags";
    for (const c of hit.concepts) {
      const tag = document.createElement("span");
      tag.className = "tag";
      tag.textContent = c.name;
      tag.title = `${c.name}: ${fmt(c.weight)}`;
      tags.append(tag);
    }
    cap.append(tags);
  }
  fig.append(frame, cap);
  window.vlsVideo?.decorate(fig, hit);
  fig.addEventListener("click", () => openViewer(hit));
  return fig;
}

// ---- explanations: word chips and heat maps -----------------------------------------------------------
function chip(word, i, pressed, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = "chip";
  b.textContent = word;
  b.dataset.word = String(i);
  b.setAttribute("aria-pressed", pressed ? "true" : "false");
  b.addEventListener("click", onClick);
  return b;
}

function renderWords() {
  const box = $("word-chips");
  box.replaceChildren();
  $("words").hidden = state.words.length === 0;
  state.words.forEach((w, i) =>
    box.append(chip(w, i, state.word === i, () => pickWord(state.word === i ? null : i)))
  );
}

function pickWord(i) {
  state.word = i;
  renderWords();
  document.querySelectorAll("#grid .card").forEach((fig) => {
    const hit = state.results[Number(fig.dataset.index)];
    drawHeat(fig.querySelector(".heat"), fig.querySelector("img"), hit && hit.explanation, i);
  });
  if (state.viewerHit) renderViewerWords();
}

// value in [0, 1] -> RGBA: transparent blue through green and yellow to opaque red
const STOPS = [
  [0.0, [20, 30, 140]],
  [0.35, [0, 120, 255]],
  [0.6, [0, 220, 140]],
  [0.8, [255, 220, 0]],
  [1.0, [255, 40, 0]],
];
function heatColor(v) {
  let j = 1;
  while (j < STOPS.length - 1 && v > STOPS[j][0]) j++;
  const [a, ca] = STOPS[j - 1];
  const [b, cb] = STOPS[j];
  const t = Math.min(1, Math.max(0, (v - a) / (b - a || 1)));
  const rgb = ca.map((x, n) => Math.round(x + (cb[n] - x) * t));
  return [...rgb, Math.round(255 * (0.05 + 0.65 * v * v))];
}

function drawHeat(canvas, img, expl, wordIndex) {
  if (!canvas) return;
  const ctx = canvas.getContext("2d");
  const ok = expl && wordIndex != null && Array.isArray(expl.maps) && wordIndex < expl.maps.length;
  if (!ok || !img.complete || !img.naturalWidth) {
    canvas.hidden = true;
    return;
  }
  const [gh, gw] = expl.grid;
  const values = expl.maps[wordIndex];
  let lo = Infinity;
  let hi = -Infinity;
  for (const v of values) {
    if (v < lo) lo = v;
    if (v > hi) hi = v;
  }
  const span = hi - lo || 1;
  const small = document.createElement("canvas");
  small.width = gw;
  small.height = gh;
  const sctx = small.getContext("2d");
  const pixels = sctx.createImageData(gw, gh);
  for (let n = 0; n < gw * gh; n++) {
    const c = heatColor((values[n] - lo) / span);
    pixels.data.set(c, n * 4);
  }
  sctx.putImageData(pixels, 0, 0);
  const dpr = window.devicePixelRatio || 1;
  canvas.width = Math.max(1, Math.round(img.clientWidth * dpr));
  canvas.height = Math.max(1, Math.round(img.clientHeight * dpr));
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.imageSmoothingEnabled = true;
  ctx.imageSmoothingQuality = "high";
  // the model saw the image squashed to a square grid, so the grid spans the whole picture
  ctx.drawImage(small, 0, 0, canvas.width, canvas.height);
  canvas.hidden = false;
  canvas.dataset.word = String(wordIndex);
}

// ---- the viewer (one result, large) -----------------------------------------------------------------------
function openViewer(hit) {
  state.viewerHit = hit;
  const img = $("viewer-img");
  img.onload = () => drawHeat($("viewer-heat"), img, hit.explanation, state.word);
  img.src = hit.url;
  img.alt = hit.id;
  $("viewer-title").textContent = `#${hit.rank} · ${hit.id}`;
  $("viewer-scores").textContent =
    hit.slow_score != null
      ? `score ${fmt(hit.score)} (fast ${fmt(hit.fast_score)}, slow ${fmt(hit.slow_score)})`
      : `score ${fmt(hit.score)}`;
  $("viewer-link").href = hit.url;
  showRemove(hit);
  window.vlsVideo?.open(hit);
  renderViewerWords();
  const dlg = $("viewer");
  if (!dlg.open) dlg.showModal();
}

function renderViewerWords() {
  const hit = state.viewerHit;
  const expl = hit && hit.explanation;
  const box = $("viewer-chips");
  box.replaceChildren();
  $("viewer-words").hidden = !expl;
  if (expl) {
    expl.tokens.forEach((w, i) =>
      box.append(chip(w, i, state.word === i, () => pickWord(state.word === i ? null : i)))
    );
  }
  drawHeat($("viewer-heat"), $("viewer-img"), expl, state.word);
}

// ---- removing a result from the index (DELETE /images/ID, with the write token) -------------------------
const TOKEN_KEY = "vlsearch-write-token"; // this tab only (sessionStorage): never in a cookie or the URL

function showRemove(hit) {
  const writable = !!(state.health && state.health.write && state.health.write.enabled);
  $("remove-form").hidden = !writable;
  $("remove-token").hidden = !!sessionStorage.getItem(TOKEN_KEY);
  $("remove-note").textContent = "";
  $("remove").disabled = false;
  $("remove").textContent = hit.kind === "video" ? "Remove this video from the index" : "Remove from the index";
}

function imagePath(id) {
  return "/images/" + id.split("/").map(encodeURIComponent).join("/");
}

async function removeHit(e) {
  e.preventDefault();
  const hit = state.viewerHit;
  if (!hit) return;
  const typed = $("remove-token").value;
  const token = typed || sessionStorage.getItem(TOKEN_KEY);
  if (!token) {
    $("remove-token").hidden = false;
    $("remove-note").textContent = "Enter the server's write token to remove results.";
    $("remove-token").focus();
    return;
  }
  $("remove").disabled = true;
  try {
    const body = await api(imagePath(hit.id), { method: "DELETE", headers: { Authorization: `Bearer ${token}` } });
    sessionStorage.setItem(TOKEN_KEY, token);
    $("remove-token").value = "";
    hideRemoved(hit.id);
    $("viewer").close();
    setStatus([`removed ${hit.id} · `, { bold: body.n_images.toLocaleString() }, " items left in the index"]);
  } catch (err) {
    if (err.status === 401 || err.status === 403) {
      sessionStorage.removeItem(TOKEN_KEY);
      $("remove-token").hidden = false;
    }
    $("remove-note").textContent = err.message || String(err);
    $("remove").disabled = false;
  }
}

function hideRemoved(id) {
  // at once, without a new search: its card leaves the grid (state.results keeps its slot, which the
  // other cards' data-index points into)
  for (const fig of $("grid").querySelectorAll("figure.card")) {
    if (fig.dataset.id === id) fig.remove();
  }
}

// ---- wiring ----------------------------------------------------------------------------------------------
function init() {
  $("search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    runSearch();
  });
  $("rerank").addEventListener("change", () => {
    if (state.lastQuery) runSearch(state.lastQuery);
  });
  $("filters").addEventListener("submit", (e) => {
    e.preventDefault();
    if (state.lastQuery) runSearch(state.lastQuery);
  });
  $("filters").addEventListener("change", () => {
    if (state.lastQuery) runSearch(state.lastQuery);
  });
  new IntersectionObserver((entries) => {
    if (entries.some((en) => en.isIntersecting)) loadMore();
  }, { rootMargin: "400px" }).observe($("more-sentinel"));
  // and on scroll, for a sentinel that never left the viewport margin (images still loading)
  window.addEventListener("scroll", () => {
    if (state.nextCursor && !state.loadingMore && nearBottom()) loadMore();
  }, { passive: true });
  $("pick").addEventListener("click", () => $("file").click());
  $("file").addEventListener("change", (e) => {
    const f = e.target.files && e.target.files[0];
    if (f) searchImage(f);
    e.target.value = "";
  });
  $("viewer").addEventListener("close", () => {
    // the close event comes a task after the dialog closed: if the viewer was opened again meanwhile
    // (a quick second click), it must not stop the new clip or forget the new hit
    if ($("viewer").open) return;
    state.viewerHit = null;
    window.vlsVideo?.close();
  });
  $("remove-form").addEventListener("submit", removeHit);
  $("viewer").addEventListener("click", (e) => {
    if (e.target === $("viewer")) $("viewer").close(); // a click on the backdrop
  });

  // drag and drop anywhere on the page
  let depth = 0;
  const hasFiles = (e) => e.dataTransfer && Array.from(e.dataTransfer.types || []).includes("Files");
  window.addEventListener("dragenter", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    depth++;
    $("drop").hidden = false;
  });
  window.addEventListener("dragover", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    e.dataTransfer.dropEffect = "copy";
  });
  window.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) $("drop").hidden = true;
  });
  window.addEventListener("drop", (e) => {
    e.preventDefault();
    depth = 0;
    $("drop").hidden = true;
    const f = e.dataTransfer && e.dataTransfer.files && e.dataTransfer.files[0];
    if (f) searchImage(f);
    else showError(new Error("drop an image file"));
  });
  let resizeTimer = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => state.word != null && pickWord(state.word), 150);
  });

  const params = new URLSearchParams(location.search);
  for (const [name, id] of Object.entries(FILTERS)) if (params.get(name)) $(id).value = params.get(name);
  loadHealth().then(() => {
    if (params.get("rerank") === "1" && !$("rerank").disabled) $("rerank").checked = true;
    if (params.get("q")) runSearch(params.get("q"));
  });
}

document.addEventListener("DOMContentLoaded", init);

// Hide the results of removed images at once (called after a DELETE /images/ID from this page).
window.vlsRemoved = (id) => {
  document.querySelectorAll("#grid .card").forEach((fig) => {
    if (fig.dataset.id === id) fig.hidden = true;
  });
};
