// The BuboGPT chat page: media upload, a streamed chat, and the grounded entities drawn on a canvas.
//
// The API is stateless, so the page keeps the conversation and sends all of it every turn:
//   messages = [{role: "user", content: [text, image_url (data URL), input_audio]},   <- media ride
//               {role: "assistant", content: "..."}, {role: "user", content: "..."}, ...]  on turn 1
// Answers arrive as server-sent events from POST v1/chat/completions (stream: true); the chunk
// with a finish_reason also carries `grounding`:
//   entities: [{id, label, colour, boxes: [[x1, y1, x2, y2], ...] (pixels of the uploaded image),
//               masks: [{size: [h, w], counts: COCO RLE string}, ...], score}]
//   spans:    [{start, end, text, entity_id}]  (offsets in Unicode code points, as Python counts)
//   annotated_image: base64 PNG drawn by the server
"use strict";

const AUDIO_FORMATS_BY_TYPE = {
  "audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav", "audio/vnd.wave": "wav",
  "audio/mpeg": "mp3", "audio/mp3": "mp3", "audio/flac": "flac", "audio/x-flac": "flac",
  "audio/ogg": "ogg", "application/ogg": "ogg",
};
const AUDIO_FORMATS_BY_EXTENSION = { wav: "wav", wave: "wav", mp3: "mp3", flac: "flac", ogg: "ogg", oga: "ogg" };
const IMAGE_EXTENSIONS = ["png", "jpg", "jpeg", "gif", "bmp", "webp", "tif", "tiff"];
const MASK_ALPHA = 0.45; // translucency of a mask over the image (0 = invisible, 1 = opaque)
const MIN_CANVAS_SIDE = 640; // small images are drawn enlarged, so boxes and labels stay sharp

const $ = (id) => document.getElementById(id);

const state = {
  image: null, // {file, dataUrl, element: HTMLImageElement | null}
  audio: null, // {file, format, base64, objectUrl}
  turns: [], // finished turns of the current conversation: {role, text}
  grounding: null, // the grounding shown on the canvas: {entities, spans, annotated_image}
  selected: null, // id of the only entity shown, or null for all
  busy: false,
};

// ================================================================================================
// Errors
// ================================================================================================

class InputError extends Error {} // a file the page cannot use, found before anything is sent

class ApiError extends Error {
  constructor(status, message, type) {
    super(message);
    this.status = status;
    this.type = type;
  }
}

function showError(error) {
  let text;
  if (error instanceof ApiError) {
    const what = error.status
      ? `The server refused the request (HTTP ${error.status})`
      : "The server reported an error";
    text = `${what}: ${error.message}`;
    if (error.status === 401) text += " — enter the API key at the top of the page.";
  } else if (error instanceof InputError) {
    text = error.message;
  } else {
    text = `Could not reach the server: ${error.message}`;
  }
  $("error-text").textContent = text;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error-text").textContent = "";
}

/** A non-2xx response -> ApiError with the server's message (its JSON errors: {error: {message, type}}). */
async function apiErrorFrom(response) {
  const body = await response.text();
  try {
    const error = JSON.parse(body).error;
    if (error && error.message) return new ApiError(response.status, error.message, error.type);
  } catch (_) {
    // not JSON: fall through to the raw text
  }
  return new ApiError(response.status, body.trim().slice(0, 300) || response.statusText);
}

// ================================================================================================
// Media
// ================================================================================================

function extensionOf(name) {
  const dot = name.lastIndexOf(".");
  return dot < 0 ? "" : name.slice(dot + 1).toLowerCase();
}

function kindOfFile(file) {
  if (file.type.startsWith("image/") || IMAGE_EXTENSIONS.includes(extensionOf(file.name))) return "image";
  if (file.type.startsWith("audio/") || file.type === "application/ogg" ||
      extensionOf(file.name) in AUDIO_FORMATS_BY_EXTENSION) return "audio";
  return null;
}

function audioFormat(file) {
  return AUDIO_FORMATS_BY_TYPE[file.type] || AUDIO_FORMATS_BY_EXTENSION[extensionOf(file.name)] || null;
}

function readDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new InputError(`Could not read ${file.name}: ${reader.error}`));
    reader.readAsDataURL(file);
  });
}

/** Resolves to the decoded <img>, or null when the browser cannot decode it (the server decides). */
function loadImage(url) {
  return new Promise((resolve) => {
    const element = new Image();
    element.onload = () => resolve(element);
    element.onerror = () => resolve(null);
    element.src = url;
  });
}

async function setImage(file) {
  if (kindOfFile(file) !== "image") throw new InputError(`${file.name} is not an image file.`);
  let dataUrl = await readDataUrl(file);
  if (!dataUrl.startsWith("data:image/")) {
    // No or a non-image MIME type (e.g. an unknown extension): the user chose it as the image.
    dataUrl = "data:image/" + (extensionOf(file.name) || "octet-stream") + dataUrl.slice(dataUrl.indexOf(";"));
  }
  startNewConversationIfNeeded(state.image ? "the image changed" : "an image was added");
  state.image = { file, dataUrl, element: await loadImage(dataUrl) };
  state.grounding = null;
  state.selected = null;
  renderAttachments();
  renderView();
}

async function setAudio(file) {
  if (kindOfFile(file) !== "audio") throw new InputError(`${file.name} is not a sound file.`);
  const format = audioFormat(file);
  if (!format) throw new InputError(`${file.name}: unsupported sound format; use WAV, MP3, FLAC or OGG.`);
  const dataUrl = await readDataUrl(file);
  startNewConversationIfNeeded(state.audio ? "the sound changed" : "a sound was added");
  if (state.audio) URL.revokeObjectURL(state.audio.objectUrl);
  state.audio = { file, format, base64: dataUrl.slice(dataUrl.indexOf(",") + 1), objectUrl: URL.createObjectURL(file) };
  renderAttachments();
  renderSound();
}

async function addFiles(files) {
  clearError();
  try {
    for (const file of files) {
      const kind = kindOfFile(file);
      if (kind === "image") await setImage(file);
      else if (kind === "audio") await setAudio(file);
      else {
        throw new InputError(
          `${file.name}: not an image or a sound file (drop a PNG/JPEG image or a WAV/MP3/FLAC/OGG sound).`);
      }
    }
  } catch (error) {
    showError(error);
  }
}

function removeMedia(kind) {
  startNewConversationIfNeeded(`the ${kind === "image" ? "image" : "sound"} was removed`);
  if (kind === "image") {
    state.image = null;
    state.grounding = null;
    state.selected = null;
    $("image-input").value = "";
    renderView();
  } else {
    URL.revokeObjectURL(state.audio.objectUrl);
    state.audio = null;
    $("audio-input").value = "";
    renderSound();
  }
  renderAttachments();
}

// ================================================================================================
// Conversation
// ================================================================================================

/** The model has one image and one audio slot per conversation: new media start a new one. The
 *  earlier messages stay on screen, marked as no longer part of what is sent. */
function startNewConversationIfNeeded(reason) {
  if (state.turns.length === 0) return;
  state.turns = [];
  for (const item of $("messages").querySelectorAll("li.message")) item.classList.add("past");
  addDivider(`New conversation: ${reason}.`);
}

function resetChat() {
  state.turns = [];
  if (state.image) removeMedia("image");
  if (state.audio) removeMedia("audio");
  $("messages").replaceChildren();
  clearError();
  $("message").focus();
}

/** The OpenAI-format request for the conversation so far plus `text`. */
function buildRequest(text) {
  const turns = [...state.turns, { role: "user", text }];
  const messages = turns.map((turn, index) => {
    if (index > 0) return { role: turn.role, content: turn.text };
    const parts = [{ type: "text", text: turn.text }];
    if (state.image) parts.push({ type: "image_url", image_url: { url: state.image.dataUrl } });
    if (state.audio) {
      parts.push({ type: "input_audio", input_audio: { data: state.audio.base64, format: state.audio.format } });
    }
    return { role: "user", content: parts };
  });
  const request = { messages, stream: true };
  const maxTokens = $("max-tokens").value.trim();
  const temperature = $("temperature").value.trim();
  const topP = $("top-p").value.trim();
  if (maxTokens) request.max_tokens = Number(maxTokens);
  if (temperature) request.temperature = Number(temperature);
  if (topP) request.top_p = Number(topP);
  return request;
}

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

/** POST the request and read the event stream: `onDelta(text)` per piece of the answer; resolves to
 *  {finishReason, grounding} from the final chunk. Throws ApiError for a refusal or an error event. */
async function streamChat(request, onDelta) {
  const response = await fetch("v1/chat/completions", {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "text/event-stream", ...authHeaders() },
    body: JSON.stringify(request),
  });
  if (!response.ok) throw await apiErrorFrom(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let final = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart()).join("\n");
      if (!data) continue; // a comment or keep-alive
      if (data === "[DONE]") {
        if (!final) throw new ApiError(0, "the answer stream ended without a final chunk");
        return final;
      }
      let chunk;
      try {
        chunk = JSON.parse(data);
      } catch (_) {
        throw new ApiError(0, `the server sent an unreadable event: ${data.slice(0, 200)}`);
      }
      if (chunk.error) throw new ApiError(chunk.error.code || 0, chunk.error.message, chunk.error.type);
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) onDelta(choice.delta.content);
      if (choice.finish_reason) final = { finishReason: choice.finish_reason, grounding: chunk.grounding || null };
    }
  }
  throw new ApiError(0, "the connection closed before the answer was complete");
}

async function send(event) {
  event.preventDefault();
  if (state.busy) return;
  const input = $("message");
  const text = input.value.trim();
  // Media open the first turn only; every later turn needs words.
  if (!text && (state.turns.length > 0 || (!state.image && !state.audio))) {
    const hint = state.turns.length ? "Type a message." : "Type a message, or attach an image or a sound.";
    showError(new InputError(hint));
    return;
  }
  clearError();
  const request = buildRequest(text);
  setBusy(true);
  input.value = "";
  const firstTurn = state.turns.length === 0;
  const userItem = addMessage("user", text, { image: firstTurn && state.image, audio: firstTurn && state.audio });
  const answerItem = addMessage("assistant", "");
  const answerText = answerItem.querySelector(".text");
  answerItem.classList.add("streaming");
  let answer = "";
  try {
    const result = await streamChat(request, (delta) => {
      answer += delta;
      answerText.textContent = answer;
      scrollToEnd();
    });
    answerItem.classList.remove("streaming");
    state.turns.push({ role: "user", text }, { role: "assistant", text: answer });
    if (result.finishReason === "length") answerItem.classList.add("truncated");
    if (result.grounding) {
      answerItem.grounding = result.grounding;
      renderAnswer(answerText, answer, result.grounding);
      showGrounding(result.grounding);
    }
  } catch (error) {
    // Nothing of a failed turn enters the conversation; the message goes back into the box.
    userItem.remove();
    answerItem.remove();
    if (!input.value) input.value = text;
    showError(error);
  } finally {
    setBusy(false);
    input.focus();
  }
}

function setBusy(busy) {
  state.busy = busy;
  $("send").disabled = busy;
  $("send").textContent = busy ? "Answering…" : "Send";
}

// ================================================================================================
// Rendering: messages and entity spans
// ================================================================================================

function addMessage(role, text, media = {}) {
  const item = document.createElement("li");
  item.className = `message ${role}`;
  const who = document.createElement("span");
  who.className = "role";
  who.textContent = role === "user" ? "You" : "BuboGPT";
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  item.append(who, body);
  const names = [media.image && `image: ${media.image.file.name}`, media.audio && `sound: ${media.audio.file.name}`]
    .filter(Boolean);
  if (names.length) {
    const attached = document.createElement("div");
    attached.className = "attached";
    attached.textContent = names.join(" · ");
    item.append(attached);
  }
  $("messages").append(item);
  scrollToEnd();
  return item;
}

function addDivider(text) {
  const item = document.createElement("li");
  item.className = "divider";
  item.textContent = text;
  $("messages").append(item);
}

function scrollToEnd() {
  const list = $("messages");
  list.scrollTop = list.scrollHeight;
}

/** The answer with each span as a clickable mark in its entity's colour. Offsets count code points
 *  (Python's str), so the text is split with Array.from, not indexed as UTF-16. A span whose text
 *  does not match the answer at its offsets is left unmarked rather than marking the wrong words. */
function renderAnswer(element, answer, grounding) {
  const chars = Array.from(answer);
  const entities = new Map(grounding.entities.map((entity) => [entity.id, entity]));
  const spans = [...grounding.spans].sort((a, b) => a.start - b.start);
  const pieces = [];
  let position = 0;
  for (const span of spans) {
    const entity = entities.get(span.entity_id);
    if (!entity || span.start < position || span.end <= span.start || span.end > chars.length) continue;
    const spanText = chars.slice(span.start, span.end).join("");
    if (span.text !== undefined && span.text !== spanText) continue;
    pieces.push(chars.slice(position, span.start).join(""));
    const mark = document.createElement("mark");
    mark.className = "entity-span";
    mark.textContent = spanText;
    mark.dataset.entityId = String(entity.id);
    mark.style.setProperty("--entity-colour", cssColour(entity.colour));
    mark.tabIndex = 0;
    mark.setAttribute("role", "button");
    mark.setAttribute("aria-pressed", "false");
    mark.title = `${entity.label}: click to show only this; click again to show all`;
    pieces.push(mark);
    position = span.end;
  }
  pieces.push(chars.slice(position).join(""));
  element.replaceChildren(...pieces);
}

function onSpanActivated(mark) {
  const item = mark.closest("li.message");
  if (item && item.grounding && item.grounding !== state.grounding) showGrounding(item.grounding);
  const id = mark.dataset.entityId;
  select(state.selected === id ? null : id);
}

function select(id) {
  state.selected = id;
  for (const mark of document.querySelectorAll(".entity-span, .legend-entry")) {
    const on = id !== null && mark.dataset.entityId === id;
    mark.classList.toggle("selected", on);
    mark.setAttribute("aria-pressed", String(on));
  }
  document.body.classList.toggle("entity-selected", id !== null);
  renderView();
}

// ================================================================================================
// Rendering: the image with boxes and translucent masks
// ================================================================================================

const colourProbe = document.createElement("canvas").getContext("2d");

/** An entity colour as the API gives it ("#rrggbb", a CSS colour or [r, g, b]) -> a CSS colour. */
function cssColour(colour) {
  if (Array.isArray(colour)) return `rgb(${colour.slice(0, 3).join(", ")})`;
  return String(colour);
}

/** Any CSS colour -> [r, g, b] (the canvas normalises an opaque colour to "#rrggbb"). */
function rgbOf(colour) {
  colourProbe.fillStyle = "#000000";
  colourProbe.fillStyle = cssColour(colour);
  const hex = colourProbe.fillStyle;
  if (hex.startsWith("#")) return [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
  return hex.match(/[\d.]+/g).slice(0, 3).map(Number);
}

/** COCO run-length encoding -> run lengths. `counts` is either a list of numbers (uncompressed RLE)
 *  or pycocotools' compressed string: 6-bit chunks offset by 48, 5 value bits each, bit 0x20 =
 *  "more chunks follow", bit 0x10 of the last chunk = negative; from the 3rd run on, each value is a
 *  difference to the run two before (maskApi.c, rleFrString). Arithmetic, not bit shifts: runs can
 *  exceed 32 bits' worth of chunks. */
function rleRuns(counts) {
  if (Array.isArray(counts)) return counts;
  const runs = [];
  let p = 0;
  while (p < counts.length) {
    let value = 0;
    let k = 0;
    let more = true;
    while (more) {
      const c = counts.charCodeAt(p) - 48;
      value += (c & 0x1f) * 2 ** (5 * k);
      more = (c & 0x20) !== 0;
      p += 1;
      k += 1;
      if (!more && (c & 0x10)) value -= 2 ** (5 * k);
    }
    if (runs.length > 2) value += runs[runs.length - 2];
    runs.push(value);
  }
  return runs;
}

/** A COCO RLE mask -> Uint8Array (h * w, row-major) of 0/1. RLE runs go down columns (Fortran
 *  order), alternating background and foreground, starting with background. */
function decodeRle(rle) {
  const [height, width] = rle.size;
  const mask = new Uint8Array(height * width);
  let index = 0;
  let foreground = false;
  for (const run of rleRuns(rle.counts)) {
    if (foreground) {
      for (let i = index; i < index + run; i++) mask[(i % height) * width + Math.floor(i / height)] = 1;
    }
    index += run;
    foreground = !foreground;
  }
  if (index !== height * width) throw new Error(`RLE covers ${index} pixels, expected ${height}x${width}`);
  return mask;
}

const maskLayers = new WeakMap(); // entity -> canvas holding its masks in its colour (computed once)

function maskLayer(entity) {
  if (maskLayers.has(entity)) return maskLayers.get(entity);
  const masks = entity.masks || [];
  let layer = null;
  if (masks.length) {
    // All masks of an entity cover the same image; the layer is drawn scaled onto the canvas.
    const [height, width] = masks[0].size;
    layer = document.createElement("canvas");
    layer.width = width;
    layer.height = height;
    const context = layer.getContext("2d");
    const pixels = context.createImageData(width, height); // (h * w * 4) RGBA, all transparent
    const [r, g, b] = rgbOf(entity.colour);
    const alpha = Math.round(255 * MASK_ALPHA);
    for (const rle of masks) {
      if (rle.size[0] !== height || rle.size[1] !== width) continue;
      const mask = decodeRle(rle);
      for (let i = 0; i < mask.length; i++) {
        if (!mask[i]) continue;
        pixels.data[4 * i] = r;
        pixels.data[4 * i + 1] = g;
        pixels.data[4 * i + 2] = b;
        pixels.data[4 * i + 3] = alpha;
      }
    }
    context.putImageData(pixels, 0, 0);
  }
  maskLayers.set(entity, layer);
  return layer;
}

function showGrounding(grounding) {
  state.grounding = grounding;
  state.selected = null;
  renderLegend();
  renderView();
}

function visibleEntities() {
  if (!state.grounding) return [];
  return state.grounding.entities.filter((e) => state.selected === null || String(e.id) === state.selected);
}

function renderView() {
  const canvas = $("scene");
  const caption = $("view-caption");
  const image = state.image && state.image.element;
  canvas.hidden = !image;
  $("legend-bar").hidden = !(image && state.grounding && state.grounding.entities.length);
  $("show-all").hidden = state.selected === null;
  const link = $("annotated-link");
  const annotated = state.image && state.grounding && state.grounding.annotated_image;
  link.hidden = !annotated;
  if (annotated) link.href = `data:image/png;base64,${annotated}`;
  if (!state.image) {
    caption.textContent = "Upload an image to see what the model finds in it.";
    return;
  }
  if (!image) {
    caption.textContent =
      `${state.image.file.name}: this browser cannot display it (the server will say whether it can read it).`;
    return;
  }
  // Canvas pixels = image pixels x scale; boxes are in image pixels.
  const scale = Math.max(1, MIN_CANVAS_SIDE / Math.max(image.naturalWidth, image.naturalHeight));
  canvas.width = Math.round(image.naturalWidth * scale);
  canvas.height = Math.round(image.naturalHeight * scale);
  canvas.dataset.scale = String(scale);
  const context = canvas.getContext("2d");
  context.drawImage(image, 0, 0, canvas.width, canvas.height);
  const entities = visibleEntities();
  // Masks are image-resolution data: enlarged without smoothing, each image pixel stays one cell.
  context.imageSmoothingEnabled = false;
  for (const entity of entities) {
    const layer = maskLayer(entity);
    if (layer) context.drawImage(layer, 0, 0, canvas.width, canvas.height);
  }
  context.imageSmoothingEnabled = true;
  const side = Math.min(canvas.width, canvas.height);
  const lineWidth = Math.max(2, Math.round(side / 150));
  const fontSize = Math.max(12, Math.round(side / 22));
  context.font = `${fontSize}px system-ui, sans-serif`;
  context.textBaseline = "top";
  for (const entity of entities) {
    const colour = cssColour(entity.colour);
    for (const box of entity.boxes || []) {
      const [x1, y1, x2, y2] = box.map((v) => v * scale);
      context.lineWidth = lineWidth;
      context.strokeStyle = colour;
      context.strokeRect(x1, y1, x2 - x1, y2 - y1);
      const label = entity.label;
      const labelWidth = context.measureText(label).width + 2 * lineWidth;
      // Above the box, or inside its top edge at the top of the image; never past the right edge.
      const labelY = y1 >= fontSize + 2 * lineWidth ? y1 - fontSize - 2 * lineWidth : y1;
      const labelX = Math.max(0, Math.min(x1, canvas.width - labelWidth));
      context.fillStyle = colour;
      context.fillRect(labelX, labelY, labelWidth, fontSize + 2 * lineWidth);
      context.fillStyle = readableTextColour(entity.colour);
      context.fillText(label, labelX + lineWidth, labelY + lineWidth);
    }
  }
  caption.textContent = viewCaption(entities);
}

function viewCaption(shown) {
  if (!state.grounding) return `${state.image.file.name} — the grounded objects appear with the first answer.`;
  const count = state.grounding.entities.length;
  if (!count) return "Nothing was grounded in this image.";
  if (state.selected === null) return `All ${count} grounded objects. Click a highlighted word to show only its object.`;
  const names = shown.map((e) => e.label).join(", ");
  return `Only “${names}”. Click the word again (or Show all) to see every object.`;
}

function readableTextColour(colour) {
  const [r, g, b] = rgbOf(colour);
  return 0.299 * r + 0.587 * g + 0.114 * b > 150 ? "#111" : "#fff";
}

function renderLegend() {
  const legend = $("legend");
  legend.replaceChildren();
  for (const entity of state.grounding.entities) {
    const entry = document.createElement("li");
    entry.className = "legend-entry";
    entry.dataset.entityId = String(entity.id);
    entry.style.setProperty("--entity-colour", cssColour(entity.colour));
    entry.tabIndex = 0;
    entry.setAttribute("role", "button");
    entry.setAttribute("aria-pressed", "false");
    const score = typeof entity.score === "number" ? ` ${Math.round(entity.score * 100)}%` : "";
    entry.textContent = `${entity.label}${score}`;
    legend.append(entry);
  }
}

function renderAttachments() {
  const list = $("attachments");
  list.replaceChildren();
  for (const [kind, media] of [["image", state.image], ["audio", state.audio]]) {
    if (!media) continue;
    const item = document.createElement("li");
    item.className = `attachment ${kind}`;
    item.textContent = `${kind === "image" ? "image" : "sound"}: ${media.file.name} `;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.setAttribute("aria-label", `Remove ${media.file.name}`);
    remove.addEventListener("click", () => removeMedia(kind));
    item.append(remove);
    list.append(item);
  }
}

function renderSound() {
  const player = $("player");
  $("sound").hidden = !state.audio;
  if (state.audio) {
    player.src = state.audio.objectUrl;
    $("sound-name").textContent = state.audio.file.name;
  } else {
    player.removeAttribute("src");
    player.load();
  }
}

// ================================================================================================
// Wiring
// ================================================================================================

async function checkServer() {
  const status = $("server-status");
  try {
    const response = await fetch("healthz");
    const body = await response.json();
    status.textContent = response.ok ? `ready · ${body.model}` : `unavailable (${body.reason || response.status})`;
    status.classList.toggle("ok", response.ok);
  } catch (error) {
    status.textContent = "server unreachable";
    status.classList.remove("ok");
  }
}

function activateOnKeys(event, action) {
  if (event.key === "Enter" || event.key === " ") {
    event.preventDefault();
    action();
  }
}

function setUp() {
  const key = $("api-key");
  key.value = sessionStorage.getItem("bubogpt-api-key") || "";
  key.addEventListener("change", () => sessionStorage.setItem("bubogpt-api-key", key.value.trim()));

  $("composer").addEventListener("submit", send);
  $("message").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) send(event);
  });
  for (const id of ["image-input", "audio-input"]) {
    $(id).addEventListener("change", (event) => event.target.files.length && addFiles([event.target.files[0]]));
  }
  $("new-chat").addEventListener("click", resetChat);
  $("error-dismiss").addEventListener("click", clearError);
  $("show-all").addEventListener("click", () => select(null));

  // Drag and drop anywhere on the page; the drop zone lights up while something is dragged over.
  const zone = $("drop-zone");
  document.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  });
  document.addEventListener("dragleave", (event) => {
    if (!event.relatedTarget) zone.classList.remove("dragging");
  });
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    if (event.dataTransfer && event.dataTransfer.files.length) addFiles([...event.dataTransfer.files]);
  });

  // Spans and legend entries, present and future: one delegated listener each.
  const activate = (target) => {
    const mark = target.closest(".entity-span");
    if (mark) onSpanActivated(mark);
    const entry = target.closest(".legend-entry");
    if (entry) select(state.selected === entry.dataset.entityId ? null : entry.dataset.entityId);
  };
  document.addEventListener("click", (event) => activate(event.target));
  document.addEventListener("keydown", (event) => {
    if (event.target.matches && event.target.matches(".entity-span, .legend-entry")) {
      activateOnKeys(event, () => activate(event.target));
    }
  });

  checkServer();
}

setUp();
