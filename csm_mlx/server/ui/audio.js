// PCM from the server (24 kHz, 16-bit little-endian mono) as it streams in: played back to back
// with Web Audio, kept, and written as WAV.
import { ApiError, request } from "./api.js";

export const FRAME_SECONDS = 0.08; // one Mimi frame

/** The bytes of a PCM response as they arrive; a chunk may end in the middle of a sample. */
export class Pcm16 {
  constructor() {
    this.chunks = [];
    this.length = 0;
    this.odd = null;
  }

  /** The chunk's whole samples as floats. */
  push(chunk) {
    if (this.odd !== null) {
      const joined = new Uint8Array(chunk.length + 1);
      joined[0] = this.odd;
      joined.set(chunk, 1);
      chunk = joined;
      this.odd = null;
    }
    const whole = chunk.length & ~1;
    if (whole < chunk.length) this.odd = chunk[whole];
    const bytes = chunk.slice(0, whole);
    this.chunks.push(bytes);
    this.length += whole;
    return toFloat(bytes);
  }

  get samples() {
    return this.length / 2;
  }

  bytes() {
    return concat(this.chunks);
  }
}

export function concat(arrays) {
  const out = new Uint8Array(arrays.reduce((n, a) => n + a.length, 0));
  let at = 0;
  for (const a of arrays) {
    out.set(a, at);
    at += a.length;
  }
  return out;
}

export function toFloat(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out = new Float32Array(bytes.byteLength / 2);
  for (let i = 0; i < out.length; i++) out[i] = view.getInt16(2 * i, true) / 32768;
  return out;
}

/** Floats in [-1, 1] as PCM16 little-endian bytes, clipped. */
export function fromFloat(samples) {
  const out = new DataView(new ArrayBuffer(samples.length * 2));
  for (let i = 0; i < samples.length; i++) {
    out.setInt16(2 * i, Math.round(Math.max(-1, Math.min(1, samples[i])) * 32767), true);
  }
  return new Uint8Array(out.buffer);
}

/** A WAV file (PCM16 mono) of the bytes. */
export function wav(pcm, rate) {
  const header = new DataView(new ArrayBuffer(44));
  const text = (at, s) => [...s].forEach((c, i) => header.setUint8(at + i, c.charCodeAt(0)));
  text(0, "RIFF");
  header.setUint32(4, 36 + pcm.length, true);
  text(8, "WAVEfmt ");
  header.setUint32(16, 16, true);
  header.setUint16(20, 1, true); // PCM
  header.setUint16(22, 1, true); // mono
  header.setUint32(24, rate, true);
  header.setUint32(28, rate * 2, true);
  header.setUint16(32, 2, true);
  header.setUint16(34, 16, true);
  text(36, "data");
  header.setUint32(40, pcm.length, true);
  return new Blob([header, pcm], { type: "audio/wav" });
}

export async function base64(blob) {
  const bytes = new Uint8Array(await blob.arrayBuffer());
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

/** Web Audio playback of chunks as they come, each starting where the one before ends. */
export class Player {
  constructor() {
    this.context = null;
    this.next = 0;
    this.sources = new Set();
  }

  /** Called from the click that starts speech: browsers let audio start only from a user's gesture. */
  start() {
    this.context ??= new AudioContext();
    this.context.resume();
    this.next = 0;
  }

  play(samples, rate) {
    const context = this.context;
    if (!context || !samples.length) return;
    const buffer = context.createBuffer(1, samples.length, rate);
    buffer.copyToChannel(samples, 0);
    const source = context.createBufferSource();
    source.buffer = buffer;
    source.connect(context.destination);
    // A chunk that arrives after the one before it finished (generation slower than real time)
    // starts a moment from now instead of in the past, which Web Audio would cut.
    this.next = Math.max(this.next, context.currentTime + 0.05);
    source.start(this.next);
    this.next += buffer.duration;
    this.sources.add(source);
    source.onended = () => this.sources.delete(source);
  }

  pause(seconds) {
    if (this.next) this.next += seconds;
  }

  stop() {
    for (const source of this.sources) source.stop();
    this.sources.clear();
    this.next = 0;
  }
}

/** POST /v1/audio/speech as PCM, fed to the player chunk by chunk: {pcm, rate}. */
export async function streamSpeech(body, { signal, player, onProgress }) {
  const started = performance.now();
  const response = await request("/v1/audio/speech", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ ...body, response_format: "pcm" }), signal,
  });
  const rate = Number(response.headers.get("X-Sample-Rate")) || 24000;
  const pcm = new Pcm16();
  const reader = response.body.getReader();
  for (;;) {
    let part;
    try {
      part = await reader.read();
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ApiError(0, `the stream broke off after ${(pcm.samples / rate).toFixed(2)} s of audio: ` +
                            "the server failed while generating (its log says why)");
    }
    if (part.done) break;
    player?.play(pcm.push(part.value), rate);
    onProgress?.(pcm.samples / rate, (performance.now() - started) / 1000);
  }
  return { pcm: pcm.bytes(), rate };
}

/** A line for the progress of a response: frames, seconds of audio, real-time factor. */
export function progressLine(seconds, elapsed, speed = 1) {
  const frames = Math.round((seconds * speed) / FRAME_SECONDS);
  const rtf = seconds > 0 ? (elapsed / seconds).toFixed(2) : "–";
  return `${frames} frames · ${seconds.toFixed(2)} s of audio in ${elapsed.toFixed(1)} s · real-time factor ${rtf}`;
}

export function save(blob, filename) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = filename;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
}
