// The search-and-ask page of `mmfm serve`: plain DOM code over the server's JSON API.
// URLs are relative, so the page also works when a proxy serves it under a path prefix.
"use strict";

// ITM re-scores at least this many ITC candidates, so it can lift a hit from below the shown k.
const RERANK_DEPTH = 16;
const TOPK = 5;
const HEADLINE_METRICS = ["r_mean", "txt_r1", "img_r1", "vid_r1", "vqa_acc", "videoqa_acc", "binding_acc",
                          "zeroshot_top1", "miou"];

// The panels that post the picked file: where their errors, results and button are.
const ASK = {error: "ask-error", list: "answers", button: "ask-button"};
const CLASSIFY = {error: "classify-error", list: "label-scores", button: "classify-button"};

const $ = (id) => document.getElementById(id);
const state = {card: null, picked: null, previewUrl: null};

// ---- talking to the server --------------------------------------------------------------------

class ApiError extends Error {}

// The response of a request that succeeded; an ApiError with a readable message otherwise.
async function request(path, options = {}) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    throw new ApiError(`cannot reach the server (${err.message}); is \`mmfm serve\` still running?`);
  }
  if (!response.ok) {
    throw new ApiError(await errorMessage(response));
  }
  return response;
}

// The server's errors are {"error": {"type", "message"}}; a proxy's may be anything.
async function errorMessage(response) {
  const text = await response.text().catch(() => "");
  try {
    const {error} = JSON.parse(text);
    return `${error.message} (${response.status} ${error.type})`;
  } catch {
    return `${response.status} ${response.statusText || "error"}: ${text.slice(0, 200) || "no details"}`;
  }
}

async function api(path, options = {}) {
  const response = await request(path, options);
  try {
    return await response.json();
  } catch {
    throw new ApiError(`${path}: the server's answer is not JSON (${response.status})`);
  }
}

async function fileOf(path) {
  return (await request(path)).blob();
}

// ---- small DOM helpers ------------------------------------------------------------------------

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "className") node.className = value;
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}

function showError(id, err) {
  const box = $(id);
  box.textContent = err instanceof ApiError ? err.message : `unexpected error in the page: ${err}`;
  box.hidden = false;
}

function clearError(id) {
  $(id).hidden = true;
  $(id).textContent = "";
}

async function busy(button, work) {
  button.disabled = true;
  document.body.classList.add("working");
  try {
    await work();
  } finally {
    button.disabled = false;
    document.body.classList.remove("working");
  }
}

const baseName = (id) => id.split(/[\\/]/).pop();
const number = (value, digits = 3) => (value === undefined ? "–" : value.toFixed(digits));

// ---- model card -------------------------------------------------------------------------------

async function loadModelCard() {
  try {
    state.card = await api("model");
  } catch (err) {
    $("server-status").textContent = "server unreachable";
    showError("model-error", err);
    return;
  }
  clearError("model-error");
  const {index} = state.card;
  $("server-status").textContent = index
    ? `${state.card.name} · ${index.size} ${index.modality}s indexed`
    : `${state.card.name} · no index (start with --index DIR to search)`;
  $("model-card").replaceChildren(...modelCard(state.card));
  $("classify-panel").hidden = !state.card.endpoints.includes("POST /classify");
}

function modelCard(card) {
  const facts = el("dl", {className: "facts"});
  const fact = (name, value) => facts.append(el("dt", {text: name}), el("dd", {text: value}));
  fact("device", card.device);
  fact("input", `${card.image_size} px, ${card.num_frames} frames per video`);
  fact("answers", Object.entries(card.answers).map(([head, n]) => `${head}: ${n}`).join(", ") || "none");
  fact("index", card.index ? `${card.index.size} ${card.index.modality}s` : "none");
  const parts = [el("h3", {text: card.name}), facts];
  if (!card.zoo) {
    parts.push(el("p", {className: "hint", text: "not a model-zoo entry (a local checkpoint)"}));
    return parts;
  }
  parts.push(el("p", {className: "description", text: card.zoo.description}));
  parts.push(el("p", {className: "chips"}, ...card.zoo.tasks.map((task) => el("span", {text: task}))));
  const metrics = card.zoo.metrics;
  const headline = HEADLINE_METRICS.filter((name) => name in metrics);
  if (headline.length) parts.push(metricTable(metrics, headline));
  const all = el("details", {}, el("summary", {text: `all ${Object.keys(metrics).length} metrics`}),
                 metricTable(metrics, Object.keys(metrics)));
  parts.push(all);
  return parts;
}

function metricTable(metrics, names) {
  return el("table", {className: "metrics"},
            ...names.map((name) => el("tr", {}, el("th", {text: name}), el("td", {text: String(metrics[name])}))));
}

// ---- search -----------------------------------------------------------------------------------

async function search(event) {
  event.preventDefault();
  clearError("search-error");
  const k = Number($("k").value);
  const reranked = $("rerank").checked;
  const body = {text: $("query").value, k, rerank: reranked ? Math.max(k, RERANK_DEPTH) : null};
  await busy($("search-button"), async () => {
    try {
      const {hits} = await api("search", {method: "POST", headers: {"content-type": "application/json"},
                                          body: JSON.stringify(body)});
      renderHits(hits, reranked);
    } catch (err) {
      $("results").replaceChildren();
      $("search-summary").textContent = "";
      showError("search-error", err);
    }
  });
}

function renderHits(hits, reranked) {
  const how = reranked ? "ITM re-ranked (score = itm + itc)" : "ITC cosine similarity";
  $("search-summary").textContent = `${hits.length} hits · ${how}`;
  $("results").replaceChildren(...hits.map((hit, rank) => hitCard(hit, rank + 1, reranked)));
}

function hitCard(hit, rank, reranked) {
  const scores = el("span", {className: "score", text: number(hit.score)});
  const detail = reranked ? `itm ${number(hit.itm, 2)} · itc ${number(hit.itc)}` : "itc";
  const button = el("button", {type: "button", className: "hit-button", title: `ask about ${hit.id}`},
                    thumbnail(hit), el("span", {className: "rank", text: `#${rank}`}));
  button.addEventListener("click", () => pickHit(hit, button));
  return el("li", {className: "hit", "data-id": hit.id, "data-position": String(hit.position)}, button,
            el("div", {className: "caption"}, scores, el("span", {className: "detail", text: detail})),
            el("div", {className: "hit-id", title: hit.id, text: baseName(hit.id)}));
}

function thumbnail(hit) {
  if (state.card && state.card.index && state.card.index.modality === "text") {
    return el("span", {className: "text-hit", text: hit.id});
  }
  const img = el("img", {src: `thumb/${hit.position}`, alt: baseName(hit.id), loading: "lazy"});
  img.addEventListener("error", async () => {
    let message = "no preview";
    try {
      await fileOf(img.src);
    } catch (err) {
      message = err.message;
    }
    img.replaceWith(el("span", {className: "thumb-error", role: "alert", text: message}));
  });
  return img;
}

// ---- ask (VQA) and classify --------------------------------------------------------------------------------

async function pickHit(hit, button) {
  clearError("ask-error");
  const modality = state.card && state.card.index ? state.card.index.modality : "image";
  try {
    const blob = await fileOf(`item/${hit.position}`);
    setPicked(blob, baseName(hit.id), modality);
  } catch (err) {
    showError("ask-error", err);
    return;
  }
  document.querySelectorAll(".hit-button.picked").forEach((other) => other.classList.remove("picked"));
  button.classList.add("picked");
  $("question").focus();
}

function pickUpload() {
  const file = $("ask-file").files[0];
  if (!file) return;
  clearError("ask-error");
  document.querySelectorAll(".hit-button.picked").forEach((other) => other.classList.remove("picked"));
  // "file": the server tells an image from a video by extension, or by what decodes.
  setPicked(file, file.name, "file");
}

function setPicked(blob, name, field) {
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = URL.createObjectURL(blob);
  state.picked = {blob, name, field};
  const isVideo = field === "video" || (blob.type || "").startsWith("video/");
  const media = isVideo ? el("video", {src: state.previewUrl, controls: "", muted: "", loop: ""})
                        : el("img", {src: state.previewUrl, alt: name});
  $("ask-media").replaceChildren(media);
  $("ask-name").textContent = name;
  $("ask-preview").hidden = false;
  $("answers").replaceChildren();
  $("label-scores").replaceChildren();
}

function ask(event) {
  event.preventDefault();
  const fields = {question: $("question").value, topk: TOPK};
  return postPicked("vqa", fields, ASK, ({answers}) => answers.map((a) => [a.answer, a.probability]));
}

function classify(event) {
  event.preventDefault();
  const fields = {labels: $("labels").value, topk: TOPK};
  return postPicked("classify", fields, CLASSIFY, ({labels}) => labels.map((l) => [l.label, l.probability]));
}

// POST the picked file and `fields` to `endpoint`; `rows` turns the answer into [name, probability] pairs.
async function postPicked(endpoint, fields, panel, rows) {
  clearError(panel.error);
  $(panel.list).replaceChildren();
  if (!state.picked) {
    showError(panel.error, new ApiError("upload an image or a video, or pick a search result, first"));
    return;
  }
  const form = new FormData();
  form.append(state.picked.field, state.picked.blob, state.picked.name);
  for (const [name, value] of Object.entries(fields)) form.append(name, String(value));
  await busy($(panel.button), async () => {
    try {
      renderBars(panel.list, rows(await api(endpoint, {method: "POST", body: form})));
    } catch (err) {
      showError(panel.error, err);
    }
  });
}

function renderBars(listId, rows) {
  $(listId).replaceChildren(...rows.map(([name, probability]) => {
    const percent = `${(100 * probability).toFixed(1)}%`;
    const bar = el("span", {className: "bar"});
    bar.style.width = `${Math.max(0.5, 100 * probability)}%`;
    return el("li", {className: "answer"}, el("span", {className: "answer-label", text: name}),
              el("span", {className: "track"}, bar), el("span", {className: "percent", text: percent}));
  }));
}

// ---- start ------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("search-form").addEventListener("submit", search);
  $("ask-form").addEventListener("submit", ask);
  $("classify-form").addEventListener("submit", classify);
  $("ask-file").addEventListener("change", pickUpload);
  loadModelCard();
});
