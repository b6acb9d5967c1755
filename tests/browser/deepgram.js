#!/usr/bin/env node
// Deepgram's JS SDK in headless Chromium against voxgate's Deepgram dialect.
//
// A page served by this script (not by voxgate) loads @deepgram/sdk's browser bundle, unmodified,
// from where `scripts/deps dg` installed it, and connects with
// `new DeepgramClient({ apiKey, baseUrl: "ws://127.0.0.1:PORT" })`: the browser build sends the
// key as `Sec-WebSocket-Protocol: token, <key>`, and Chromium fails the connection unless the
// server echoes `token`. voxgate runs with auth on (auth.mode = "jwt", the key configured in
// [[auth.api_keys]] by its SHA-256) and faster-whisper-server (`scripts/deps fws`) behind the
// `nova-3` alias. The fake microphone plays the corpus sentence; the page records it with
// MediaRecorder (WebM/Opus), sends Finalize part-way and CloseStream at the end
// (tests/browser/deepgram-page.js). Scenarios:
//   deepgram-sdk        finals hold the sentence's words, one is from_finalize, Metadata comes
//   deepgram-wrong-key  a wrong key never opens: HTTP 401 at the handshake, no session
//
// Usage: node tests/browser/deepgram.js [scenario-name ...]; artifacts in artifacts/browser/deepgram/.
// Env: as tests/browser/e2e.js, plus DG_JS (default target/tools/dg-js), FWS (default target/tools/fws).
'use strict';

const { chromium } = require('playwright-core');
const { spawn } = require('node:child_process');
const crypto = require('node:crypto');
const fs = require('node:fs');
const http = require('node:http');
const os = require('node:os');
const path = require('node:path');
const {
  ROOT, ART, BIN, CHROMIUM, SOURCE, CHROMIUM_FLAGS,
  sleep, say, wavSeconds, freePort, Gateway, logSince,
} = require('./harness');

const OUT = path.join(ART, 'deepgram');
const DG_JS = process.env.DG_JS || path.join(ROOT, 'target', 'tools', 'dg-js');
const BUNDLE = path.join(DG_JS, 'node_modules', '@deepgram', 'sdk', 'dist', 'browser', 'index.global.js');
const FWS = process.env.FWS || path.join(ROOT, 'target', 'tools', 'fws');
const WAV = path.join(SOURCE, 'short.wav');
const SENTENCE = fs.readFileSync(path.join(SOURCE, 'short.txt'), 'utf8');
const MARGIN_MS = 1500; // recording length = file length + margin
const FINALIZE_AT_MS = 2500; // mid-sentence

const SCENARIOS = [
  { name: 'deepgram-sdk', key: 'good' },
  { name: 'deepgram-wrong-key', key: 'wrong' },
];

// ------------------------------------------------------------------ the page's own server
function startPageServer() {
  const files = {
    '/': ['text/html', '<!doctype html><meta charset="utf-8"><title>Deepgram SDK</title>'
      + '<script src="/sdk.js"></script><script src="/page.js"></script><p>Deepgram SDK page</p>'],
    '/sdk.js': ['text/javascript', fs.readFileSync(BUNDLE)],
    '/page.js': ['text/javascript', fs.readFileSync(path.join(__dirname, 'deepgram-page.js'))],
  };
  const server = http.createServer((req, res) => {
    const f = files[new URL(req.url, 'http://x').pathname];
    if (!f) return res.writeHead(404).end();
    res.writeHead(200, { 'content-type': f[0] }).end(f[1]);
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve({ server, port: server.address().port })));
}

// ------------------------------------------------------------------ faster-whisper-server
async function startFws(logFile) {
  const bin = path.join(FWS, 'bin', 'faster-whisper-server');
  const model = fs.readFileSync(path.join(FWS, 'model-dir'), 'utf8').trim();
  const port = await freePort();
  const fd = fs.openSync(logFile, 'a');
  const proc = spawn(bin, [model, '--host', '127.0.0.1', '--port', String(port)], {
    stdio: ['ignore', fd, fd], env: { ...process.env, HF_HUB_OFFLINE: '1', HF_HUB_DISABLE_TELEMETRY: '1' },
  });
  fs.closeSync(fd);
  const url = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + 60000;
  for (;;) {
    if (proc.exitCode !== null) throw new Error(`faster-whisper-server exited (code ${proc.exitCode}); see ${logFile}`);
    try {
      if ((await fetch(`${url}/health`)).ok) break;
    } catch (_) { /* not up yet */ }
    if (Date.now() > deadline) { proc.kill('SIGKILL'); throw new Error(`faster-whisper-server not ready in 60 s; see ${logFile}`); }
    await sleep(200);
  }
  // It loads the model on the first request: load it now, not within the first utterance.
  const started = Date.now();
  const form = new FormData();
  form.append('file', new Blob([fs.readFileSync(WAV)], { type: 'audio/wav' }), 'warm.wav');
  const r = await fetch(`${url}/v1/audio/transcriptions`, { method: 'POST', body: form });
  say(`faster-whisper-server warmed up: HTTP ${r.status} "${(await r.text()).trim().slice(0, 80)}" in ${Date.now() - started} ms`);
  return { proc, url };
}

// ------------------------------------------------------------------ one scenario
async function runScenario(sc, ctx) {
  const fileSec = wavSeconds(WAV);
  const cfg = {
    url: `ws://127.0.0.1:${ctx.gw.port}`, key: ctx.keys[sc.key], model: 'nova-3', timeslice: 250,
    finalizeAtMs: FINALIZE_AT_MS, recordMs: Math.round(fileSec * 1000) + MARGIN_MS, closeTimeoutMs: 60000,
  };
  const logStart = fs.statSync(ctx.gw.logFile).size;
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'voxgate-chromium-'));
  const failures = [];
  const check = (ok, what) => { if (!ok) failures.push(what); };
  const started = Date.now();
  const pageErrors = [];
  let context;
  try {
    context = await chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM, headless: true, timeout: 60000,
      args: [...CHROMIUM_FLAGS, `--use-file-for-fake-audio-capture=${WAV}%noloop`],
    });
    const page = context.pages()[0] || await context.newPage();
    page.on('pageerror', (e) => pageErrors.push(String(e)));
    await page.goto(`http://127.0.0.1:${ctx.pagePort}/`);
    say(`${sc.name}: streaming ${path.basename(WAV)} (${fileSec.toFixed(3)} s) through the SDK's browser build`);
    const report = await page.evaluate((c) => window.runDeepgram(c), cfg);
    await context.close();
    context = null;
    fs.writeFileSync(path.join(OUT, `${sc.name}.json`), JSON.stringify(report, null, 2));
    check(pageErrors.length === 0, `uncaught page errors: ${JSON.stringify(pageErrors)}`);
    await sleep(200); // the server's close line follows the client's close event
    const lines = logSince(ctx.gw.logFile, logStart).text.split('\n');
    const closes = lines.filter((l) => l.includes('session closed'));
    const refusals = lines.filter((l) => l.includes('connection refused'));
    const errors = lines.filter((l) => /\bERROR\b/.test(l));
    check(errors.length === 0, `server log has ERROR lines:\n${errors.join('\n')}`);
    const summary = sc.key === 'good'
      ? checkTranscribed(report, closes, refusals, check)
      : checkRefused(report, closes, refusals, check);
    return { name: sc.name, summary, wall_seconds: Number(((Date.now() - started) / 1000).toFixed(1)), failures };
  } finally {
    if (context) await context.close().catch(() => {});
    fs.rmSync(profile, { recursive: true, force: true });
  }
}

// Content words of the corpus sentence (the short function words Whisper may drop are left out).
const WORDS = [...new Set(SENTENCE.toLowerCase().match(/[a-z]+/g).filter((w) => w.length > 3))];
const transcriptOf = (m) => (m.channel && m.channel.alternatives && m.channel.alternatives[0]
  && m.channel.alternatives[0].transcript) || '';

function checkTranscribed(r, closes, refusals, check) {
  check(r.opened, `the SDK never opened the socket: ${JSON.stringify(r.errors)}`);
  check(r.protocol === 'token', `subprotocol ${JSON.stringify(r.protocol)}, expected "token" echoed`);
  check(r.errors.length === 0, `SDK errors: ${JSON.stringify(r.errors)}`);
  check(r.closeCode === 1000, `close code ${r.closeCode}, expected 1000 after CloseStream`);
  check(r.sent.chunks > 3 && r.mime.startsWith('audio/webm'), `sent ${JSON.stringify(r.sent)} as ${r.mime}`);
  const results = r.messages.filter((m) => m.type === 'Results');
  const finals = results.filter((m) => m.is_final);
  const text = finals.map(transcriptOf).join(' ').toLowerCase();
  const heard = WORDS.filter((w) => text.includes(w));
  check(heard.length * 2 >= WORDS.length, `finals hold ${heard.length}/${WORDS.length} of ${JSON.stringify(WORDS)}: "${text}"`);
  const fromFinalize = finals.filter((m) => m.from_finalize === true);
  check(fromFinalize.length >= 1, `no Results with from_finalize: ${JSON.stringify(results.map(brief))}`);
  check(fromFinalize.every((m) => m.at >= r.finalizedAt), 'a from_finalize final came before Finalize was sent');
  const meta = r.messages.filter((m) => m.type === 'Metadata');
  check(meta.length === 1 && meta[0].at >= r.closeStreamAt, `expected one Metadata after CloseStream: ${JSON.stringify(meta)}`);
  const ids = new Set(results.map((m) => m.metadata && m.metadata.request_id).concat(meta.map((m) => m.request_id)));
  check(ids.size === 1 && !ids.has(undefined), `request ids differ between messages: ${JSON.stringify([...ids])}`);
  const last = r.messages[r.messages.length - 1] || {};
  check(last.type === 'Metadata', `last message is ${last.type}, expected Metadata`);
  check(closes.length === 1 && /code=1000\b/.test(closes[0]) && /decode_errors=0\b/.test(closes[0]),
    `server log: ${JSON.stringify(closes)}`);
  check(refusals.length === 0, `server refused: ${refusals.join('\n')}`);
  return { finals: finals.map(brief), heard, metadata: meta.length, sent: r.sent };
}

function checkRefused(r, closes, refusals, check) {
  check(!r.opened, 'a wrong key opened the socket');
  check(r.errors.length >= 1, 'the SDK reported no error for a wrong key');
  check(r.messages.length === 0, `messages with a wrong key: ${JSON.stringify(r.messages)}`);
  check(refusals.length >= 1 && refusals.every((l) => /error="?unauthorized/.test(l)),
    `server log has no unauthorized refusal: ${JSON.stringify(refusals)}`);
  check(closes.length === 0, `a session ran with a wrong key: ${JSON.stringify(closes)}`);
  return { errors: r.errors, refusals: refusals.length };
}

const brief = (m) => ({ at: m.at, is_final: m.is_final, speech_final: m.speech_final, from_finalize: m.from_finalize, transcript: transcriptOf(m) });

// ------------------------------------------------------------------ main
function writeConfig(file, fwsUrl, goodKey) {
  const sha = crypto.createHash('sha256').update(goodKey).digest('hex');
  fs.writeFileSync(file, [
    // A loaded machine may take Whisper seconds per utterance: wait for the last one at CloseStream.
    '[server]', 'shutdown_grace_seconds = 5', 'close_flush_seconds = 60', '',
    // api_keys alone turn auth on only off loopback; "jwt" turns it on here too.
    '[auth]', 'mode = "jwt"', '',
    '[[auth.api_keys]]', 'user = "browser"', `sha256 = "${sha}"`, '',
    '[[stt]]', 'name = "whisper"', 'aliases = ["nova-3"]', 'backend = "openai"', `url = "${fwsUrl}"`, 'timeout_ms = 60000', 'flush_timeout_ms = 60000', '',
  ].join('\n'));
}

async function main() {
  const wanted = process.argv.slice(2);
  const scenarios = wanted.length ? SCENARIOS.filter((s) => wanted.includes(s.name)) : SCENARIOS;
  if (!scenarios.length) throw new Error(`no such scenario; have ${SCENARIOS.map((s) => s.name).join(', ')}`);
  for (const f of [BIN, CHROMIUM, BUNDLE, path.join(FWS, 'model-dir')]) if (!fs.existsSync(f)) throw new Error(`missing ${f} (scripts/deps dg, scripts/deps fws)`);
  fs.rmSync(OUT, { recursive: true, force: true });
  fs.mkdirSync(OUT, { recursive: true });
  const keys = { good: crypto.randomBytes(20).toString('hex'), wrong: crypto.randomBytes(20).toString('hex') };
  const fws = await startFws(path.join(OUT, 'fws.log'));
  const pages = await startPageServer();
  const config = path.join(OUT, 'voxgate.toml');
  writeConfig(config, fws.url, keys.good);
  const gw = new Gateway(await freePort(), config, path.join(OUT, 'voxgate.log'));
  const results = [];
  try {
    await gw.start();
    say(`voxgate on 127.0.0.1:${gw.port} (auth on), faster-whisper-server at ${fws.url}, page on :${pages.port}`);
    for (const sc of scenarios) {
      let r;
      try {
        r = await runScenario(sc, { gw, keys, pagePort: pages.port });
      } catch (e) {
        r = { name: sc.name, failures: [`exception: ${e.stack || e}`] };
      }
      results.push(r);
      if (r.failures.length) say(`${sc.name}: FAIL\n  - ${r.failures.join('\n  - ')}`);
      else say(`${sc.name}: ok — ${JSON.stringify(r.summary)}, ${r.wall_seconds} s`);
    }
  } finally {
    await gw.stop().catch((e) => say(`stopping voxgate: ${e.message}`));
    fws.proc.kill('SIGTERM');
    pages.server.close();
  }
  fs.writeFileSync(path.join(OUT, 'results.json'), JSON.stringify({ results, total_seconds: process.uptime() }, null, 2));
  const failed = results.filter((r) => r.failures.length);
  say(`${results.length - failed.length}/${results.length} Deepgram browser scenarios passed; artifacts in ${path.relative(ROOT, OUT)}/`);
  process.exitCode = failed.length ? 1 : 0;
}

const watchdog = setTimeout(() => { console.error('deepgram browser test: overall timeout (5 min)'); process.exit(1); }, 5 * 60 * 1000);
watchdog.unref();
main().catch((e) => { console.error(e.stack || e); process.exitCode = 1; })
  .finally(() => process.exit());
