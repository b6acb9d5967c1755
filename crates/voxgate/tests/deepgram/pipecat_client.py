"""Runs Pipecat's DeepgramSTTService (pipecat-ai 1.14, unmodified but for its base_url) against
voxgate: a minimal pipeline [tap, DeepgramSTTService, tap] run by Pipecat's own WorkerRunner, fed
a 16 kHz mono WAV as InputAudioRawFrame chunks of 20 ms at real time, with the frames a VAD would
emit around the speech (VADUserStartedSpeakingFrame, then VADUserStoppedSpeakingFrame after it,
on which the service sends Finalize and waits for a `from_finalize` answer). Prints one JSON
report on stdout: the transcription frames (with Pipecat's `finalized` mark) and errors the
pipeline saw, and whether the service's Finalize was answered.

    python pipecat_client.py ws://127.0.0.1:PORT KEY file.wav
"""

import asyncio
import json
import sys
import time
import wave

from pipecat.frames.frames import (
    EndFrame,
    ErrorFrame,
    InputAudioRawFrame,
    InterimTranscriptionFrame,
    TranscriptionFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.deepgram.stt import DeepgramSTTService
from pipecat.workers.runner import WorkerRunner

CHUNK = 640  # 20 ms of 16 kHz s16le mono
REPORT = {"finals": [], "interims": [], "errors": []}
T0 = time.monotonic()


def now():
    return round(time.monotonic() - T0, 3)


class Tap(FrameProcessor):
    """Records transcription frames (downstream of the service) and errors (pushed upstream)."""

    async def process_frame(self, frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, TranscriptionFrame):
            # finalized: Pipecat matched it to its Finalize (a from_finalize final).
            REPORT["finals"].append({"at": now(), "text": frame.text, "finalized": frame.finalized})
        elif isinstance(frame, InterimTranscriptionFrame):
            REPORT["interims"].append({"at": now(), "text": frame.text})
        elif isinstance(frame, ErrorFrame):
            REPORT["errors"].append({"at": now(), "error": str(frame.error)})
        await self.push_frame(frame, direction)


async def wait_for(pred, timeout):
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return pred()


async def feed(worker, stt, pcm):
    """Audio as a transport would deliver it, with the VAD frames around the speech."""
    await asyncio.sleep(0.5)  # the StartFrame reaches the service, which connects
    await worker.queue_frame(VADUserStartedSpeakingFrame())
    for i in range(0, len(pcm), CHUNK):
        await worker.queue_frame(InputAudioRawFrame(audio=pcm[i : i + CHUNK], sample_rate=16000, num_channels=1))
        await asyncio.sleep(0.02)
    silence = bytes(CHUNK)
    for _ in range(25):  # 0.5 s of silence, as a VAD's stop_secs
        await worker.queue_frame(InputAudioRawFrame(audio=silence, sample_rate=16000, num_channels=1))
        await asyncio.sleep(0.02)
    REPORT["vad_stopped_at"] = now()
    await worker.queue_frame(VADUserStoppedSpeakingFrame(stop_secs=0.5))
    # The server answers Finalize with a from_finalize final: the transcript still due, or an
    # empty one when it was sent already (which the service takes without pushing a frame).
    await wait_for(lambda: "finalize_confirmed_at" in REPORT and REPORT["finals"], 60)
    await worker.queue_frame(EndFrame())


def spy(stt, method, key):
    """Records when the service calls one of its own methods (which then runs as it is)."""
    original = getattr(stt, method)

    def recorded(*args, **kwargs):
        REPORT.setdefault(key, now())
        return original(*args, **kwargs)

    setattr(stt, method, recorded)


async def main():
    url, key, path = sys.argv[1], sys.argv[2], sys.argv[3]
    with wave.open(path) as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1 and w.getsampwidth() == 2
        pcm = w.readframes(w.getnframes())
    stt = DeepgramSTTService(api_key=key, base_url=url)
    # Finalize sent (on the VAD stop), and its from_finalize answer received.
    spy(stt, "request_finalize", "finalize_requested_at")
    spy(stt, "confirm_finalize", "finalize_confirmed_at")
    worker = PipelineWorker(
        Pipeline([Tap(), stt, Tap()]),
        params=PipelineParams(audio_in_sample_rate=16000),
        idle_timeout_secs=None,
    )
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await asyncio.wait_for(asyncio.gather(runner.run(), feed(worker, stt, pcm)), 150)
    print(json.dumps(REPORT))


if __name__ == "__main__":
    asyncio.run(main())
