// An AudioWorklet (it runs on the audio thread, so a busy page drops no samples): each block of the
// microphone's first channel is copied to the page, which keeps them until Stop.
class Capture extends AudioWorkletProcessor {
  process(inputs) {
    const channel = inputs[0]?.[0];
    if (channel) this.port.postMessage(channel.slice());
    return true;
  }
}

registerProcessor("capture", Capture);
