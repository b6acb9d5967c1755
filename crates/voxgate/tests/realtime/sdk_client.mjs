// Streams a 16 kHz mono WAV (resampled to 24 kHz PCM) to voxgate through OpenAI's official JS SDK
// (openai 7, its Node realtime client `OpenAIRealtimeWS` on `ws`), unmodified but for its base
// URL, and prints one JSON report on stdout: the type of every server event and each completed
// transcript. The SDK only connects with wss://, so voxgate serves TLS here.
//
//   OAI_JS=target/tools/oai-js node sdk_client.mjs https://127.0.0.1:PORT KEY file.wav vad|commit COMMIT_AT
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { resolve } from "node:path";

const require = createRequire(resolve(process.env.OAI_JS, "package.json"));
const { OpenAI } = require("openai");
const { OpenAIRealtimeWS } = require("openai/realtime/ws");

const [base, key, path, mode, commitAt] = process.argv.slice(2);
const pcm16k = readFileSync(path).subarray(44); // canonical 44-byte header (checked by the test)
const s = new Int16Array(pcm16k.buffer, pcm16k.byteOffset, pcm16k.length / 2);
const out = [];
for (let i = 0; i + 2 < s.length; i += 2) {
  out.push(s[i], Math.round(s[i] / 3 + (2 * s[i + 1]) / 3), Math.round((2 * s[i + 1]) / 3 + s[i + 2] / 3));
}
const pcm = Buffer.concat([Buffer.from(Int16Array.from(out).buffer), Buffer.alloc(48000)]);

const client = new OpenAI({ apiKey: key, baseURL: `${base}/v1` });
const rt = new OpenAIRealtimeWS({ intent: "transcription" }, client);
const events = [], committed = [], completed = [], errors = [];
rt.on("event", (e) => {
  events.push(e.type);
  if (e.type === "input_audio_buffer.committed") committed.push(e.item_id);
  if (e.type === "conversation.item.input_audio_transcription.completed") {
    completed.push({ item_id: e.item_id, transcript: e.transcript });
  }
});
rt.on("error", (e) => errors.push(String(e?.message ?? e)));
await new Promise((ok, fail) => {
  rt.socket.once("open", ok);
  rt.socket.once("error", fail);
});
const turn = mode === "vad" ? { type: "server_vad", silence_duration_ms: 500 } : null;
rt.send({
  type: "session.update",
  session: {
    type: "transcription",
    audio: { input: {
      format: { type: "audio/pcm", rate: 24000 },
      transcription: { model: "gpt-4o-transcribe", language: "en" },
      turn_detection: turn,
    } },
  },
});
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
let committedOnce = false;
for (let i = 0; i < pcm.length; i += 4800) {
  rt.send({ type: "input_audio_buffer.append", audio: pcm.subarray(i, i + 4800).toString("base64") });
  if (mode === "commit" && !committedOnce && i / 48000 >= Number(commitAt)) {
    rt.send({ type: "input_audio_buffer.commit" });
    committedOnce = true;
  }
  await sleep(20);
}
if (mode === "commit") rt.send({ type: "input_audio_buffer.commit" });
// Done when every commit sent was acknowledged, every committed item completed, and nothing
// new came for a second (server VAD may still be closing the last turn).
const commits = mode === "commit" ? 2 : 1;
const settled = () => committed.length >= commits && completed.length >= committed.length;
for (let n = 0, quiet = 0; n < 600 && quiet < 10; n++) {
  const seen = events.length;
  await sleep(100);
  quiet = settled() && events.length === seen ? quiet + 1 : 0;
}
rt.close();
console.log(JSON.stringify({ events, committed, completed, errors }));
process.exit(0);
