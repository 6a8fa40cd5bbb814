// A take from the microphone: PCM collected with Web Audio at the device's rate, written as a
// 16-bit WAV the server reads like any uploaded clip (it resamples).
import { ApiError } from "./api.js";
import { fromFloat, wav } from "./audio.js";

export const MIN_SECONDS = 1;
export const MAX_SECONDS = 60; // the server refuses longer voice clips

/** getUserMedia's refusals in words a person can act on. */
export function microphoneError(e) {
  const reasons = {
    NotAllowedError: "the page may not use the microphone: allow it in the browser's site settings and try again",
    SecurityError: "the page may not use the microphone: allow it in the browser's site settings and try again",
    NotFoundError: "no microphone was found: connect one, or upload a clip instead",
    OverconstrainedError: "no microphone was found: connect one, or upload a clip instead",
    NotReadableError: "the microphone cannot be read: another program may be using it",
  };
  return new ApiError(0, reasons[e.name] ?? `the microphone cannot be opened (${e.name}: ${e.message})`);
}

export class Recorder {
  /** Starts capturing; onTime(seconds) is called as samples arrive. Throws an ApiError saying why not. */
  async start(onTime) {
    if (!navigator.mediaDevices?.getUserMedia || !window.AudioWorkletNode) {
      // browsers offer the microphone to secure pages only: https, or http on localhost
      throw new ApiError(0, "this browser offers no microphone to this page: open it as http://localhost:PORT " +
                            "on the server's machine or over https, or upload a clip instead");
    }
    try {
      // the raw signal: a cloned voice should not carry the browser's noise gate and gain riding
      this.stream = await navigator.mediaDevices.getUserMedia({
        audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
      });
    } catch (e) {
      throw microphoneError(e);
    }
    this.context = new AudioContext();
    this.chunks = [];
    this.samples = 0;
    try {
      await this.context.audioWorklet.addModule("/ui/capture.js");
      const source = this.context.createMediaStreamSource(this.stream);
      const capture = new AudioWorkletNode(this.context, "capture", { numberOfOutputs: 0 });
      capture.port.onmessage = ({ data }) => {
        if (!this.context) return; // a block posted as Stop closed the context
        this.chunks.push(data);
        this.samples += data.length;
        onTime(this.samples / this.context.sampleRate);
      };
      source.connect(capture);
      await this.context.resume();
    } catch (e) {
      this.release();
      throw new ApiError(0, `the microphone's audio cannot be captured (${e.name}: ${e.message})`);
    }
  }

  release() {
    this.stream?.getTracks().forEach((track) => track.stop());
    this.context?.close();
    this.stream = this.context = null;
  }

  /** Ends the take: {blob (WAV), seconds}. */
  stop() {
    const rate = this.context.sampleRate;
    this.release();
    const samples = new Float32Array(this.samples);
    let at = 0;
    for (const chunk of this.chunks) {
      samples.set(chunk, at);
      at += chunk.length;
    }
    this.chunks = [];
    return { blob: wav(fromFloat(samples), rate), seconds: samples.length / rate };
  }
}
