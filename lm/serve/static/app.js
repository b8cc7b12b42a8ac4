// The chat page: keeps the conversation here and sends all of it to /v1/chat/completions with stream: true; the
// answer is read from the server-sent events as it is written, thinking (reasoning_content) apart from the answer.
"use strict";

const $ = (id) => document.getElementById(id);
let history = [];          // [{role, content}], what the next request sends
let controller = null;     // aborts the answer being streamed

function setStatus(text) { $("status").textContent = text || ""; }

async function loadModels() {
  const response = await fetch("/v1/models");
  const body = await response.json();
  for (const model of body.data) {
    const option = new Option(model.id, model.id, model.default, model.default);
    $("model").add(option);
  }
}

function addMessage(role) {
  const box = document.createElement("div");
  box.className = `message ${role}`;
  const label = document.createElement("div");
  label.className = "role";
  label.textContent = role;
  box.append(label);
  $("messages").append(box);
  return box;
}

function addUserMessage(text) {
  const box = addMessage("user");
  const body = document.createElement("div");
  body.textContent = text;
  box.append(body);
}

function addAssistantMessage() {
  const box = addMessage("assistant");
  const thinking = document.createElement("details");
  thinking.className = "thinking";
  thinking.hidden = true;
  const summary = document.createElement("summary");
  summary.textContent = "thinking";
  const thought = document.createElement("div");
  thinking.append(summary, thought);
  const answer = document.createElement("div");
  answer.className = "answer";
  const finish = document.createElement("div");
  finish.className = "finish";
  box.append(thinking, answer, finish);
  return { thinking, thought, answer, finish };
}

function scrollDown() { $("messages").scrollTop = $("messages").scrollHeight; }

// Each server-sent event is "data: <json>\n\n"; "data: [DONE]" ends the stream.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  while (true) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function settings() {
  const temperature = parseFloat($("temperature").value);
  const maxTokens = parseInt($("max-tokens").value, 10);
  return {
    model: $("model").value || undefined,
    temperature: Number.isFinite(temperature) ? temperature : undefined,
    max_tokens: Number.isFinite(maxTokens) ? maxTokens : undefined,
  };
}

function busy(on) {
  $("send").disabled = on;
  $("stop").hidden = !on;
}

// POST the conversation. drop_oldest_turns (this server's extension) lets the server drop the oldest turns when the
// conversation outgrows the model's context, as lm.chat does; the X-Dropped-Turns header says how many it dropped.
async function request(messages, signal) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ ...settings(), messages, stream: true, drop_oldest_turns: true }),
    signal,
  });
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    throw new Error(body.error ? body.error.message : `HTTP ${response.status}`);
  }
  const dropped = parseInt(response.headers.get("X-Dropped-Turns") || "0", 10);
  if (dropped) setStatus(`context full: dropped the oldest ${dropped} turn(s)`);
  return { response, messages: messages.slice(2 * dropped) };
}

async function send(text) {
  setStatus("");
  addUserMessage(text);
  const view = addAssistantMessage();
  scrollDown();
  let messages = history.concat([{ role: "user", content: text }]);
  let answer = "", finish = null;
  controller = new AbortController();
  busy(true);
  try {
    let response;
    ({ response, messages } = await request(messages, controller.signal));
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices[0];
      if (!choice) continue;
      const delta = choice.delta || {};
      if (delta.reasoning_content) {
        view.thinking.hidden = false;
        view.thought.textContent += delta.reasoning_content;
      }
      if (delta.content) {
        answer += delta.content;
        view.answer.textContent = answer;
      }
      if (choice.finish_reason) finish = choice.finish_reason;
      scrollDown();
    }
    view.finish.textContent = finish === "length" ? "stopped at max tokens" : "";
    history = messages.concat([{ role: "assistant", content: answer }]);
  } catch (error) {
    if (error.name === "AbortError") {
      view.finish.textContent = "stopped (not kept in the conversation)";
    } else {
      setStatus(error.message);
      view.finish.textContent = "failed";
    }
  } finally {
    controller = null;
    busy(false);
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value;
  if (!text.trim() || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  history = [];
  $("messages").replaceChildren();
  setStatus("");
  $("input").focus();
});

loadModels().catch((error) => setStatus(`could not list the models: ${error.message}`));
