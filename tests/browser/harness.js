// What the browser tests share: paths, Chromium's flags, free ports, WAV lengths, and the
// release gateway as a child process (started with a config file, probed on /readyz).
'use strict';

const { spawn } = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const path = require('node:path');

const ROOT = path.resolve(__dirname, '..', '..');
const ART = path.join(ROOT, 'artifacts', 'browser');
const BIN = process.env.BROWSER_TEST_BIN || path.join(ROOT, 'target', 'release', 'voxgate');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const SOURCE = path.join(ROOT, 'testdata', 'corpus', 'source');

const CHROMIUM_FLAGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--use-fake-ui-for-media-stream', '--use-fake-device-for-media-stream',
  '--autoplay-policy=no-user-gesture-required',
];

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const t0 = Date.now();
const stamp = () => `[${((Date.now() - t0) / 1000).toFixed(1).padStart(6)} s]`;
const say = (...a) => console.log(stamp(), ...a);

function wavSeconds(file) {
  const b = fs.readFileSync(file);
  // RIFF/WAVE, PCM: find "fmt " and "data" chunks.
  let off = 12, rate = 0, align = 0, dataLen = 0;
  while (off + 8 <= b.length) {
    const id = b.toString('ascii', off, off + 4), len = b.readUInt32LE(off + 4);
    if (id === 'fmt ') { rate = b.readUInt32LE(off + 12); align = b.readUInt16LE(off + 20); }
    if (id === 'data') { dataLen = Math.min(len, b.length - off - 8); break; }
    off += 8 + len + (len & 1);
  }
  if (!rate || !align) throw new Error(`${file}: not a PCM WAV`);
  return dataLen / align / rate;
}

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => { const { port } = s.address(); s.close(() => resolve(port)); });
  });
}

class Gateway {
  constructor(port, config, logFile) { this.port = port; this.config = config; this.logFile = logFile; this.proc = null; }

  async start() {
    const fd = fs.openSync(this.logFile, 'a');
    this.proc = spawn(BIN, ['serve', '--config', this.config, '--listen', `127.0.0.1:${this.port}`], {
      stdio: ['ignore', fd, fd], env: gatewayEnv(),
    });
    fs.closeSync(fd);
    this.exited = new Promise((r) => this.proc.once('exit', (code, sig) => r({ code, sig })));
    const deadline = Date.now() + 20000;
    for (;;) {
      if (this.proc.exitCode !== null) throw new Error(`voxgate exited at start (code ${this.proc.exitCode}); see ${this.logFile}`);
      try {
        const r = await fetch(`http://127.0.0.1:${this.port}/readyz`);
        if (r.ok) return;
      } catch (_) { /* not up yet */ }
      if (Date.now() > deadline) throw new Error(`voxgate not ready within 20 s; see ${this.logFile}`);
      await sleep(50);
    }
  }

  async stop() {
    if (!this.proc || this.proc.exitCode !== null) return;
    this.proc.kill('SIGTERM');
    const r = await Promise.race([this.exited, sleep(20000).then(() => null)]);
    if (!r) { this.proc.kill('SIGKILL'); await this.exited; throw new Error('voxgate did not exit within 20 s of SIGTERM'); }
  }
}

// The gateway reads VOXGATE_* as configuration: it gets only the config file (and VOXGATE_LOG).
function gatewayEnv() {
  const env = { NO_COLOR: '1' };
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('VOXGATE_') || k === 'VOXGATE_LOG') env[k] = v;
  return env;
}

const stripAnsi = (s) => s.replace(/\x1b\[[0-9;]*m/g, '');
function logSince(file, offset) {
  const buf = fs.readFileSync(file);
  return { text: stripAnsi(buf.subarray(offset).toString('utf8')), end: buf.length };
}

module.exports = {
  ROOT, ART, BIN, CHROMIUM, SOURCE, CHROMIUM_FLAGS,
  sleep, stamp, say, wavSeconds, freePort, Gateway, logSince,
};
