// Streams a 16 kHz mono WAV to voxgate through Deepgram's official JS SDK (@deepgram/sdk 5.x, in
// Node), unmodified but for its base URL, and prints one JSON report on stdout: every message the
// SDK delivered. Sends Finalize after FINALIZE_AT seconds of audio and CloseStream at the end.
//
//   DG_JS=target/tools/dg-js node sdk_client.mjs ws://127.0.0.1:PORT KEY file.wav FINALIZE_AT
// (DG_JS: where `scripts/deps dg` installed the SDK.)
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { resolve } from "node:path";

const { DeepgramClient } = createRequire(resolve(process.env.DG_JS, "package.json"))("@deepgram/sdk");

const [url, key, path, finalizeAt] = process.argv.slice(2);
const wav = readFileSync(path);
const pcm = wav.subarray(44); // canonical 44-byte header (16 kHz mono s16le, checked by the test)
const dg = new DeepgramClient({ apiKey: key, baseUrl: url });
const got = [];
const sock = await dg.listen.v1.connect({
  model: "nova-3", encoding: "linear16", sample_rate: 16000, channels: 1, interim_results: "false",
});
const closed = new Promise((resolve) => sock.on("close", (e) => resolve(e?.code ?? null)));
sock.on("message", (m) => got.push(m));
sock.on("error", (e) => got.push({ type: "SocketError", message: String(e?.message ?? e) }));
sock.connect();
await sock.waitForOpen();
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
let finalized = false;
for (let i = 0; i < pcm.length; i += 3200) {
  sock.sendMedia(pcm.subarray(i, i + 3200));
  if (!finalized && i / 32000 >= Number(finalizeAt)) {
    sock.sendFinalize({ type: "Finalize" });
    finalized = true;
  }
  await sleep(20);
}
sock.sendCloseStream({ type: "CloseStream" });
const code = await Promise.race([closed, sleep(60000).then(() => "timeout")]);
const messages = got.map((m) => ({
  type: m.type,
  is_final: m.is_final,
  speech_final: m.speech_final,
  from_finalize: m.from_finalize,
  transcript: m.channel?.alternatives?.[0]?.transcript,
  request_id: m.metadata?.request_id ?? m.request_id,
}));
console.log(JSON.stringify({ messages, close_code: code }));
process.exit(0);
