// The arena's rating page: one instruction, two anonymous answers, a verdict, an optional reason.
// Every text from the server (answers, instructions, names) is shown with textContent, never as HTML.

const RATER_KEY = "qwenkit.arena.rater";
const DRAFT_KEY = "qwenkit.arena.draft";
const KEYS = { "1": "left", ArrowLeft: "left", "2": "right", ArrowRight: "right",
               "3": "tie", t: "tie", T: "tie", "4": "both_bad", b: "both_bad", B: "both_bad" };

const $ = (id) => document.getElementById(id);
let rater = localStorage.getItem(RATER_KEY) || "";
let current = null;  // the comparison shown: {id, ...}
let verdict = null;
let busy = false;

async function post(path, body) {
  const response = await fetch(path, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
  return data;
}

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

function showProgress(progress) {
  $("progress").textContent = progress ? `${progress.rated} of ${progress.total} rated` : "";
}

function saveDraft() {
  if (current) sessionStorage.setItem(DRAFT_KEY, JSON.stringify({ id: current.id, verdict, reason: $("reason").value }));
}

function choose(value) {
  verdict = value;
  for (const button of document.querySelectorAll(".verdict")) {
    button.setAttribute("aria-pressed", String(button.dataset.verdict === value));
  }
  $("left-card").classList.toggle("chosen", value === "left");
  $("right-card").classList.toggle("chosen", value === "right");
  $("submit").disabled = value === null || busy;
  saveDraft();
}

function showRaterForm() {
  $("rater-form").hidden = false;
  $("comparison").hidden = $("done").hidden = $("who").hidden = true;
  $("rater").value = rater;
  $("rater").focus();
}

function render(item) {
  current = item;
  $("comparison").hidden = false;
  $("category").textContent = item.category || "";
  const context = $("context");
  context.replaceChildren(...item.context.map((m) => {
    const turn = document.createElement("div");
    turn.className = `turn ${m.role}`;
    turn.textContent = `${m.role}: ${m.content}`;
    return turn;
  }));
  $("instruction").textContent = item.instruction;
  $("left").textContent = item.left;
  $("right").textContent = item.right;
  const draft = JSON.parse(sessionStorage.getItem(DRAFT_KEY) || "null");
  const same = draft && draft.id === item.id;
  $("reason").value = same ? draft.reason : "";
  choose(same ? draft.verdict : null);
  if (document.activeElement === $("reason")) $("reason").blur();  // the keys rate the new comparison
  $("comparison").scrollIntoView({ block: "start" });
}

async function next() {
  busy = true;
  try {
    const item = await post("/api/next", { rater });
    showError("");
    showProgress(item.progress);
    if (item.done) {
      current = null;
      $("comparison").hidden = true;
      $("done").hidden = false;
    } else {
      $("done").hidden = true;
      render(item);
    }
  } catch (e) {
    showError(e.message);
  } finally {
    busy = false;
    $("submit").disabled = verdict === null;
  }
}

async function submit() {
  if (!current || verdict === null || busy) return;
  busy = true;
  $("submit").disabled = true;
  try {
    await post("/api/rate", { rater, id: current.id, verdict, reason: $("reason").value });
    sessionStorage.removeItem(DRAFT_KEY);
    verdict = null;
  } catch (e) {
    busy = false;
    $("submit").disabled = false;
    showError(e.message);
    if (!e.message.includes("already rated")) return;
  }
  await next();
}

function start(name) {
  rater = name.trim();
  localStorage.setItem(RATER_KEY, rater);
  $("rater-name").textContent = rater;
  $("who").hidden = false;
  $("rater-form").hidden = true;
  if (document.activeElement instanceof HTMLElement) document.activeElement.blur();  // keys rate now
  next();
}

$("rater-form").addEventListener("submit", (event) => {
  event.preventDefault();
  if ($("rater").value.trim()) start($("rater").value);
});
$("switch-rater").addEventListener("click", showRaterForm);
$("rating-form").addEventListener("submit", (event) => { event.preventDefault(); submit(); });
$("reason").addEventListener("input", saveDraft);
for (const button of document.querySelectorAll(".verdict")) {
  button.addEventListener("click", () => choose(button.dataset.verdict));
}

document.addEventListener("keydown", (event) => {
  if ($("comparison").hidden || event.altKey || event.metaKey) return;
  const typing = event.target instanceof HTMLTextAreaElement || event.target instanceof HTMLInputElement;
  if (event.key === "Enter" && (!typing || event.ctrlKey)) {
    event.preventDefault();
    submit();
  } else if (!typing && !event.ctrlKey && KEYS[event.key]) {
    event.preventDefault();
    choose(KEYS[event.key]);
  }
});

fetch("/api/info").then((r) => r.json()).then((info) => {
  $("title").textContent = info.title;
  document.title = info.title;
}).catch(() => {});

if (rater) start(rater); else showRaterForm();
