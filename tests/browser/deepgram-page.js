// The browser side of tests/browser/deepgram.js: what a web app using Deepgram's JS SDK
// (@deepgram/sdk 5, its browser bundle, unmodified) does with a microphone. It records with
// MediaRecorder (WebM/Opus, no `encoding` parameter: the server detects the container), sends
// each chunk with sendMedia, Finalize part-way, CloseStream after the recording, and reports
// everything the SDK delivered. The browser build passes the key as the subprotocol pair
// `token, <key>` (browsers cannot set an Authorization header on a WebSocket).
'use strict';

window.runDeepgram = async function runDeepgram(cfg) {
  const t0 = performance.now();
  const at = () => Math.round(performance.now() - t0);
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const report = { opened: false, protocol: null, messages: [], errors: [], closes: [], sent: { chunks: 0, bytes: 0 } };

  const mic = await navigator.mediaDevices.getUserMedia({ audio: true });
  const dg = new Deepgram.DeepgramClient({ apiKey: cfg.key, baseUrl: cfg.url });
  const sock = await dg.listen.v1.connect({ model: cfg.model, interim_results: 'false', smart_format: 'true' });
  let onClose;
  const closed = new Promise((r) => { onClose = r; });
  sock.on('message', (m) => report.messages.push({ at: at(), ...(typeof m === 'object' ? m : { raw: String(m) }) }));
  sock.on('error', (e) => report.errors.push({ at: at(), message: String((e && e.message) || e) }));
  sock.on('close', (e) => { report.closes.push({ at: at(), code: e && e.code }); onClose(e && e.code); });
  sock.connect();
  try {
    await sock.waitForOpen();
  } catch (e) {
    // A refused handshake: the SDK would retry; an app gives up and closes.
    report.errors.push({ at: at(), message: 'waitForOpen rejected' });
    sock.close();
    mic.getTracks().forEach((t) => t.stop());
    return report;
  }
  report.opened = true;
  report.protocol = sock.socket.protocol;

  const recorder = new MediaRecorder(mic, { mimeType: 'audio/webm;codecs=opus' });
  report.mime = recorder.mimeType;
  recorder.ondataavailable = (e) => {
    if (!e.data.size) return;
    sock.sendMedia(e.data);
    report.sent.chunks += 1;
    report.sent.bytes += e.data.size;
  };
  const stopped = new Promise((r) => { recorder.onstop = r; });
  recorder.start(cfg.timeslice);
  await sleep(cfg.finalizeAtMs);
  sock.sendFinalize({ type: 'Finalize' });
  report.finalizedAt = at();
  await sleep(cfg.recordMs - cfg.finalizeAtMs);
  recorder.stop();
  await stopped; // the last dataavailable comes before stop
  mic.getTracks().forEach((t) => t.stop());
  sock.sendCloseStream({ type: 'CloseStream' });
  report.closeStreamAt = at();
  const code = await Promise.race([closed, sleep(cfg.closeTimeoutMs).then(() => 'timeout')]);
  report.closeCode = code;
  if (code === 'timeout') sock.close();
  return report;
};
