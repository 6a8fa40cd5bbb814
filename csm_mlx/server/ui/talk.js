// The Talk view: a voice chat over /v1/realtime, in OpenAI Realtime events. The microphone is
// captured at 24 kHz with the browser's echo cancellation (the server listens while the answer
// plays) and sent as pcm16; the server detects turns, transcribes them and answers; the answer is
// played as it comes. Speaking over it stops playback at once, and the server is told how much of
// it was heard (conversation.item.truncate), so both its contexts keep only that.
import { ApiError } from "./api.js";
import { Player, fromFloat, toFloat } from "./audio.js";
import { microphoneError } from "./record.js";

const RATE = 24000;
const KEY_ITEM = "csm-mlx.api-key";

function encode(bytes) {
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

function decode(text) {
  const raw = atob(text);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  return bytes;
}

export class Talk {
  /** onLine(role, text, id) adds or updates a line of the transcript; onStatus(text); onError(ApiError);
   *  onStop() when the conversation ends (Stop, or the connection closing). */
  constructor({ onLine, onStatus, onError, onStop }) {
    Object.assign(this, { onLine, onStatus, onError, onStop });
    this.ws = null;
  }

  get running() {
    return this.ws !== null;
  }

  /** Called from the click on Start: browsers let audio start only from a user's gesture. */
  async start(voice, instructions) {
    if (!navigator.mediaDevices?.getUserMedia || !window.AudioWorkletNode) {
      throw new ApiError(0, "this browser offers no microphone to this page: open it as http://localhost:PORT " +
                            "on the server's machine or over https");
    }
    this.player = new Player();
    this.player.start();
    try {
      this.stream = await navigator.mediaDevices.getUserMedia({
        audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
      });
    } catch (e) {
      throw microphoneError(e);
    }
    this.context = new AudioContext({ sampleRate: RATE }); // the browser resamples the microphone to it
    this.answer = null; // {id, start, heard} of the answer playing
    await this.context.audioWorklet.addModule("/ui/capture.js");
    const capture = new AudioWorkletNode(this.context, "capture", { numberOfOutputs: 0 });
    capture.port.onmessage = ({ data }) => this.send({ type: "input_audio_buffer.append", audio: encode(fromFloat(data)) });
    this.context.createMediaStreamSource(this.stream).connect(capture);
    await this.context.resume();

    const key = localStorage.getItem(KEY_ITEM);
    const protocols = ["realtime", ...(key ? [`openai-insecure-api-key.${key}`] : [])];
    const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/realtime`;
    this.ws = new WebSocket(url, protocols);
    this.ws.onmessage = ({ data }) => this.handle(JSON.parse(data));
    this.ws.onclose = (e) => {
      if (this.ws && e.code !== 1000) this.onError(new ApiError(0, e.code === 1006 && !this.opened
        ? "the server refused the connection: check the API key, or that the server runs csm-mlx serve"
        : `the connection closed (${e.code}${e.reason ? ": " + e.reason : ""})`));
      this.stop();
    };
    this.ws.onopen = () => {
      this.opened = true;
      this.send({ type: "session.update", session: { voice, ...(instructions ? { instructions } : {}) } });
    };
  }

  send(event) {
    if (this.ws?.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(event));
  }

  handle(event) {
    switch (event.type) {
      case "session.updated":
        this.onStatus("Listening: speak, and pause when you are done.");
        break;
      case "input_audio_buffer.speech_started":
        this.interrupt();
        this.onStatus("Hearing you…");
        break;
      case "conversation.item.input_audio_transcription.completed":
        if (event.transcript) this.onLine("you", event.transcript, event.item_id);
        this.onStatus("Answering…");
        break;
      case "response.created":
        this.responding = true;
        break;
      case "response.audio_transcript.delta":
        this.lines = (this.lines ?? "") + event.delta;
        this.onLine("csm", this.lines, event.item_id);
        break;
      case "response.audio.delta":
        this.play(event.item_id, toFloat(decode(event.delta)));
        break;
      case "response.done":
        this.lines = "";
        this.responding = false;
        if (this.answer?.heard !== undefined) this.truncate();
        this.onStatus("Listening.");
        break;
      case "error":
        this.onError(new ApiError(0, event.error.message));
        break;
    }
  }

  play(id, samples) {
    if (this.answer?.id !== id) this.answer = { id, start: null };
    if (this.answer.heard !== undefined || !samples.length) return; // cut by a barge-in
    const { context, next } = this.player;
    this.answer.start ??= Math.max(next, context.currentTime + 0.05); // where Player schedules it
    this.player.play(samples, RATE);
  }

  /** The user speaks: stop the answer now; once the server is done with it, say how much was heard. */
  interrupt() {
    const { context, next, sources } = this.player;
    if (!this.answer || this.answer.heard !== undefined || !sources.size) return;
    this.answer.heard = Math.floor(Math.max(0, Math.min(context.currentTime, next) - this.answer.start) * 1000);
    this.player.stop();
    if (!this.responding) this.truncate(); // else when the server's response.done comes
  }

  truncate() {
    this.send({ type: "conversation.item.truncate", item_id: this.answer.id, content_index: 0,
                audio_end_ms: this.answer.heard });
    this.answer = null;
  }

  stop() {
    const ws = this.ws;
    this.ws = null;
    ws?.close(1000);
    this.player?.stop();
    this.player?.context?.close();
    this.player = null;
    this.stream?.getTracks().forEach((track) => track.stop());
    this.context?.close();
    this.context = null;
    this.onStatus("");
    this.onStop();
  }
}
