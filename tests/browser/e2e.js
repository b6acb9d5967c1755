#!/usr/bin/env node
// End-to-end test of voxgate's browser page (`GET /`) in Debian's headless Chromium.
//
// Starts the release gateway on a free loopback port (with an audio-bytes webhook pointing at a
// receiver in this process), then for each scenario launches a fresh Chromium whose fake
// microphone plays a corpus WAV once, clicks Record on the page, clicks Stop after the file's
// length plus a margin, and checks the page's own DOM, the webhook receiver and the server log.
//
// Usage: node tests/browser/e2e.js [scenario-name ...]
// Env: BROWSER_TEST_BIN (default target/release/voxgate), CHROMIUM (default /usr/bin/chromium),
//      BROWSER_TEST_UPDATE_SCREENSHOT=1 to refresh docs/browser-page.png (also written when absent).
//      (Not VOXGATE_*: the gateway reads those as configuration, and gets none of them here.)
'use strict';

const { chromium } = require('playwright-core');
const fs = require('node:fs');
const http = require('node:http');
const os = require('node:os');
const path = require('node:path');
const {
  ROOT, ART, BIN, CHROMIUM, SOURCE, CHROMIUM_FLAGS,
  sleep, stamp, say, wavSeconds, freePort, Gateway, logSince,
} = require('./harness');

const DOCS_PNG = path.join(ROOT, 'docs', 'browser-page.png');
const MARGIN_MS = 1500; // recording length = file length + margin

// minUtterances: the server runs with segmenter.silence_ms = 200, so the fable's sentence pauses
// (~250-280 ms in the source) end utterances; with the default 800 ms it is one utterance.
const SCENARIOS = [
  { name: 'medium-250', wav: 'medium.wav', timeslice: 250, minUtterances: 3, screenshotAtMs: 28000, docs: true },
  { name: 'medium-100', wav: 'medium.wav', timeslice: 100, minUtterances: 3, screenshotAtMs: 21000 },
  { name: 'short-250', wav: 'short.wav', timeslice: 250, minUtterances: 1, screenshotAtMs: 4000 },
  { name: 'short-100', wav: 'short.wav', timeslice: 100, minUtterances: 1, screenshotAtMs: 4000 },
  // The server restarts mid-recording: the page must reconnect with a fresh MediaRecorder.
  { name: 'reconnect-250', wav: 'short.wav', timeslice: 250, restartAtMs: 2500, screenshotAtMs: 6000 },
];

// ------------------------------------------------------------------ webhook receiver
function startReceiver() {
  const sessions = new Map(); // session_id -> { bytes, requests }
  const server = http.createServer((req, res) => {
    const u = new URL(req.url, 'http://x');
    const sid = u.searchParams.get('session_id') || '?';
    let n = 0;
    req.on('data', (d) => { n += d.length; });
    req.on('end', () => {
      const s = sessions.get(sid) || { bytes: 0, requests: 0 };
      s.bytes += n; s.requests += 1;
      sessions.set(sid, s);
      res.writeHead(200).end('ok');
    });
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve({ server, sessions, port: server.address().port })));
}

// ------------------------------------------------------------------ one scenario
async function runScenario(sc, gw, receiver) {
  const wavPath = path.join(SOURCE, sc.wav);
  const fileSec = wavSeconds(wavPath);
  const recordMs = Math.round(fileSec * 1000) + MARGIN_MS;
  const logStart = fs.statSync(gw.logFile).size;
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'voxgate-chromium-'));
  const failures = [];
  const check = (ok, what) => { if (!ok) failures.push(what); };
  const started = Date.now();
  const consoleErrors = [], pageErrors = [];
  let context;
  try {
    context = await chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM,
      headless: true,
      args: [...CHROMIUM_FLAGS, `--use-file-for-fake-audio-capture=${wavPath}%noloop`],
      viewport: { width: 1280, height: 900 },
      timeout: 60000,
    });
    const page = context.pages()[0] || await context.newPage();
    page.on('console', (m) => { if (m.type() === 'error') consoleErrors.push(m.text()); });
    page.on('pageerror', (e) => pageErrors.push(String(e)));
    const url = `http://127.0.0.1:${gw.port}/?timeslice=${sc.timeslice}&mime=${encodeURIComponent('audio/webm;codecs=opus')}`;
    await page.goto(url);
    const formats = await page.$$eval('#mime option', (os) => os.map((o) => ({ value: o.value, disabled: o.disabled })));
    const recordLabel = await page.getByRole('button', { name: 'Record' }).count();
    check(recordLabel === 1, 'the Record button is not reachable by its accessible name');

    await page.click('#record');
    const clickAt = Date.now();
    await page.waitForSelector('#status[data-state="recording"]', { timeout: 15000 });
    await page.waitForFunction(() => document.getElementById('session-id').textContent !== '—', null, { timeout: 15000 });
    say(`${sc.name}: recording (${sc.wav}, ${fileSec.toFixed(3)} s file, ${recordMs} ms recording, ${sc.timeslice} ms timeslice)`);

    const at = (ms) => sleep(Math.max(0, clickAt + ms - Date.now()));
    const events = [];
    if (sc.restartAtMs) events.push({ ms: sc.restartAtMs, run: async () => {
      say(`${sc.name}: restarting the gateway mid-recording`);
      await gw.stop();
      await gw.start();
      say(`${sc.name}: gateway back up`);
    } });
    if (sc.screenshotAtMs) events.push({ ms: sc.screenshotAtMs, run: async () => {
      const png = path.join(ART, `${sc.name}-mid.png`);
      await page.screenshot({ path: png, fullPage: true });
      if (sc.docs && (process.env.BROWSER_TEST_UPDATE_SCREENSHOT === '1' || !fs.existsSync(DOCS_PNG))) {
        fs.mkdirSync(path.dirname(DOCS_PNG), { recursive: true });
        fs.copyFileSync(png, DOCS_PNG);
        say(`${sc.name}: wrote ${path.relative(ROOT, DOCS_PNG)}`);
      }
    } });
    events.sort((a, b) => a.ms - b.ms);
    for (const e of events) { await at(e.ms); await e.run(); }
    await at(recordMs);
    await page.click('#record'); // Stop
    await page.waitForSelector('#status[data-state="closed"], #status[data-state="error"]', { timeout: 30000 });
    await page.screenshot({ path: path.join(ART, `${sc.name}-final.png`), fullPage: true });

    const dom = await page.evaluate(() => {
      const $ = (id) => document.getElementById(id);
      const data = (e) => ({ ...e.dataset, text: e.textContent });
      return {
        status: data($('status')),
        sessionId: $('session-id').textContent,
        format: $('format').dataset.format,
        seconds: Number($('seconds').dataset.value),
        sent: { messages: Number($('sent').dataset.messages), bytes: Number($('sent').dataset.bytes) },
        summary: { ...$('summary').dataset },
        utterances: [...document.querySelectorAll('#utterances li')].map(data),
        transcripts: [...document.querySelectorAll('#transcripts li')].map(data),
        errors: [...document.querySelectorAll('#errors li')].map(data),
        warnings: [...document.querySelectorAll('#warnings li')].map(data),
        consumers: [...document.querySelectorAll('#consumers tr')].map((e) => ({ ...e.dataset })),
        sessions: [...document.querySelectorAll('#sessions li')].map(data),
        levelMaxDb: Number($('level').dataset.maxDb),
        vad: $('vad').dataset.speaking,
      };
    });
    await context.close();
    context = null;

    // ---------------------------------------------------------------- assertions on the page
    const s = dom.summary;
    const secs = Number(s.secondsDecoded);
    check(dom.status.state === 'closed', `page status is ${dom.status.state}: ${dom.status.text}`);
    check(dom.errors.length === 0, `page shows errors: ${JSON.stringify(dom.errors)}`);
    check(pageErrors.length === 0, `uncaught page errors: ${JSON.stringify(pageErrors)}`);
    check(consoleErrors.length === 0, `console errors: ${JSON.stringify(consoleErrors)}`);
    // A server-side cut (the reconnect scenario's restart) leaves the SimpleBlock ID that ends every
    // Chromium message dangling: that session reports a stream_truncated warning (not a decode error).
    const cutSession = sc.restartAtMs && dom.sessions[0] ? dom.sessions[0].sessionId : null;
    const isCutTail = (w) => w.code === 'stream_truncated' && w.session === cutSession;
    const decodeWarnings = dom.warnings.filter((w) => /decode|resync/.test(w.code) && !isCutTail(w));
    check(decodeWarnings.length === 0, `decode warnings on the page: ${JSON.stringify(decodeWarnings)}`);
    check(s.closed === 'true' && s.code === '1000', `Closed summary missing or not 1000: ${JSON.stringify(s)}`);
    check(s.decodeErrors === '0' && s.resyncs === '0', `decode_errors=${s.decodeErrors} resyncs=${s.resyncs}`);
    check(dom.format === 'webm', `detected format ${dom.format}, expected webm`);
    check(dom.seconds === secs, `#seconds ${dom.seconds} != Closed seconds_decoded ${secs}`);
    check(dom.levelMaxDb > -40, `level meter never moved (max ${dom.levelMaxDb} dB)`);
    const ended = dom.utterances.filter((u) => u.state === 'ended');
    check(ended.length === dom.utterances.length, `utterances left open: ${JSON.stringify(dom.utterances)}`);
    for (const x of dom.sessions) {
      const n = ended.filter((u) => u.session === x.sessionId).length;
      check(n === Number(x.utterances), `session ${x.sessionId}: ${n} utterances on the page, its Closed says ${x.utterances}`);
    }
    // Each utterance within its own session's media (after a restart the second session may be
    // the shorter one).
    const secsOf = (u) => Number((dom.sessions.find((x) => x.sessionId === u.session) || {}).secondsDecoded ?? secs);
    check(ended.every((u) => Number(u.duration) > 0 && Number(u.end) <= secsOf(u) + 0.01),
      `utterance outside (0, its session's seconds decoded]: ${JSON.stringify(ended)} in ${JSON.stringify(dom.sessions)}`);
    const hook = dom.consumers.find((k) => k.name === 'e2e');
    check(hook && hook.kind === 'webhook', `no e2e webhook row in the consumer table: ${JSON.stringify(dom.consumers)}`);
    const lastSession = dom.sessions[dom.sessions.length - 1] || {};
    check(lastSession.firstBytes === '1a45dfa3', `the last connection's first message is not an EBML header: ${lastSession.firstBytes}`);

    if (!sc.restartAtMs) {
      check(secs >= fileSec - 0.3, `decoded ${secs} s < file ${fileSec.toFixed(3)} s - 0.3 s`);
      check(secs <= recordMs / 1000 + 1.0, `decoded ${secs} s > recording ${recordMs / 1000} s + 1 s`);
      check(Number(s.messagesIn) === dom.sent.messages, `server got ${s.messagesIn} messages, page sent ${dom.sent.messages}`);
      check(Number(s.bytesIn) === dom.sent.bytes, `server got ${s.bytesIn} bytes, page sent ${dom.sent.bytes}`);
      check(ended.length >= sc.minUtterances, `${ended.length} utterances, expected >= ${sc.minUtterances}`);
      check(dom.sessions.length === 1, `${dom.sessions.length} connections, expected 1`);
      check(dom.warnings.length === 0, `page shows warnings: ${JSON.stringify(dom.warnings)}`);
      const expectBytes = Number(s.samplesDecoded) * 2;
      check(hook && Number(hook.deliveredBytes) === expectBytes && hook.droppedBytes === '0',
        `webhook delivered ${hook && hook.deliveredBytes} (dropped ${hook && hook.droppedBytes}), expected ${expectBytes} (0)`);
      const got = receiver.sessions.get(s.sessionId);
      check(got && got.bytes === expectBytes && hook && got.requests === Number(hook.requests),
        `webhook receiver got ${JSON.stringify(got)} for ${s.sessionId}, expected ${expectBytes} bytes in ${hook && hook.requests} requests`);
    } else {
      check(dom.sessions.length === 2, `${dom.sessions.length} connections, expected 2: ${JSON.stringify(dom.sessions)}`);
      const [a, b] = dom.sessions;
      check(a && a.code === '1001' && a.decodeErrors === '0' && a.resyncs === '0', `first session: ${JSON.stringify(a)}`);
      check(b && b.code === '1000' && b.decodeErrors === '0' && b.format === 'webm', `second session: ${JSON.stringify(b)}`);
      check(a && a.firstBytes === '1a45dfa3', `first connection's first message is not an EBML header: ${a && a.firstBytes}`);
      check(b && b.sessionId !== a.sessionId, 'the reconnect did not start a new session');
      check(b && Number(b.secondsDecoded) >= 1.5, `second session decoded only ${b && b.secondsDecoded} s`);
      check(b && Number(b.messagesIn) === Number(b.messagesSent), `second session: server got ${b && b.messagesIn} messages, page sent ${b && b.messagesSent}`);
      check(b && Number(b.bytesIn) === Number(b.bytesSent), `second session: server got ${b && b.bytesIn} bytes, page sent ${b && b.bytesSent}`);
      const other = dom.warnings.filter((w) => !isCutTail(w));
      check(other.length === 1 && other[0].code === 'connection_lost' && other[0].source === 'client',
        `expected one client warning connection_lost (besides the cut tail): ${JSON.stringify(dom.warnings)}`);
      check(dom.warnings.filter(isCutTail).length <= 1, 'more than one stream_truncated warning on the cut session');
    }

    // ---------------------------------------------------------------- assertions on the server log
    const log = logSince(gw.logFile, logStart).text;
    const lines = log.split('\n');
    // Between the restart's signal and the cut session's close, its truncated tail is expected.
    const signalAt = sc.restartAtMs ? lines.findIndex((l) => l.includes('signal received')) : -1;
    const cutClosedAt = sc.restartAtMs ? lines.findIndex((l) => l.includes('session closed') && /code=1001\b/.test(l)) : -1;
    const bad = lines.filter((l, i) => /\b(WARN|ERROR)\b/.test(l) && /decode|resync|demux/i.test(l)
      && !(signalAt >= 0 && i > signalAt && i < cutClosedAt && /truncated/.test(l)));
    check(bad.length === 0, `server log has decode warnings:\n${bad.join('\n')}`);
    const closes = lines.filter((l) => l.includes('session closed'));
    check(closes.length === (sc.restartAtMs ? 2 : 1), `server log has ${closes.length} 'session closed' lines`);
    const last = closes[closes.length - 1] || '';
    check(/code=1000\b/.test(last) && /decode_errors=0\b/.test(last) && /resyncs=0\b/.test(last), `server log: ${closes.join('\n')}`);
    if (!sc.restartAtMs) check(closes.every((l) => /decode_errors=0\b/.test(l)), `server log: ${closes.join('\n')}`);
    const errorLines = log.split('\n').filter((l) => /\bERROR\b/.test(l));
    check(errorLines.length === 0, `server log has ERROR lines:\n${errorLines.join('\n')}`);

    const result = {
      name: sc.name, wav: sc.wav, timeslice: sc.timeslice, file_seconds: Number(fileSec.toFixed(3)), record_ms: recordMs,
      seconds_decoded: secs, messages: dom.sent.messages, bytes: dom.sent.bytes,
      utterances: ended.map((u) => [Number(Number(u.start).toFixed(2)), Number(Number(u.end).toFixed(2)), u.reason]),
      connections: dom.sessions.map((x) => ({ session: x.sessionId, code: x.code, seconds: Number(x.secondsDecoded), decode_errors: Number(x.decodeErrors) })),
      webhook: hook || null, level_max_db: dom.levelMaxDb, ogg_supported: formats.some((f) => f.value.startsWith('audio/ogg') && !f.disabled),
      wall_seconds: Number(((Date.now() - started) / 1000).toFixed(1)), failures,
    };
    fs.writeFileSync(path.join(ART, `${sc.name}.dom.json`), JSON.stringify(dom, null, 2));
    return result;
  } finally {
    if (context) await context.close().catch(() => {});
    fs.rmSync(profile, { recursive: true, force: true });
  }
}

// ------------------------------------------------------------------ main
async function main() {
  const wanted = process.argv.slice(2);
  const scenarios = wanted.length ? SCENARIOS.filter((s) => wanted.includes(s.name)) : SCENARIOS;
  if (!scenarios.length) throw new Error(`no such scenario; have ${SCENARIOS.map((s) => s.name).join(', ')}`);
  for (const f of [BIN, CHROMIUM]) if (!fs.existsSync(f)) throw new Error(`missing ${f}`);
  fs.mkdirSync(ART, { recursive: true });
  for (const f of fs.readdirSync(ART)) if (/\.(png|json|log|toml)$/.test(f)) fs.rmSync(path.join(ART, f));

  const receiver = await startReceiver();
  const config = path.join(ART, 'voxgate.toml');
  fs.writeFileSync(config, [
    '[server]', 'shutdown_grace_seconds = 5', '',
    '[segmenter]', 'silence_ms = 200', '',
    '[[webhooks]]', 'name = "e2e"', `url = "http://127.0.0.1:${receiver.port}/audio"`,
    'delay_seconds = 1', 'default = true', 'body = "pcm"', '',
  ].join('\n'));
  const logFile = path.join(ART, 'voxgate.log');
  const gw = new Gateway(await freePort(), config, logFile);
  const results = [];
  try {
    await gw.start();
    say(`voxgate on 127.0.0.1:${gw.port} (log ${path.relative(ROOT, logFile)}), webhook receiver on :${receiver.port}`);
    for (const sc of scenarios) {
      let r;
      try {
        r = await runScenario(sc, gw, receiver);
      } catch (e) {
        r = { name: sc.name, failures: [`exception: ${e.stack || e}`] };
      }
      results.push(r);
      if (r.failures.length) say(`${sc.name}: FAIL\n  - ${r.failures.join('\n  - ')}`);
      else say(`${sc.name}: ok — ${r.seconds_decoded} s decoded of ${r.file_seconds} s, ${r.utterances.length} utterances, `
        + `${r.messages} messages, ${r.connections.length} connection(s), level max ${r.level_max_db} dB, ${r.wall_seconds} s`);
    }
  } finally {
    await gw.stop().catch((e) => say(`stopping voxgate: ${e.message}`));
    receiver.server.close();
  }
  fs.writeFileSync(path.join(ART, 'results.json'), JSON.stringify({ results, total_seconds: process.uptime() }, null, 2));
  const failed = results.filter((r) => r.failures.length);
  say(`${results.length - failed.length}/${results.length} scenarios passed; artifacts in ${path.relative(ROOT, ART)}/`);
  process.exitCode = failed.length ? 1 : 0;
}

const watchdog = setTimeout(() => { console.error(stamp(), 'browser e2e: overall timeout (10 min)'); process.exit(1); }, 10 * 60 * 1000);
watchdog.unref();
main().catch((e) => { console.error(stamp(), e.stack || e); process.exitCode = 1; })
  .finally(() => process.exit()); // idle keep-alive sockets would hold the event loop
