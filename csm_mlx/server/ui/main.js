// The page: a view per hash (#speak, #talk, #voices, #dialogue, #history, #verify), each calling the API.
import { ApiError, getJson, request, showError } from "./api.js";
import { Player, progressLine, save, streamSpeech, wav } from "./audio.js";
import { addEntry, allEntries, removeEntry } from "./store.js";
import { setupDialogue } from "./dialogue.js";
import { MAX_SECONDS, MIN_SECONDS, Recorder } from "./record.js";
import { Talk } from "./talk.js";

const $ = (id) => document.getElementById(id);
const VIEWS = ["speak", "talk", "voices", "dialogue", "history", "verify"];
const player = new Player();

function route() {
  const view = VIEWS.includes(location.hash.slice(1)) ? location.hash.slice(1) : "speak";
  for (const name of VIEWS) $(name).hidden = name !== view;
  for (const link of document.querySelectorAll("nav a")) {
    if (link.hash === `#${view}`) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (view === "history") renderHistory();
}

// ---- voices: every voice picker on the page shows the server's list ----

let voices = [];

function fillPicker(select) {
  const chosen = select.value || select.dataset.want || "conversational_a";
  select.replaceChildren();
  const groups = [["Your voices", "custom"], ["Presets", "preset"], ["OpenAI names", "alias"]];
  for (const [label, type] of groups) {
    const group = document.createElement("optgroup");
    group.label = label;
    for (const voice of voices.filter((v) => v.type === type)) {
      const text = type === "alias" ? `${voice.name} (${voice.preset})` : voice.name;
      group.append(new Option(text, voice.id));
    }
    if (group.children.length) select.append(group);
  }
  if (voices.some((v) => v.id === chosen)) select.value = chosen;
}

function fillPickers() {
  document.querySelectorAll(".voice-select").forEach(fillPicker);
}

function voiceName(id) {
  return voices.find((v) => v.id === id)?.name ?? id;
}

async function loadVoices() {
  try {
    voices = (await getJson("/v1/audio/voices")).voices;
    showError($("voice-error"), null);
  } catch (e) {
    showError($("voice-error"), e);
    showError($("speak-error"), e);
    return;
  }
  fillPickers();
  renderVoiceList($("voice-list"), voices.filter((v) => v.type === "custom"), true);
  renderVoiceList($("preset-list"), voices.filter((v) => v.type === "preset"), false);
}

function renderVoiceList(list, shown, deletable) {
  list.replaceChildren();
  if (!shown.length) {
    list.append(Object.assign(document.createElement("li"), { textContent: "None yet." }));
    return;
  }
  for (const voice of shown) {
    const item = document.createElement("li");
    const what = document.createElement("div");
    what.className = "what";
    what.append(voice.name);
    if (voice.transcript) {
      const meta = Object.assign(document.createElement("span"), { className: "meta", textContent: `“${voice.transcript}”` });
      what.append(meta);
    }
    const listen = button(`Listen`, `Listen to ${voice.name}`, async () => {
      try {
        const blob = await (await request(`/v1/audio/voices/${encodeURIComponent(voice.id)}/audio`)).blob();
        let audio = item.querySelector("audio");
        if (!audio) {
          audio = Object.assign(document.createElement("audio"), { controls: true });
          audio.setAttribute("aria-label", `${voice.name}'s clip`);
          item.append(audio);
        }
        audio.src = URL.createObjectURL(blob);
        audio.play().catch(() => {});
        showError($("voice-error"), null);
      } catch (e) {
        showError($("voice-error"), e);
      }
    });
    item.append(what, listen);
    if (deletable) {
      item.append(button("Rename", `Rename ${voice.name}`, async () => {
        const name = prompt(`A new name for the voice “${voice.name}”:`, voice.name);
        if (name === null || name === voice.name) return;
        try {
          await request(`/v1/audio/voices/${encodeURIComponent(voice.id)}`, {
            method: "PATCH", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ name }),
          });
          showError($("voice-error"), null);
          await loadVoices();
        } catch (e) {
          showError($("voice-error"), e);
        }
      }));
      item.append(button("Delete", `Delete ${voice.name}`, async () => {
        if (!confirm(`Delete the voice “${voice.name}” from the server?`)) return;
        try {
          await request(`/v1/audio/voices/${encodeURIComponent(voice.id)}`, { method: "DELETE" });
          await loadVoices();
        } catch (e) {
          showError($("voice-error"), e);
        }
      }));
    }
    list.append(item);
  }
}

function button(text, label, onClick) {
  const b = Object.assign(document.createElement("button"), { type: "button", textContent: text });
  b.setAttribute("aria-label", label);
  b.addEventListener("click", onClick);
  return b;
}

/** Record and Stop in the voice form; the take, once there, is what Add voice sends. */
function setupRecorder(form) {
  const start = $("record-start"), stop = $("record-stop"), time = $("record-time"), player = $("record-take");
  const file = form.elements.audio_sample;
  const recorder = new Recorder();
  const state = { take: null };

  function setTake(take) {
    if (player.src) URL.revokeObjectURL(player.src);
    state.take = take;
    player.hidden = !take;
    if (take) player.src = URL.createObjectURL(take.blob);
    else player.removeAttribute("src");
    file.required = !take;
  }

  function finish() {
    stop.disabled = true;
    start.disabled = false;
    const take = recorder.stop();
    time.textContent = `${take.seconds.toFixed(1)} s`;
    if (take.seconds < MIN_SECONDS) {
      return showError($("voice-error"), new ApiError(0, `the take is ${take.seconds.toFixed(1)} s long: record at ` +
                                                          `least ${MIN_SECONDS} s (5-20 s of clear speech works best)`));
    }
    window.csmTake = take; // read by the page's tests
    setTake(take);
  }

  start.addEventListener("click", async () => {
    start.disabled = true;
    showError($("voice-error"), null);
    setTake(null);
    time.textContent = "0.0 s";
    try {
      await recorder.start((seconds) => {
        time.textContent = `${seconds.toFixed(1)} s`;
        if (seconds >= MAX_SECONDS && !stop.disabled) finish();
      });
    } catch (e) {
      start.disabled = false;
      return showError($("voice-error"), e);
    }
    file.value = ""; // the take replaces a chosen file
    stop.disabled = false;
    stop.focus();
  });
  stop.addEventListener("click", finish);
  file.addEventListener("change", () => file.files.length && setTake(null));
  form.addEventListener("reset", () => {
    setTake(null);
    time.textContent = "0.0 s";
  });
  return state;
}

function setupVoiceForm() {
  const form = $("voice-form");
  const recording = setupRecorder(form);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!form.reportValidity()) return;
    const status = $("voice-status");
    status.textContent = "Encoding the clip…";
    showError($("voice-error"), null);
    const body = new FormData(form);
    if (recording.take) body.set("audio_sample", recording.take.blob, "recording.wav");
    try {
      const voice = await getJson("/v1/audio/voices", { method: "POST", body });
      status.textContent = `Added ${voice.name} (${voice.id}).`;
      form.reset();
      $("speak-form").elements.voice.dataset.want = voice.id;
      $("speak-form").elements.voice.value = "";
      await loadVoices();
    } catch (e) {
      status.textContent = "";
      showError($("voice-error"), e);
    }
  });
}

// ---- speak ----

/** The sampling settings of the Speak form, as request fields; a blank seed is drawn here, so that
 * a download in another format (a second request) is the same audio. */
function settings() {
  const f = $("speak-form").elements;
  const number = (input) => (input.value.trim() === "" ? null : Number(input.value));
  const seconds = number(f.max_seconds);
  return {
    temperature: number(f.temperature), top_k: number(f.top_k),
    seed: number(f.seed) ?? Math.floor(Math.random() * 2 ** 31),
    max_audio_length_ms: seconds === null ? null : Math.round(seconds * 1000), speed: number(f.speed) ?? 1,
  };
}

function validSettings() {
  return [...$("settings").querySelectorAll("input")].every((input) => input.reportValidity());
}

function setupSpeak() {
  const form = $("speak-form");
  const go = $("speak-go"), stop = $("speak-stop"), download = $("speak-download"), progress = $("speak-progress");
  let controller = null;
  let last = null;

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!form.reportValidity()) return;
    const f = form.elements;
    const body = { model: "tts-1", input: f.input.value, voice: f.voice.value, speaker: Number(f.speaker.value || 0),
                   ...settings() };
    controller = new AbortController();
    go.disabled = true;
    stop.disabled = false;
    showError($("speak-error"), null);
    progress.textContent = `Waiting for the first audio (seed ${body.seed})…`;
    player.start();
    let heard = [0, 0];
    try {
      const { pcm, rate } = await streamSpeech(body, {
        signal: controller.signal, player,
        onProgress: (seconds, elapsed) => {
          heard = [seconds, elapsed];
          progress.textContent = progressLine(seconds, elapsed, body.speed);
        },
      });
      last = { body, pcm, rate };
      window.csmLast = last; // read by the page's tests
      download.disabled = false;
      progress.textContent = `Done: ${progressLine(...heard, body.speed)} · seed ${body.seed}`;
      await addEntry({ time: Date.now(), text: body.input, voice: voiceName(body.voice), settings: body,
                       seconds: pcm.length / 2 / rate, audio: wav(pcm, rate) })
        .catch((e) => showError($("speak-error"), new ApiError(0, `not kept in the history: ${e.message}`)));
    } catch (e) {
      if (e.name === "AbortError") progress.textContent = `Stopped after ${heard[0].toFixed(2)} s of audio.`;
      else {
        progress.textContent = "";
        showError($("speak-error"), e);
      }
    } finally {
      go.disabled = false;
      stop.disabled = true;
      controller = null;
    }
  });

  stop.addEventListener("click", () => {
    controller?.abort(); // the server frees the row when the connection closes
    player.stop();
  });

  download.addEventListener("click", async () => {
    if (!last) return;
    const format = $("speak-format").value;
    if (format === "wav") return save(wav(last.pcm, last.rate), "speech.wav");
    // The same request (its seed included) in the other format: the same audio, encoded by the server.
    download.disabled = true;
    try {
      const response = await request("/v1/audio/speech", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ ...last.body, response_format: format }),
      });
      save(await response.blob(), `speech.${format}`);
    } catch (e) {
      showError($("speak-error"), e);
    } finally {
      download.disabled = false;
    }
  });
}

// ---- history ----

let historyUrls = [];

async function renderHistory() {
  const list = $("history-list");
  let entries;
  try {
    entries = await allEntries();
    showError($("history-error"), null);
  } catch (e) {
    return showError($("history-error"), new ApiError(0, `this browser's storage cannot be read (${e.message})`));
  }
  historyUrls.forEach(URL.revokeObjectURL);
  historyUrls = [];
  list.replaceChildren();
  if (!entries.length) {
    list.append(Object.assign(document.createElement("li"), { textContent: "Nothing generated yet." }));
    return;
  }
  for (const entry of entries.reverse()) {
    const item = document.createElement("li");
    const what = document.createElement("div");
    what.className = "what";
    const s = entry.settings;
    const meta = `${entry.voice} · ${entry.seconds.toFixed(2)} s · temperature ${s.temperature}, top-k ${s.top_k}, ` +
                 `seed ${s.seed}, speed ${s.speed} · ${new Date(entry.time).toLocaleString()}`;
    what.append(entry.text, Object.assign(document.createElement("span"), { className: "meta", textContent: meta }));
    const url = URL.createObjectURL(entry.audio);
    historyUrls.push(url);
    const audio = Object.assign(document.createElement("audio"), { controls: true, preload: "none", src: url });
    audio.setAttribute("aria-label", `Play: ${entry.text.slice(0, 60)}`);
    const link = Object.assign(document.createElement("a"), { href: url, download: `csm-${entry.id}.wav`,
                                                              textContent: "Download" });
    const remove = button("Remove", `Remove “${entry.text.slice(0, 60)}” from the history`, async () => {
      await removeEntry(entry.id);
      renderHistory();
    });
    item.append(what, audio, link, remove);
    list.append(item);
  }
}

// ---- verify ----

function setupVerify() {
  const drop = $("drop"), input = $("verify-file"), result = $("verify-result");
  async function check(file) {
    result.textContent = `Checking ${file.name}…`;
    result.className = "result";
    showError($("verify-error"), null);
    const form = new FormData();
    form.append("file", file);
    try {
      const answer = await getJson("/v1/audio/verify", { method: "POST", body: form });
      window.csmVerify = answer; // read by the page's tests
      const found = answer.key ? ` (decoded key ${answer.key.join(",")})` : "";
      result.textContent = answer.watermarked
        ? `${file.name} carries this server's watermark (key ${answer.key.join(",")}, confidence ${answer.confidence.toFixed(2)}).`
        : `${file.name} does not carry this server's watermark (key ${answer.expected_key.join(",")})${found}.`;
      result.classList.toggle("yes", answer.watermarked);
    } catch (e) {
      result.textContent = "";
      showError($("verify-error"), e);
    }
  }
  input.addEventListener("change", () => input.files[0] && check(input.files[0]));
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) check(file);
  });
}

// ---- talk ----

function setupTalk() {
  const start = $("talk-start"), stop = $("talk-stop"), lines = $("talk-lines"), status = $("talk-status");
  const talk = new Talk({
    onLine(role, text, id) {
      let line = lines.querySelector(`[data-id="${CSS.escape(id)}"]`);
      if (!line) {
        line = Object.assign(document.createElement("li"), { className: role });
        line.dataset.id = id;
        line.append(Object.assign(document.createElement("strong"), { textContent: role === "you" ? "You: " : "CSM: " }),
                    document.createElement("span"));
        lines.append(line);
      }
      line.lastChild.textContent = text;
    },
    onStatus(text) { status.textContent = text; },
    onError(e) { showError($("talk-error"), e); },
    onStop() { running(false); },
  });
  function running(on) {
    start.disabled = on;
    stop.disabled = !on;
  }
  start.addEventListener("click", async () => {
    showError($("talk-error"), null);
    running(true);
    try {
      await talk.start($("talk-voice").value, $("talk-instructions").value.trim());
    } catch (e) {
      talk.stop();
      showError($("talk-error"), e);
    }
  });
  stop.addEventListener("click", () => talk.stop());
}

window.addEventListener("hashchange", route);
route();
setupSpeak();
setupVoiceForm();
setupVerify();
setupTalk();
setupDialogue({ player, settings, validSettings, fillPickers, voiceName });
loadVoices();
