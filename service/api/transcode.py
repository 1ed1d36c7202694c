"""Audio formats made on demand: the first download of a WAV or M4A converts the job's FLAC master once and
stores the result next to it, for as long as the job's results live."""

from __future__ import annotations

import io
import time

import av
import numpy as np
import torch

from model.media import write_audio
from service.jobs import JobRecord
from service.schemas import MASTER_FORMAT
from service.storage import BlobStore, result_name


def read_audio(data: bytes) -> tuple[torch.Tensor, int]:
    """Decode an audio file to (channels, samples) float32 and its sample rate."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        rate = stream.rate
        resampler = av.AudioResampler(format="fltp", layout=stream.layout.name, rate=rate)
        planes = [chunk.to_ndarray() for frame in container.decode(stream) for chunk in resampler.resample(frame)]
        planes += [chunk.to_ndarray() for chunk in resampler.resample(None)]
    return torch.from_numpy(np.concatenate(planes, axis=1)), rate


def convert_result(store: BlobStore, record: JobRecord, sample: int, fmt: str) -> int | None:
    """Write result ``fmt`` of ``sample`` from the FLAC master; returns its size, None if the master is gone."""
    assert record.result is not None and record.finished_at is not None
    master = b"".join(store.read(result_name(record.id, sample, MASTER_FORMAT)))
    if not master:
        return None
    audio, rate = read_audio(master)
    buffer = io.BytesIO()
    write_audio(buffer, audio, rate, fmt)
    ttl = int(record.finished_at + record.result["ttl_seconds"] - time.time())
    if ttl <= 0:
        return None
    store.put_bytes(result_name(record.id, sample, fmt), buffer.getvalue(), ttl)
    return buffer.tell()
