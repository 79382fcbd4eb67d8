// qwenkit web chat: streams replies from /v1/chat/completions (or /v1/agent when tools are on),
// keeps the conversation in sessionStorage and the settings in localStorage. Plain ES modules, no build.
import { marked } from "./vendor/marked.esm.js";
import DOMPurify from "./vendor/purify.es.mjs";
import hljs from "./vendor/highlight/core.min.js";
import bash from "./vendor/highlight/languages/bash.min.js";
import javascript from "./vendor/highlight/languages/javascript.min.js";
import json from "./vendor/highlight/languages/json.min.js";
import plaintext from "./vendor/highlight/languages/plaintext.min.js";
import python from "./vendor/highlight/languages/python.min.js";
import xml from "./vendor/highlight/languages/xml.min.js";

for (const [name, grammar] of Object.entries({ bash, javascript, json, plaintext, python, xml })) {
  hljs.registerLanguage(name, grammar);
}
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

const CONVERSATION_KEY = "qwenkit.conversation";
const SESSION_KEY = "qwenkit.session";
const SETTINGS_KEY = "qwenkit.settings";
const THOUGHT = "Thought: ";

const $ = (id) => document.getElementById(id);
const ui = {
  log: $("log"), empty: $("empty"), status: $("status"), composer: $("composer"), prompt: $("prompt"),
  send: $("send"), stop: $("stop"), regenerate: $("regenerate"), clear: $("clear"),
  settings: $("settings-form"), system: $("system"), temperature: $("temperature"), topP: $("top_p"),
  maxTokens: $("max_tokens"), seed: $("seed"), useTools: $("use-tools"), apiKey: $("api-key"),
  modelName: $("model-name"),
};

const state = {
  messages: [], // {role: "user" | "assistant", content, steps?}; steps are the agent's tool calls
  views: [], // the <article> of each message
  model: "qwenkit",
  controller: null,
  failed: null, // the view of a reply that failed, with its error
};

// --- Markdown --------------------------------------------------------------------------------

/** Render model Markdown into `element`: parsed by marked, sanitized by DOMPurify, code highlighted. */
export function renderMarkdown(element, text) {
  element.innerHTML = DOMPurify.sanitize(marked.parse(text));
  for (const code of element.querySelectorAll("pre code")) {
    const language = [...code.classList].find((c) => c.startsWith("language-"))?.slice(9);
    if (!language || hljs.getLanguage(language)) hljs.highlightElement(code);
  }
}

// --- Server-sent events ----------------------------------------------------------------------

/** The `data:` payloads of a streamed response. Written by hand because EventSource cannot POST. */
async function* sseData(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let match;
    while ((match = /\r?\n\r?\n/.exec(buffer))) {
      const block = buffer.slice(0, match.index);
      buffer = buffer.slice(match.index + match[0].length);
      const data = block.split(/\r?\n/).filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, "")).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

async function errorText(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    const detail = body.error?.message ?? body.detail;
    if (typeof detail === "string") message = detail;
    else if (Array.isArray(detail)) message = detail.map((d) => `${(d.loc ?? []).join(".")}: ${d.msg}`).join("; ");
  } catch {
    // not JSON: keep the status line
  }
  if (response.status === 401) message += " (enter the server's API key in Settings)";
  return message;
}

function headers() {
  const result = { "Content-Type": "application/json" };
  const key = ui.apiKey.value.trim();
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

// --- Settings --------------------------------------------------------------------------------

/** The sampling settings filled in; an empty field leaves the model's own default. */
function sampling() {
  const fields = { temperature: ui.temperature, top_p: ui.topP, max_tokens: ui.maxTokens, seed: ui.seed };
  const settings = {};
  for (const [name, input] of Object.entries(fields)) {
    if (input.value.trim() !== "") settings[name] = Number(input.value);
  }
  return settings;
}

function selectedTools() {
  return [...ui.settings.querySelectorAll("input[name=tool]:checked")].map((box) => box.value);
}

function saveSettings() {
  const values = {
    system: ui.system.value, temperature: ui.temperature.value, top_p: ui.topP.value,
    max_tokens: ui.maxTokens.value, seed: ui.seed.value, useTools: ui.useTools.checked,
    tools: selectedTools(), apiKey: ui.apiKey.value,
  };
  localStorage.setItem(SETTINGS_KEY, JSON.stringify(values));
}

function loadSettings() {
  let values;
  try {
    values = JSON.parse(localStorage.getItem(SETTINGS_KEY) ?? "null");
  } catch {
    values = null;
  }
  if (!values) return;
  const fields = { system: ui.system, temperature: ui.temperature, top_p: ui.topP,
    max_tokens: ui.maxTokens, seed: ui.seed, apiKey: ui.apiKey };
  for (const [name, input] of Object.entries(fields)) {
    if (typeof values[name] === "string") input.value = values[name];
  }
  ui.useTools.checked = Boolean(values.useTools);
  if (Array.isArray(values.tools)) {
    for (const box of ui.settings.querySelectorAll("input[name=tool]")) box.checked = values.tools.includes(box.value);
  }
}

/** One id per browser tab, so the server keeps one code-interpreter session for it. */
function sessionId() {
  let id = sessionStorage.getItem(SESSION_KEY);
  if (!id) {
    // crypto.randomUUID needs a secure context; a server reached over plain http on a LAN is not one
    id = [...crypto.getRandomValues(new Uint8Array(16))].map((b) => b.toString(16).padStart(2, "0")).join("");
    sessionStorage.setItem(SESSION_KEY, id);
  }
  return id;
}

// --- The conversation on screen ---------------------------------------------------------------

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

/** The view of one message: an <article> whose body is plain text (user) or Markdown (assistant). */
class MessageView {
  constructor(role) {
    this.article = el("article", `message ${role}`);
    this.article.setAttribute("aria-label", role === "user" ? "You" : "Assistant");
    this.article.append(el("h2", "role", role === "user" ? "You" : "Assistant"));
    this.steps = el("ol", "steps");
    this.steps.hidden = true;
    this.body = el("div", "content");
    this.article.append(this.steps, this.body);
    this.role = role;
    this.pending = null; // text waiting for the next frame
    this.scheduled = false;
    ui.empty.hidden = true;
    ui.log.append(this.article);
  }

  /** Show `text`; while streaming, at most once per frame (Markdown parsing is not free). */
  show(text) {
    if (this.role === "user") {
      this.body.textContent = text;
      return;
    }
    this.pending = text;
    if (this.scheduled) return;
    this.scheduled = true;
    requestAnimationFrame(() => {
      this.scheduled = false;
      if (this.pending === null) return; // finish() rendered it already
      renderMarkdown(this.body, this.pending);
      this.pending = null;
      ui.log.scrollTop = ui.log.scrollHeight;
    });
  }

  /** Render now (end of a stream) instead of on the next frame. */
  finish(text) {
    if (this.role === "user") return this.show(text);
    this.pending = null;
    renderMarkdown(this.body, text);
    this.article.classList.remove("streaming");
    ui.log.scrollTop = ui.log.scrollHeight;
  }

  error(message) {
    this.article.classList.remove("streaming");
    const box = el("p", "error", message);
    box.setAttribute("role", "alert");
    this.article.append(box);
  }

  note(message) {
    this.article.append(el("p", "note", message));
  }

  /** A new agent step: the model's thought, then its tool call and the tool's observation. */
  addStep() {
    this.steps.hidden = false;
    const item = el("li", "step");
    const thought = el("pre", "thought");
    item.append(thought);
    this.steps.append(item);
    return { item, thought };
  }

  showAction(step, name, args) {
    const action = el("div", "action");
    action.append(el("span", "label", "Action"), el("code", "tool-name", name));
    const pre = el("pre");
    const fenced = /^```[\w+-]*\n([\s\S]*?)\n?```$/.exec(args.trim()); // code sent in a ```py block
    const code = el("code", name === "python" ? "language-python" : "language-json", fenced ? fenced[1] : args);
    pre.append(code);
    if (hljs.getLanguage(name === "python" ? "python" : "json")) hljs.highlightElement(code);
    action.append(el("span", "label", "Action Input"), pre);
    step.item.append(action);
  }

  showObservation(step, output, images) {
    const observation = el("div", "observation");
    observation.append(el("span", "label", "Observation"));
    if (output) observation.append(el("pre", "output", output));
    images.forEach((png, i) => {
      const image = el("img", "figure");
      image.alt = `Figure ${i + 1} from the tool`;
      image.src = `data:image/png;base64,${png}`;
      observation.append(image);
    });
    step.item.append(observation);
  }

  showSteps(steps) {
    for (const s of steps) {
      const step = this.addStep();
      step.thought.textContent = s.thought ?? "";
      step.thought.hidden = !s.thought;
      if (s.name) this.showAction(step, s.name, s.arguments ?? "");
      if (s.output !== undefined || s.images?.length) this.showObservation(step, s.output ?? "", s.images ?? []);
    }
  }
}

function addMessage(message) {
  const view = new MessageView(message.role);
  if (message.steps) view.showSteps(message.steps);
  view.finish(message.content);
  state.messages.push(message);
  state.views.push(view);
  return view;
}

function saveConversation() {
  const data = JSON.stringify(state.messages);
  try {
    sessionStorage.setItem(CONVERSATION_KEY, data);
  } catch {
    // over the storage quota (large figures): keep the text, drop the images
    const light = state.messages.map((m) => ({ ...m, steps: m.steps?.map((s) => ({ ...s, images: [] })) }));
    try {
      sessionStorage.setItem(CONVERSATION_KEY, JSON.stringify(light));
    } catch {
      sessionStorage.removeItem(CONVERSATION_KEY);
    }
  }
}

function loadConversation() {
  let messages;
  try {
    messages = JSON.parse(sessionStorage.getItem(CONVERSATION_KEY) ?? "[]");
  } catch {
    messages = [];
  }
  if (!Array.isArray(messages)) return;
  for (const m of messages) {
    if ((m?.role === "user" || m?.role === "assistant") && typeof m.content === "string") addMessage(m);
  }
}

function setBusy(busy, label = "") {
  ui.send.disabled = busy;
  ui.stop.hidden = !busy;
  ui.regenerate.disabled = busy || state.messages.length === 0;
  ui.clear.disabled = busy || state.messages.length === 0;
  ui.log.setAttribute("aria-busy", String(busy));
  ui.status.textContent = label;
}

// --- Talking to the server -------------------------------------------------------------------

/** The messages the server sees: the system prompt, then the conversation's roles and texts. */
function requestMessages() {
  const messages = state.messages.map(({ role, content }) => ({ role, content }));
  const system = ui.system.value.trim();
  return system ? [{ role: "system", content: system }, ...messages] : messages;
}

async function streamChat(view, signal) {
  const body = { model: state.model, messages: requestMessages(), stream: true, ...sampling() };
  const response = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(), body: JSON.stringify(body), signal,
  });
  if (!response.ok) throw new Error(await errorText(response));
  const reply = { role: "assistant", content: "" };
  try {
    for await (const chunk of sseData(response)) {
      if (chunk.error) throw new Error(chunk.error.message ?? "the server failed");
      const delta = chunk.choices?.[0]?.delta?.content;
      if (delta) {
        reply.content += delta;
        view.show(reply.content);
      }
    }
  } catch (e) {
    e.partial = reply;
    throw e;
  }
  return reply;
}

async function streamAgent(view, signal) {
  const body = { messages: requestMessages(), tools: selectedTools(), session: sessionId(), ...sampling() };
  const response = await fetch("/v1/agent", {
    method: "POST", headers: headers(), body: JSON.stringify(body), signal,
  });
  if (!response.ok) throw new Error(await errorText(response));
  const reply = { role: "assistant", content: "", steps: [] };
  let step = null;
  let current = null; // the data of `step`
  try {
    for await (const event of sseData(response)) {
      if (event.type === "error") throw new Error(event.message);
      if (event.type === "text") {
        if (!step || current.name) {
          step = view.addStep();
          // after an Observation the prompt ends with "Thought:", so the model writes only what follows
          current = { thought: reply.steps.length ? THOUGHT : "" };
          reply.steps.push(current);
        }
        current.thought += current.thought === THOUGHT ? event.text.trimStart() : event.text;
        step.thought.textContent = current.thought;
      } else if (event.type === "tool_call") {
        if (!step || current.name) {
          step = view.addStep();
          current = { thought: "" };
          reply.steps.push(current);
        }
        // the model's "Action:" lines are shown as a structured block, not twice
        const cut = current.thought.lastIndexOf("Action:");
        if (cut >= 0) current.thought = current.thought.slice(0, cut).trimEnd();
        step.thought.textContent = current.thought;
        step.thought.hidden = !current.thought;
        Object.assign(current, { name: event.name, arguments: event.arguments });
        view.showAction(step, event.name, event.arguments);
      } else if (event.type === "tool_result") {
        Object.assign(current ?? {}, { output: event.text, images: event.images ?? [] });
        if (step) view.showObservation(step, event.text, event.images ?? []);
      } else if (event.type === "final") {
        if (event.reason === "max_steps") view.note("The agent used all its tool calls without a final answer.");
        reply.content = event.answer ?? "";
        if (current && !current.name) {
          // the last step's text is the answer itself: keep only the thought before it
          const cut = current.thought.indexOf("Final Answer:");
          current.thought = (cut >= 0 ? current.thought.slice(0, cut) : "").trim();
          step.thought.textContent = current.thought;
          if (!current.thought) {
            step.item.remove();
            reply.steps.pop();
          }
        }
        view.steps.hidden = reply.steps.length === 0;
        view.show(reply.content);
      }
    }
  } catch (e) {
    e.partial = reply;
    throw e;
  }
  if (!reply.steps.length) delete reply.steps;
  return reply;
}

async function reply() {
  const view = new MessageView("assistant");
  view.article.classList.add("streaming");
  state.controller = new AbortController();
  const agent = ui.useTools.checked;
  setBusy(true, agent ? "Working with tools…" : "Generating…");
  let message = null;
  let label = "";
  try {
    message = await (agent ? streamAgent : streamChat)(view, state.controller.signal);
  } catch (e) {
    if (e.name === "AbortError") {
      const partial = e.partial;
      message = partial && (partial.content || partial.steps?.length) ? partial : null;
      if (message && !message.steps?.length) delete message.steps;
      view.note("Stopped.");
      label = "Stopped.";
    } else {
      view.error(`Error: ${e.message}`);
      label = `Error: ${e.message}`;
    }
  } finally {
    state.controller = null;
  }
  if (message) {
    view.finish(message.content);
    state.messages.push(message);
    state.views.push(view);
    saveConversation();
  } else {
    view.article.classList.add("failed");
    state.failed = view; // shown until the next send, regenerate or clear
  }
  setBusy(false, label);
}

function dropFailed() {
  state.failed?.article.remove();
  state.failed = null;
}

async function send(event) {
  event.preventDefault();
  if (state.controller) return;
  if (!ui.settings.reportValidity()) {
    $("settings").open = true;
    return;
  }
  const text = ui.prompt.value;
  if (!text.trim()) return;
  dropFailed();
  ui.prompt.value = "";
  addMessage({ role: "user", content: text });
  saveConversation();
  await reply();
}

async function regenerate() {
  if (state.controller || state.messages.length === 0) return;
  if (!ui.settings.reportValidity()) return;
  dropFailed();
  if (state.messages.at(-1).role === "assistant") {
    state.messages.pop();
    state.views.pop().article.remove();
    saveConversation();
  }
  await reply();
}

function clear() {
  if (state.controller) return;
  dropFailed();
  for (const view of state.views) view.article.remove();
  state.messages = [];
  state.views = [];
  sessionStorage.removeItem(CONVERSATION_KEY);
  ui.empty.hidden = false;
  setBusy(false, "Conversation cleared.");
  const session = sessionStorage.getItem(SESSION_KEY);
  if (session) {
    // the next tool call starts a fresh interpreter; a failure here only leaves an idle session behind
    fetch(`/v1/agent/sessions/${encodeURIComponent(session)}`, { method: "DELETE", headers: headers() })
      .catch(() => {});
  }
  ui.prompt.focus();
}

async function loadModelName() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) {
      ui.modelName.textContent = response.status === 401 ? "(API key needed)" : "(unavailable)";
      return;
    }
    const body = await response.json();
    if (body.data?.length) state.model = body.data[0].id;
    ui.modelName.textContent = state.model;
  } catch {
    ui.modelName.textContent = "(server unreachable)";
  }
}

// --- Wiring ----------------------------------------------------------------------------------

loadSettings();
loadConversation();
setBusy(false);
loadModelName();

ui.composer.addEventListener("submit", send);
ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.composer.requestSubmit();
  }
});
ui.stop.addEventListener("click", () => state.controller?.abort());
ui.regenerate.addEventListener("click", regenerate);
ui.clear.addEventListener("click", clear);
ui.settings.addEventListener("input", saveSettings);
ui.settings.addEventListener("submit", (event) => event.preventDefault());
ui.apiKey.addEventListener("change", loadModelName);
