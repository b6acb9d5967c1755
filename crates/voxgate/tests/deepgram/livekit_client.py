"""Runs LiveKit Agents' Deepgram plugin (livekit-plugins-deepgram 1.8, `deepgram.STT` in stream
mode, unmodified but for its base_url) against voxgate, without a room: `stt.stream()` gets a
16 kHz mono WAV as rtc.AudioFrame chunks of 20 ms at real time, then `flush()` (the plugin sends
Finalize, as the agent does at a turn's end) and `end_input()` (CloseStream). Prints one JSON
report on stdout: every SpeechEvent the stream yielded.

    python livekit_client.py http://127.0.0.1:PORT/v1/listen KEY file.wav
"""

import asyncio
import json
import sys
import time
import wave

import aiohttp
from livekit import rtc
from livekit.plugins import deepgram

CHUNK = 320  # samples: 20 ms at 16 kHz
T0 = time.monotonic()


def now():
    return round(time.monotonic() - T0, 3)


async def feed(stream, pcm):
    for i in range(0, len(pcm), CHUNK * 2):
        data = pcm[i : i + CHUNK * 2]
        stream.push_frame(rtc.AudioFrame(data, 16000, 1, len(data) // 2))
        await asyncio.sleep(0.02)
    silence = bytes(CHUNK * 2)
    for _ in range(25):  # 0.5 s of silence after the speech
        stream.push_frame(rtc.AudioFrame(silence, 16000, 1, CHUNK))
        await asyncio.sleep(0.02)
    stream.flush()
    stream.end_input()


async def main():
    url, key, path = sys.argv[1], sys.argv[2], sys.argv[3]
    with wave.open(path) as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1 and w.getsampwidth() == 2
        pcm = w.readframes(w.getnframes())
    events = []
    async with aiohttp.ClientSession() as session:
        stt = deepgram.STT(api_key=key, base_url=url, http_session=session)
        stream = stt.stream()
        feeder = asyncio.create_task(feed(stream, pcm))

        async def collect():
            async for ev in stream:
                alt = ev.alternatives[0] if ev.alternatives else None
                events.append({
                    "at": now(),
                    "type": ev.type.name,
                    "text": alt.text if alt else None,
                    "request_id": ev.request_id or None,
                })

        try:
            await asyncio.wait_for(collect(), 90)
            await feeder
            error = None
        except Exception as e:  # the report says what went wrong
            error = f"{type(e).__name__}: {e}"
        await stream.aclose()
    print(json.dumps({"events": events, "error": error}))


if __name__ == "__main__":
    asyncio.run(main())
