// Dialogue: turns (speaker, voice, text) spoken one after another, each request carrying the
// turns before it (text and audio) as context, so that the whole is one conversation.
import { ApiError, showError } from "./api.js";
import { base64, concat, progressLine, save, streamSpeech, wav } from "./audio.js";
import { addEntry } from "./store.js";

const PAUSE_SECONDS = 0.3; // between turns, as `csm-mlx dialogue --pause-ms` has it
const $ = (id) => document.getElementById(id);

let turns = [
  { speaker: 0, voice: "conversational_a", text: "Hey, how are you doing?" },
  { speaker: 1, voice: "conversational_b", text: "Pretty good, pretty good. How about you?" },
];

/** The script as `csm-mlx dialogue` reads it: [{speaker, text}], with each turn's voice beside
 * (the command ignores it; its --voice flags give a voice per speaker). */
function checkScript(data) {
  if (!Array.isArray(data) || !data.length) throw new Error("a script is a JSON list of turns {speaker, text}");
  return data.map((turn, n) => {
    const where = `turn ${n + 1}`;
    if (typeof turn !== "object" || turn === null || typeof turn.text !== "string" || !turn.text.trim()) {
      throw new Error(`${where} needs a speaker and a non-empty text`);
    }
    if (!Number.isInteger(turn.speaker) || turn.speaker < 0) throw new Error(`${where}: speaker must be a whole number >= 0`);
    if (turn.audio) throw new Error(`${where} names an audio file: this page speaks every turn; remove "audio"`);
    return { speaker: turn.speaker, text: turn.text, voice: typeof turn.voice === "string" ? turn.voice : "" };
  });
}

export function setupDialogue({ player, settings, validSettings, fillPickers, voiceName }) {
  const list = $("turns"), progress = $("dialogue-progress"), error = $("dialogue-error");
  const go = $("dialogue-go"), stop = $("dialogue-stop"), download = $("dialogue-download");
  let controller = null;
  let spoken = [];

  function render() {
    list.replaceChildren();
    turns.forEach((turn, n) => {
      const item = document.createElement("li");
      const grid = document.createElement("div");
      grid.className = "grid";
      const speaker = Object.assign(document.createElement("input"), { type: "number", min: 0, step: 1, value: turn.speaker, required: true });
      speaker.addEventListener("input", () => { turn.speaker = Number(speaker.value); });
      const voice = Object.assign(document.createElement("select"), { className: "voice-select" });
      voice.dataset.want = turn.voice;
      voice.addEventListener("change", () => { turn.voice = voice.value; });
      const remove = Object.assign(document.createElement("button"), { type: "button", textContent: "Remove" });
      remove.setAttribute("aria-label", `Remove turn ${n + 1}`);
      remove.addEventListener("click", () => { turns.splice(n, 1); render(); });
      grid.append(labelled(`Speaker`, speaker), labelled(`Voice`, voice), remove);
      const text = Object.assign(document.createElement("textarea"), { rows: 2, value: turn.text, required: true });
      text.addEventListener("input", () => { turn.text = text.value; });
      const state = Object.assign(document.createElement("span"), { className: "state" });
      item.append(grid, labelled(`Turn ${n + 1} text`, text), state);
      list.append(item);
    });
    fillPickers();
  }

  function labelled(text, control) {
    const label = document.createElement("label");
    label.append(text, control);
    return label;
  }

  $("turn-add").addEventListener("click", () => {
    const previous = turns.at(-1);
    turns.push({ speaker: previous ? (previous.speaker === 0 ? 1 : 0) : 0, voice: turns.at(-2)?.voice ?? "", text: "" });
    render();
    list.lastElementChild.querySelector("textarea").focus();
  });

  go.addEventListener("click", async () => {
    const controls = [...list.querySelectorAll("input, textarea")];
    if (!turns.length || !controls.every((c) => c.reportValidity()) || !validSettings()) return;
    // what the pickers show: the voice list may have arrived (or changed) after a turn was made
    list.querySelectorAll(".voice-select").forEach((select, n) => { turns[n].voice = select.value; });
    const base = settings();
    controller = new AbortController();
    go.disabled = true;
    stop.disabled = false;
    download.disabled = true;
    showError(error, null);
    player.start();
    spoken = [];
    const states = list.querySelectorAll(".state");
    try {
      for (const [n, turn] of turns.entries()) {
        const context = [];
        for (const [m, done] of spoken.entries()) {
          context.push({ speaker: turns[m].speaker, text: turns[m].text, audio: await base64(wav(done.pcm, done.rate)) });
        }
        // speed stretches the audio that becomes the next turn's context: a dialogue runs at 1
        const body = { model: "tts-1", input: turn.text, voice: turn.voice, speaker: turn.speaker, ...base,
                       speed: 1, seed: base.seed + n, context };
        states[n].textContent = "Generating…";
        const result = await streamSpeech(body, {
          signal: controller.signal, player,
          onProgress: (seconds, elapsed) => {
            progress.textContent = `Turn ${n + 1} of ${turns.length}: ${progressLine(seconds, elapsed)}`;
          },
        });
        spoken.push(result);
        states[n].textContent = `${(result.pcm.length / 2 / result.rate).toFixed(2)} s`;
        player.pause(PAUSE_SECONDS);
      }
      window.csmDialogue = spoken; // read by the page's tests
      progress.textContent = `Done: ${turns.length} turns, seed ${base.seed} for the first.`;
      download.disabled = false;
      const audio = joined();
      await addEntry({ time: Date.now(), text: turns.map((t) => `[${t.speaker}] ${t.text}`).join(" "),
                       voice: [...new Set(turns.map((t) => voiceName(t.voice)))].join(", "), settings: { ...base, speed: 1 },
                       seconds: (audio.size - 44) / 2 / spoken[0].rate, audio })
        .catch((e) => showError(error, new ApiError(0, `not kept in the history: ${e.message}`)));
    } catch (e) {
      if (e.name === "AbortError") progress.textContent = `Stopped after ${spoken.length} turns.`;
      else showError(error, e);
    } finally {
      go.disabled = false;
      stop.disabled = true;
      controller = null;
    }
  });

  function joined() {
    const rate = spoken[0].rate;
    const pause = new Uint8Array(Math.round(PAUSE_SECONDS * rate) * 2);
    return wav(concat(spoken.flatMap((turn, n) => (n ? [pause, turn.pcm] : [turn.pcm]))), rate);
  }

  stop.addEventListener("click", () => {
    controller?.abort();
    player.stop();
  });
  download.addEventListener("click", () => save(joined(), "dialogue.wav"));

  $("dialogue-save").addEventListener("click", () => {
    const script = turns.map(({ speaker, text, voice }) => ({ speaker, text, voice }));
    save(new Blob([JSON.stringify(script, null, 2) + "\n"], { type: "application/json" }), "dialogue.json");
  });

  $("dialogue-load").addEventListener("change", async (event) => {
    const file = event.target.files[0];
    event.target.value = "";
    if (!file) return;
    try {
      turns = checkScript(JSON.parse(await file.text()));
      showError(error, null);
      render();
    } catch (e) {
      showError(error, new ApiError(0, `${file.name}: ${e.message}`));
    }
  });

  render();
}
