"""Streams a 16 kHz mono WAV (resampled to the 24 kHz PCM OpenAI's API takes) to voxgate through
OpenAI's official Python SDK (`openai`, its realtime client), unmodified but for its base URLs,
and prints one JSON report on stdout: the type of every server event, and each completed
transcript. MODE `vad`: server VAD turns. MODE `commit`: `turn_detection: null`, the client
commits after COMMIT_AT seconds and at the end.

    python sdk_client.py http://127.0.0.1:PORT KEY file.wav MODE COMMIT_AT
"""

import asyncio
import base64
import json
import sys
import wave
from array import array

from openai import AsyncOpenAI


def to_24k(pcm16k: bytes) -> bytes:
    """Linear interpolation 16 kHz -> 24 kHz (3 samples out per 2 in)."""
    s = array("h", pcm16k)
    out = array("h")
    for i in range(0, len(s) - 2, 2):
        a, b, c = s[i], s[i + 1], s[i + 2]
        out.extend((a, round(a / 3 + 2 * b / 3), round(2 * b / 3 + c / 3)))
    return out.tobytes()


async def main():
    base, key, path, mode, commit_at = sys.argv[1:6]
    commit_at = float(commit_at)
    client = AsyncOpenAI(api_key=key, base_url=base + "/v1", websocket_base_url=base.replace("http", "ws", 1) + "/v1")
    with wave.open(path) as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1 and w.getsampwidth() == 2
        pcm = to_24k(w.readframes(w.getnframes()))
    pcm += bytes(24000 * 2)  # one second of silence after the speech
    turn = {"type": "server_vad", "silence_duration_ms": 500} if mode == "vad" else None
    events, completed, committed = [], [], []
    async with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
        await conn.session.update(session={
            "type": "transcription",
            "audio": {"input": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "transcription": {"model": "gpt-4o-transcribe", "language": "en"},
                "turn_detection": turn,
            }},
        })

        async def read():
            async for event in conn:
                events.append(event.type)
                if event.type == "input_audio_buffer.committed":
                    committed.append(event.item_id)
                if event.type == "conversation.item.input_audio_transcription.completed":
                    completed.append({"item_id": event.item_id, "transcript": event.transcript})
                if event.type == "error":
                    events.append("error:" + event.error.message)

        reader = asyncio.create_task(read())
        step = 4800  # 100 ms at 24 kHz
        committed_once = False
        for i in range(0, len(pcm), step):
            await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i : i + step]).decode())
            if mode == "commit" and not committed_once and i / 48000 >= commit_at:
                await conn.input_audio_buffer.commit()
                committed_once = True
            await asyncio.sleep(0.02)  # 5x real time
        if mode == "commit":
            await conn.input_audio_buffer.commit()
        # Done when every commit sent was acknowledged, every committed item completed, and
        # nothing new came for a second (server VAD may still be closing the last turn).
        commits = 2 if mode == "commit" else 1
        quiet = 0
        for _ in range(600):
            seen = len(events)
            await asyncio.sleep(0.1)
            settled = len(committed) >= commits and len(completed) >= len(committed)
            quiet = quiet + 1 if settled and len(events) == seen else 0
            if quiet >= 10:
                break
        reader.cancel()
    print(json.dumps({"events": events, "committed": committed, "completed": completed}))


asyncio.run(main())
