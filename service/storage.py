"""Blob storage shared by the API and the workers: uploads and results.

Three backends with one interface. RedisStore keeps each blob as a Redis string with a TTL, so API and
workers share nothing but Redis. FileStore keeps blobs on a volume every process mounts; S3Store
(service/s3_store.py) keeps them in an S3-compatible bucket. The last two cannot expire blobs by themselves:
their expiry times live in Redis (an ExpiryIndex) and `sweep()` (run by the API's maintenance loop) deletes
what has expired. Blob names are relative paths such as ``uploads/<job>`` or ``results/<job>/0.mp4``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Protocol

from redis import Redis

from service import keys
from service.settings import Settings

CHUNK_BYTES = 1 << 20


class BlobStore(Protocol):
    def put_file(self, name: str, path: Path, ttl_seconds: int) -> int:
        """Store the file at ``path`` under ``name``; returns its size."""

    def put_bytes(self, name: str, data: bytes, ttl_seconds: int) -> None: ...

    def size(self, name: str) -> int | None:
        """Size in bytes, None when absent or expired."""

    def read(self, name: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """The bytes from ``start`` to ``end`` inclusive (to the end when None), in chunks."""

    def local_path(self, name: str, suffix: str = "") -> AbstractContextManager[Path]:
        """A local file with the blob's content, valid inside the block."""

    def delete(self, *names: str) -> None: ...

    def download_url(self, name: str, disposition: str, media_type: str) -> str | None:
        """A URL a client may fetch the blob from directly (a redirect target), or None: stream it."""

    def sweep(self) -> int:
        """Delete expired blobs the backend cannot expire by itself; returns how many."""


def upload_name(job_id: str) -> str:
    return f"uploads/{job_id}"


def result_name(job_id: str, sample: int, fmt: str) -> str:
    return f"results/{job_id}/{sample}.{fmt}"


class RedisStore:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    def put_file(self, name: str, path: Path, ttl_seconds: int) -> int:
        # Appending chunk by chunk keeps memory flat for large uploads; the key only appears under its real
        # name once complete, so a reader never sees half a file.
        staging = keys.blob(f"{name}.partial")
        size = 0
        self.redis.delete(staging)
        with path.open("rb") as source:
            while chunk := source.read(CHUNK_BYTES * 4):
                self.redis.append(staging, chunk)
                size += len(chunk)
        if size == 0:
            self.redis.set(staging, b"")
        with self.redis.pipeline() as pipe:
            pipe.rename(staging, keys.blob(name))
            pipe.expire(keys.blob(name), ttl_seconds)
            pipe.execute()
        return size

    def put_bytes(self, name: str, data: bytes, ttl_seconds: int) -> None:
        self.redis.set(keys.blob(name), data, ex=ttl_seconds)

    def size(self, name: str) -> int | None:
        with self.redis.pipeline() as pipe:
            pipe.exists(keys.blob(name))
            pipe.strlen(keys.blob(name))
            exists, length = pipe.execute()
        return length if exists else None

    def read(self, name: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        key = keys.blob(name)
        last = self.redis.strlen(key) - 1 if end is None else end
        position = start
        while position <= last:
            stop = min(position + CHUNK_BYTES, last + 1)
            chunk = self.redis.getrange(key, position, stop - 1)
            if not chunk:  # expired or deleted while streaming
                return
            yield chunk
            position += len(chunk)

    @contextmanager
    def local_path(self, name: str, suffix: str = "") -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="mmaudio-") as folder:
            path = Path(folder) / f"blob{suffix}"
            with path.open("wb") as out:
                for chunk in self.read(name):
                    out.write(chunk)
            yield path

    def delete(self, *names: str) -> None:
        if names:
            self.redis.delete(*(keys.blob(name) for name in names))

    def download_url(self, name: str, disposition: str, media_type: str) -> str | None:
        return None

    def sweep(self) -> int:
        return 0  # Redis expires the blobs itself


class ExpiryIndex:
    """When each blob of a store without expiry of its own expires: a Redis sorted set, name -> unix time."""

    def __init__(self, redis: Redis, key: str) -> None:
        self.redis = redis
        self.key = key

    def expire_at(self, name: str, ttl_seconds: int) -> None:
        self.redis.zadd(self.key, {name: time.time() + ttl_seconds})

    def forget(self, *names: str) -> None:
        if names:
            self.redis.zrem(self.key, *names)

    def expired(self) -> list[str]:
        return [name.decode() for name in self.redis.zrangebyscore(self.key, "-inf", time.time())]


class FileStore:
    def __init__(self, root: Path, redis: Redis) -> None:
        self.root = root
        self.expiry = ExpiryIndex(redis, keys.FILE_EXPIRY)

    def _path(self, name: str) -> Path:
        path = (self.root / name).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"blob name {name!r} leaves the store")
        return path

    def put_file(self, name: str, path: Path, ttl_seconds: int) -> int:
        target = self._path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.{os.getpid()}.partial")
        shutil.copyfile(path, staging)
        os.replace(staging, target)
        self.expiry.expire_at(name, ttl_seconds)
        return target.stat().st_size

    def put_bytes(self, name: str, data: bytes, ttl_seconds: int) -> None:
        target = self._path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.{os.getpid()}.partial")
        staging.write_bytes(data)
        os.replace(staging, target)
        self.expiry.expire_at(name, ttl_seconds)

    def size(self, name: str) -> int | None:
        try:
            return self._path(name).stat().st_size
        except FileNotFoundError:
            return None

    def read(self, name: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        try:
            handle = self._path(name).open("rb")
        except FileNotFoundError:
            return
        with handle:
            handle.seek(start)
            remaining = None if end is None else end - start + 1
            while remaining is None or remaining > 0:
                chunk = handle.read(CHUNK_BYTES if remaining is None else min(CHUNK_BYTES, remaining))
                if not chunk:
                    return
                yield chunk
                if remaining is not None:
                    remaining -= len(chunk)

    @contextmanager
    def local_path(self, name: str, suffix: str = "") -> Iterator[Path]:
        # The shared volume is already local; a link gives the decoder the suffix it may want.
        with tempfile.TemporaryDirectory(prefix="mmaudio-") as folder:
            link = Path(folder) / f"blob{suffix}"
            link.symlink_to(self._path(name))
            yield link

    def delete(self, *names: str) -> None:
        for name in names:
            self._path(name).unlink(missing_ok=True)
        self.expiry.forget(*names)

    def download_url(self, name: str, disposition: str, media_type: str) -> str | None:
        return None

    def sweep(self) -> int:
        expired = self.expiry.expired()
        self.delete(*expired)
        for folder in {self._path(name).parent for name in expired}:
            if folder != self.root.resolve() and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        return len(expired)


def make_store(settings: Settings, redis: Redis) -> BlobStore:
    if settings.storage == "s3":
        from service.s3_store import S3Store  # boto3 is imported only by deployments that use it

        return S3Store(settings, redis)
    if settings.storage == "filesystem":
        settings.storage_dir.mkdir(parents=True, exist_ok=True)
        return FileStore(settings.storage_dir, redis)
    return RedisStore(redis)
