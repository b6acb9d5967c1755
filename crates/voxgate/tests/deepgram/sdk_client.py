"""Streams a 16 kHz mono WAV to voxgate through Deepgram's official Python SDK (deepgram-sdk 7.x),
unmodified but for its environment (the base URL), and prints one JSON report on stdout: every
message the SDK parsed (type, is_final, speech_final, from_finalize, transcript), and whether the
SDK warned about a message it could not parse. Sends `Finalize` after FINALIZE_AT seconds of audio
and `CloseStream` at the end.

    python sdk_client.py ws://127.0.0.1:PORT KEY file.wav FINALIZE_AT [query=value ...]
"""

import asyncio
import json
import logging
import sys
import wave

from deepgram import AsyncDeepgramClient
from deepgram.core.events import EventType
from deepgram.environment import DeepgramClientEnvironment

WARNINGS = []


class Collect(logging.Handler):
    def emit(self, record):
        WARNINGS.append(record.getMessage())


logging.getLogger("deepgram").addHandler(Collect(level=logging.WARNING))


async def main():
    url, key, path, finalize_at = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    extra = dict(a.split("=", 1) for a in sys.argv[5:])
    http = url.replace("ws://", "http://")
    env = DeepgramClientEnvironment(base=http, production=url, agent=url, agent_rest=http)
    client = AsyncDeepgramClient(api_key=key, environment=env)
    with wave.open(path) as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1 and w.getsampwidth() == 2
        pcm = w.readframes(w.getnframes())
    got = []
    opts = dict(model="nova-3", encoding="linear16", sample_rate=16000, channels=1,
                interim_results="false", punctuate="true", smart_format="true")
    opts.update(extra)
    async with client.listen.v1.connect(**opts) as sock:
        sock.on(EventType.MESSAGE, got.append)
        listener = asyncio.create_task(sock.start_listening())
        step = 3200  # 100 ms
        finalized = False
        for i in range(0, len(pcm), step):
            await sock.send_media(pcm[i : i + step])
            if not finalized and i / 32000 >= finalize_at:
                await sock.send_finalize()
                finalized = True
            await asyncio.sleep(0.02)  # 5x real time
        await sock.send_close_stream()
        await asyncio.wait_for(listener, 60)
    out = []
    for m in got:
        d = {"type": getattr(m, "type", type(m).__name__)}
        for k in ("is_final", "speech_final", "from_finalize", "duration", "start"):
            if getattr(m, k, None) is not None:
                d[k] = getattr(m, k)
        ch = getattr(m, "channel", None)
        if d["type"] == "Results" and ch is not None:
            d["transcript"] = ch.alternatives[0].transcript
            d["request_id"] = m.metadata.request_id
        out.append(d)
    print(json.dumps({"messages": out, "sdk_warnings": WARNINGS}))


asyncio.run(main())
