"""A finished job's files: stored by the worker, opened for download by the API.

The worker writes the requested format and FLAC, the lossless master (an mp4 cannot be remade later: the
upload is gone by then). The first download of another audio format (WAV, M4A) converts the master once and
stores the result next to it, for as long as the job's results live.
"""

from __future__ import annotations

import io
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch

from model.media import mux_video, write_audio
from service.jobs import JobRecord
from service.problems import ProblemError
from service.schemas import JobStatus, StoredResult
from service.storage import BlobStore, result_name

MASTER_FORMAT = "flac"
DOWNLOAD_AUDIO_FORMATS = ("flac", "wav", "m4a")  # every finished job offers these, converted on demand
MEDIA_TYPES = {"mp4": "video/mp4", "flac": "audio/flac", "wav": "audio/wav", "m4a": "audio/mp4"}


def available_formats(result: StoredResult) -> list[str]:
    """What a finished job can be downloaded as: what its worker wrote, and every audio format."""
    return list(dict.fromkeys([*result.formats, *DOWNLOAD_AUDIO_FORMATS]))


def read_audio(data: bytes) -> tuple[torch.Tensor, int]:
    """Decode an audio file to (channels, samples) float32 and its sample rate."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        rate = stream.rate
        resampler = av.AudioResampler(format="fltp", layout=stream.layout.name, rate=rate)
        planes = [chunk.to_ndarray() for frame in container.decode(stream) for chunk in resampler.resample(frame)]
        planes += [chunk.to_ndarray() for chunk in resampler.resample(None)]
    return torch.from_numpy(np.concatenate(planes, axis=1)), rate


@dataclass(frozen=True)
class OpenResult:
    """One stored result file, ready to be read (whole or a byte range)."""

    store: BlobStore
    name: str
    format: str
    size: int
    media_type: str
    filename: str  # what a download should be saved as

    def read(self, first: int = 0, last: int | None = None) -> Iterator[bytes]:
        return self.store.read(self.name, first, last)


class Results:
    def __init__(self, store: BlobStore) -> None:
        self.store = store

    def store_job(
        self,
        job_id: str,
        output_format: str,
        audio: torch.Tensor,
        sample_rate: int,
        duration: float,
        media: Path | None,
        ttl_seconds: int,
    ) -> StoredResult:
        """Write every sample of ``audio`` (samples, channels, time) in the output format and the master;
        returns the job's result record."""
        formats = list(dict.fromkeys([output_format, MASTER_FORMAT]))
        sizes = {}
        for sample in range(audio.shape[0]):
            one = audio[sample : sample + 1]
            for fmt in formats:
                # every file is written to disk and streamed from there into the store
                with tempfile.TemporaryDirectory(prefix="mmaudio-result-") as folder:
                    written = Path(folder) / f"out.{fmt}"
                    if fmt == "mp4":
                        assert media is not None
                        mux_video(media, one, sample_rate, written, duration)
                    else:
                        write_audio(written, one, sample_rate, fmt)
                    name = result_name(job_id, sample, fmt)
                    sizes[f"{sample}.{fmt}"] = self.store.put_file(name, written, ttl_seconds)
        return StoredResult(
            duration=duration,
            sample_rate=sample_rate,
            num_samples=audio.shape[0],
            formats=formats,
            sizes=sizes,
            ttl_seconds=ttl_seconds,
        )

    def open(self, record: JobRecord, fmt: str | None, sample: int) -> OpenResult:
        """Result ``fmt`` (default: the job's output format) of ``sample``, converted first if need be;
        raises ProblemError when the job has no such result (yet, or any more)."""
        if record.status is not JobStatus.succeeded:
            if record.status.terminal:
                raise ProblemError("result-unavailable", f"The job {record.status.value}; it has no result.")
            raise ProblemError("job-not-finished", f"The job is {record.status.value}.")
        assert record.result is not None
        fmt = fmt or record.params.output_format
        formats = available_formats(record.result)
        if fmt not in formats or sample >= record.result.num_samples:
            raise ProblemError(
                "result-unavailable",
                f"Formats: {', '.join(formats)}; samples 0 to {record.result.num_samples - 1}.",
            )
        name = result_name(record.id, sample, fmt)
        size = self.store.size(name)
        if size is None and fmt not in record.result.formats:
            size = self._convert(record, sample, fmt)
        if size is None:
            raise ProblemError("result-unavailable", "The result has expired.")
        stem = Path(record.input.filename or f"mmaudio-{record.id[:8]}").stem
        return OpenResult(self.store, name, fmt, size, MEDIA_TYPES[fmt], f"{stem}-{sample}.{fmt}")

    def _convert(self, record: JobRecord, sample: int, fmt: str) -> int | None:
        """Write ``fmt`` of ``sample`` from the master; returns its size, None if the master is gone."""
        assert record.result is not None and record.finished_at is not None
        master = b"".join(self.store.read(result_name(record.id, sample, MASTER_FORMAT)))
        if not master:
            return None
        audio, rate = read_audio(master)
        buffer = io.BytesIO()
        write_audio(buffer, audio, rate, fmt)
        ttl = int(record.finished_at + record.result.ttl_seconds - time.time())
        if ttl <= 0:
            return None
        self.store.put_bytes(result_name(record.id, sample, fmt), buffer.getvalue(), ttl)
        return buffer.tell()
