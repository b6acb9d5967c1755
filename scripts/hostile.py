#!/usr/bin/env python3
"""Hostile clients for the soak in `scripts/soak-hostile`: every attack of the security review at
once, against a gateway on 127.0.0.1, for a bounded time. Standard library only.

Each attack runs in its own task group from its own loopback source address (127.0.0.2 and up), so
per-IP limits see the attackers and not the honest sessions on 127.0.0.1. Prints one JSON report:
per attack, what was attempted and how the gateway answered (refused, closed by the server after
how long, with which close codes).

    hostile.py --port 19200 --duration 300 --token-secret S --tarpit-port 19202
"""

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import os
import random
import socket
import struct
import time
from collections import Counter, defaultdict

REPORT = defaultdict(Counter)
CLOSE_AFTER = defaultdict(list)


def b64url(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def jwt(secret, sub, ttl=3600):
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    now = int(time.time())
    body = b64url(json.dumps({"sub": sub, "aud": "voxgate", "exp": now + ttl, "iat": now}).encode())
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(sig)}"


def frame(opcode, payload=b"", fin=True):
    """One masked client frame."""
    head = bytearray([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head.append(0x80 | n)
    elif n < 65536:
        head.append(0x80 | 126)
        head += struct.pack(">H", n)
    else:
        head.append(0x80 | 127)
        head += struct.pack(">Q", n)
    mask = os.urandom(4)
    head += mask
    # Masking with a zero key would be cheaper, but a real client masks.
    body = bytes(b ^ mask[i & 3] for i, b in enumerate(payload)) if n < 4096 else _mask_big(payload, mask)
    return bytes(head) + body


def _mask_big(payload, mask):
    key = int.from_bytes(mask * ((len(payload) + 3) // 4), "little")
    val = int.from_bytes(payload + b"\0" * (-len(payload) % 4), "little")
    return (val ^ key).to_bytes(len(payload) + (-len(payload) % 4), "little")[: len(payload)]


async def tcp(args, src, rcvbuf=None):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((src, 0))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", args.port)), 5)
    return await asyncio.open_connection(sock=sock)


async def ws(args, src, path, headers=(), rcvbuf=None):
    """Upgrade; returns (reader, writer) or raises with the HTTP status line."""
    r, w = await tcp(args, src, rcvbuf)
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: 127.0.0.1:{args.port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *headers,
    ]
    w.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await w.drain()
    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
    status = head.split(b"\r\n", 1)[0].decode(errors="replace")
    if " 101 " not in status:
        w.close()
        raise ConnectionRefusedError(status)
    return r, w


async def read_frames(r, on_text=None):
    """Reads server frames until close; returns the close code (or None on EOF)."""
    while True:
        h = await r.readexactly(2)
        op, n = h[0] & 0x0F, h[1] & 0x7F
        if n == 126:
            n = struct.unpack(">H", await r.readexactly(2))[0]
        elif n == 127:
            n = struct.unpack(">Q", await r.readexactly(8))[0]
        data = await r.readexactly(n)
        if op == 8:
            return struct.unpack(">H", data[:2])[0] if len(data) >= 2 else 1005
        if op == 1 and on_text:
            on_text(data)


async def session(args, name, src, path, sender, headers=(), rcvbuf=None, read=True):
    """One attacking WebSocket: upgrade, run `sender(writer)` beside a reader, record the outcome."""
    t0 = time.monotonic()
    try:
        r, w = await ws(args, src, path, headers, rcvbuf)
    except ConnectionRefusedError as e:
        REPORT[name]["refused " + str(e).split(" ", 2)[1] if " " in str(e) else "refused"] += 1
        return
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
        REPORT[name]["connect failed: " + type(e).__name__] += 1
        return
    REPORT[name]["upgraded"] += 1
    send = asyncio.create_task(sender(w))
    try:
        if read:
            code = await asyncio.wait_for(read_frames(r), args.deadline - time.monotonic())
        else:
            code = await asyncio.wait_for(_eof(r, w), args.deadline - time.monotonic())
        REPORT[name][f"closed {code}"] += 1
        CLOSE_AFTER[name].append(time.monotonic() - t0)
    except asyncio.TimeoutError:
        REPORT[name]["still open at the end"] += 1
    except (OSError, asyncio.IncompleteReadError):
        REPORT[name]["reset"] += 1
        CLOSE_AFTER[name].append(time.monotonic() - t0)
    finally:
        send.cancel()
        w.close()


async def _eof(r, w):
    """Never reads frames: waits until the server has closed the TCP connection. The kernel
    buffer stays full (tiny SO_RCVBUF), so we only learn of the close from a failing write."""
    while True:
        await asyncio.sleep(1)
        if w.transport.is_closing():
            return "eof"
        try:
            w.write(frame(9, b"x"))
            await asyncio.wait_for(w.drain(), 0.5)
        except asyncio.TimeoutError:
            continue
        except OSError:
            return "eof"


def pace(rate):
    return 1.0 / rate


async def forever(args, name, src, make, spacing=0.5):
    """Runs `make()` sessions back to back until the deadline."""
    while time.monotonic() < args.deadline - 1:
        await make()
        await asyncio.sleep(spacing)


# --- attacks -------------------------------------------------------------------------------------


async def idle_tcp(args, src):
    """A TCP connection that sends nothing: the header-read deadline must close it."""
    while time.monotonic() < args.deadline - 1:
        t0 = time.monotonic()
        try:
            r, w = await tcp(args, src)
        except (OSError, asyncio.TimeoutError):
            REPORT["idle"]["connect failed"] += 1
            await asyncio.sleep(1)
            continue
        REPORT["idle"]["opened"] += 1
        try:
            data = await asyncio.wait_for(r.read(1 << 16), args.deadline - time.monotonic())
            REPORT["idle"]["closed by server" if not data else "answered"] += 1
            CLOSE_AFTER["idle"].append(time.monotonic() - t0)
        except asyncio.TimeoutError:
            REPORT["idle"]["still open at the end"] += 1
        except OSError:
            REPORT["idle"]["reset"] += 1
            CLOSE_AFTER["idle"].append(time.monotonic() - t0)
        w.close()


async def slowloris(args, src, big=False):
    """An upgrade whose headers never end: one header line every 5 s, or one 400 KB header."""
    name = "big_header" if big else "slowloris"
    while time.monotonic() < args.deadline - 1:
        t0 = time.monotonic()
        try:
            r, w = await tcp(args, src)
        except (OSError, asyncio.TimeoutError):
            REPORT[name]["connect failed"] += 1
            await asyncio.sleep(1)
            continue
        REPORT[name]["opened"] += 1

        async def drip():
            w.write(b"GET /v1/listen HTTP/1.1\r\nHost: x\r\n")
            if big:
                w.write(b"X-Pad: " + b"a" * 400_000)
            while True:
                await w.drain()
                await asyncio.sleep(5)
                w.write(b"X-Slow: 1\r\n" if not big else b"a")

        d = asyncio.create_task(drip())
        try:
            data = await asyncio.wait_for(r.read(1 << 16), args.deadline - time.monotonic())
            REPORT[name]["closed by server" if not data else "answered " + data[:12].decode(errors="replace")] += 1
            CLOSE_AFTER[name].append(time.monotonic() - t0)
        except asyncio.TimeoutError:
            REPORT[name]["still open at the end"] += 1
        except OSError:
            REPORT[name]["reset"] += 1
            CLOSE_AFTER[name].append(time.monotonic() - t0)
        d.cancel()
        w.close()


async def amp_device(args, src, tok):
    """Device Opus with sequence headers: 7-byte silence packets whose sequence jumps by 51."""

    async def send(w):
        seq = 1
        while True:
            w.write(frame(2, struct.pack(">I", seq) + b"\xf8\xff\xfe"))
            seq = (seq + 51) & 0xFFFFFFFF
            await w.drain()
            await asyncio.sleep(pace(args.rate))

    path = f"/v1/listen?encoding=opus&sample_rate=16000&seq=1&frame_ms=120&token={tok}"
    await forever(args, "amp_device", src, lambda: session(args, "amp_device", src, path, send))


def twilio_start(tok, sid):
    return json.dumps({
        "event": "start",
        "start": {
            "streamSid": sid, "callSid": "CA" + sid,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": {"token": tok},
        },
    }).encode()


async def amp_twilio(args, src, tok):
    """Twilio media of 3 payload bytes whose timestamps jump by 10 s, then one at u64::MAX."""

    async def send(w):
        w.write(frame(1, b'{"event":"connected"}'))
        w.write(frame(1, twilio_start(tok, "MZ" + os.urandom(6).hex())))
        ts = 0
        for i in range(10**9):
            ts = ts + 10_000 if i % 50 else 18446744073709551615
            m = {"event": "media", "media": {"track": "inbound", "timestamp": str(ts),
                                             "payload": base64.b64encode(b"\xff\xff\xff").decode()}}
            w.write(frame(1, json.dumps(m).encode()))
            await w.drain()
            await asyncio.sleep(pace(args.rate))

    path = f"/v1/twilio?token={tok}"
    await forever(args, "amp_twilio", src, lambda: session(args, "amp_twilio", src, path, send))


async def twilio_prestart(args, src):
    """/v1/twilio without a token: `connected` every 4 s, then unknown events, never `start`."""

    async def send(w):
        for i in range(10**9):
            w.write(frame(1, b'{"event":"connected"}' if i % 100 else b'{"event":"x\\nforged"}'))
            await w.drain()
            await asyncio.sleep(4 if i < 5 else pace(args.rate))

    await forever(args, "twilio_prestart", src, lambda: session(args, "twilio_prestart", src, "/v1/twilio", send))


async def amp_omi(args, src, tok, uid):
    """Omi `101` audio frames of 16 PCM bytes whose capture time jumps by 11 s."""

    async def send(w):
        ts = 1.0e9
        while True:
            w.write(frame(2, struct.pack("<Id", 101, ts) + b"\0" * 16))
            ts += 11.0
            await w.drain()
            await asyncio.sleep(pace(args.rate))

    path = f"/v1/trigger/listen?uid={uid}&sample_rate=16000&token={tok}"
    await forever(args, "amp_omi", src, lambda: session(args, "amp_omi", src, path, send))


async def omi_json(args, src, tok, uid):
    """Omi `102` transcript frames of 1 MB of JSON, against a transcript webhook that hangs."""
    blob = json.dumps([list(range(150_000))]).encode()  # about 1 MB of numbers

    async def send(w):
        while True:
            w.write(frame(2, struct.pack("<I", 102) + blob))
            await w.drain()
            await asyncio.sleep(0.5)

    path = f"/v1/trigger/listen?uid={uid}&sample_rate=16000&token={tok}"
    await forever(args, "omi_json", src, lambda: session(args, "omi_json", src, path, send))


async def never_read(args, src, tok):
    """Sends bad control messages fast with a 2 KB receive buffer and never reads a byte."""

    async def send(w):
        while True:
            w.write(frame(1, b'{"type":"X"}'))
            await w.drain()
            await asyncio.sleep(pace(args.rate))

    path = f"/v1/listen?token={tok}"
    await forever(args, "never_read", src,
                  lambda: session(args, "never_read", src, path, send, rcvbuf=2048, read=False))


async def pings(args, src, tok):
    """Ping frames as fast as the socket takes them."""

    async def send(w):
        while True:
            for _ in range(100):
                w.write(frame(9, b"p" * 100))
            await w.drain()
            await asyncio.sleep(0.01)

    path = f"/v1/listen?token={tok}"
    await forever(args, "pings", src, lambda: session(args, "pings", src, path, send))


async def sub_big(args, src, tok):
    """Opens its own session, subscribes to it and sends a 60 MiB message in 15 MiB fragments."""
    sid = "mal-" + os.urandom(4).hex()

    async def keep(w):
        while True:
            await asyncio.sleep(3)
            w.write(frame(1, b'{"type":"KeepAlive"}'))
            await w.drain()

    async def big(w):
        part = b"z" * (15 << 20)
        for i in range(4):
            w.write(frame(0 if i else 2, part, fin=(i == 3)))
            await w.drain()
        while True:
            await asyncio.sleep(10)

    owner = asyncio.create_task(session(
        args, "sub_big_owner", src, f"/v1/listen?session_id={sid}&encoding=linear16&token={tok}", keep))
    await asyncio.sleep(1)
    await forever(args, "sub_big", src,
                  lambda: session(args, "sub_big", src, f"/v1/sessions/{sid}/subscribe?token={tok}", big), 10)
    owner.cancel()


async def forged_resume(args, src, tok):
    """Forged drained-session states and guessed resume tokens, 10 per second."""

    async def nothing(w):
        await asyncio.sleep(3600)

    i = 0
    while time.monotonic() < args.deadline - 1:
        i += 1
        forged = b64url(os.urandom(120)) + "." + b64url(os.urandom(32))
        path = (f"/v1/listen?resume_state={forged}&token={tok}" if i % 2
                else f"/v1/listen?resume=s-{i}&resume_token={os.urandom(16).hex()}")
        asyncio.create_task(session(args, "forged_resume", src, path, nothing))
        await asyncio.sleep(0.1)


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--duration", type=float, default=300)
    ap.add_argument("--token-secret", required=True)
    ap.add_argument("--idle", type=int, default=2000, help="idle TCP connections (all source IPs)")
    ap.add_argument("--slow", type=int, default=200)
    ap.add_argument("--big", type=int, default=50)
    ap.add_argument("--per-attack", type=int, default=4, help="sockets per message attack")
    ap.add_argument("--rate", type=float, default=200, help="messages per second per attacking socket")
    args = ap.parse_args()
    args.deadline = time.monotonic() + args.duration
    srcs = [f"127.0.0.{i}" for i in range(2, 34)]
    tasks = []
    for i in range(args.idle):
        tasks.append(idle_tcp(args, srcs[i % 8]))
    for i in range(args.slow):
        tasks.append(slowloris(args, srcs[8 + i % 4]))
    for i in range(args.big):
        tasks.append(slowloris(args, srcs[12 + i % 2], big=True))
    attacks = [amp_device, amp_twilio, amp_omi, omi_json, never_read, pings, sub_big, forged_resume]
    for a_i, attack in enumerate(attacks):
        for k in range(args.per_attack):
            user = f"mallory-{a_i}-{k}"
            tok = jwt(args.token_secret, user)
            src = srcs[14 + a_i]
            if attack in (amp_omi, omi_json):
                tasks.append(attack(args, src, tok, user))
            else:
                tasks.append(attack(args, src, tok))
    tasks.append(twilio_prestart(args, srcs[30]))
    random.shuffle(tasks)
    await asyncio.gather(*tasks, return_exceptions=True)
    out = {}
    for name, c in sorted(REPORT.items()):
        after = sorted(CLOSE_AFTER.get(name, []))
        out[name] = dict(c)
        if after:
            out[name]["closed_after_s"] = {
                "p50": round(after[len(after) // 2], 2),
                "max": round(after[-1], 2),
            }
    print(json.dumps(out, indent=1, sort_keys=True))


if __name__ == "__main__":
    asyncio.run(main())
