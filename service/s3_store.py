"""The S3 backend of the blob store: uploads and results as objects of an S3-compatible bucket (boto3).

Files go up through boto3's managed transfer: from `s3_part_bytes` on as a multipart upload whose parts are
read from the file as they are sent, so no blob is ever whole in memory; reads are ranged GETs relayed in
chunks. S3 has no per-object TTL, so expiry times live in Redis (ExpiryIndex) and `sweep()` deletes expired
objects. A writer killed mid-upload leaves an unfinished multipart upload behind (invisible, but billed): each
writer keeps a progress mark in Redis while its bytes move, and `sweep()` aborts the uploads under our prefix
whose mark (or, for uploads it never saw, whose initiation) is older than `s3_stale_upload_seconds`.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError
from redis import Redis

from service import keys
from service.settings import Settings
from service.storage import CHUNK_BYTES, ExpiryIndex

MISSING = {"404", "NoSuchKey", "NotFound"}
DELETE_BATCH = 1000  # most keys one DeleteObjects request takes
PARTS_IN_FLIGHT = 4  # parallel part transfers (and ranged GETs of a download) of one file
MARK_EVERY_SECONDS = 1.0  # how often a writer refreshes its progress mark while bytes move


def _missing(err: ClientError) -> bool:
    return err.response.get("Error", {}).get("Code") in MISSING


class S3Store:
    def __init__(self, settings: Settings, redis: Redis) -> None:
        assert settings.s3_bucket is not None
        self.bucket = settings.s3_bucket
        self.prefix = settings.s3_prefix
        self.redis = redis
        self.expiry = ExpiryIndex(redis, keys.S3_EXPIRY)
        self.redirect = settings.s3_download == "redirect"
        self.presign_seconds = settings.s3_presign_seconds
        self.stale_seconds = settings.s3_stale_upload_seconds
        self._next_stale_scan = 0.0
        # SigV4 for presigned URLs too (SigV2 is gone from newer regions); checksums only where S3 requires them:
        # several S3-compatible stores refuse boto3's newer default ones.
        config = Config(
            signature_version="s3v4",
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region, config=config
        )
        self.transfer = TransferConfig(
            multipart_threshold=settings.s3_part_bytes,
            multipart_chunksize=settings.s3_part_bytes,
            max_concurrency=PARTS_IN_FLIGHT,
        )

    def _key(self, name: str) -> str:
        return self.prefix + name

    @contextmanager
    def _writing(self, name: str) -> Iterator[Callable[[int], None]]:
        """A progress mark for ``name`` while the block runs; yields the transfer's progress callback."""
        last = [time.time()]
        self.redis.zadd(keys.S3_WRITES, {name: last[0]})
        lock = threading.Lock()

        def progressed(_bytes: int) -> None:
            now = time.time()
            with lock:  # called from the transfer's threads
                if now - last[0] < MARK_EVERY_SECONDS:
                    return
                last[0] = now
            self.redis.zadd(keys.S3_WRITES, {name: now})

        try:
            yield progressed
        finally:
            self.redis.zrem(keys.S3_WRITES, name)

    def put_file(self, name: str, path: Path, ttl_seconds: int) -> int:
        # The expiry is known before the first byte: an object whose writer dies after completing it still goes.
        self.expiry.expire_at(name, ttl_seconds)
        with self._writing(name) as progressed:
            self.client.upload_file(str(path), self.bucket, self._key(name), Config=self.transfer, Callback=progressed)
        return path.stat().st_size

    def put_bytes(self, name: str, data: bytes, ttl_seconds: int) -> None:
        self.expiry.expire_at(name, ttl_seconds)
        self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data)

    def size(self, name: str) -> int | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(name))["ContentLength"]
        except ClientError as err:
            if _missing(err):
                return None
            raise

    def read(self, name: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        if end is not None and end < start:
            return
        request = {"Bucket": self.bucket, "Key": self._key(name)}
        if start or end is not None:  # a whole read sends no Range: "bytes=0-" of an empty object is a 416
            request["Range"] = f"bytes={start}-{'' if end is None else end}"
        try:
            body = self.client.get_object(**request)["Body"]
        except ClientError as err:
            if _missing(err):  # expired or deleted
                return
            raise
        with closing(body):
            yield from body.iter_chunks(CHUNK_BYTES)

    @contextmanager
    def local_path(self, name: str, suffix: str = "") -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="mmaudio-") as folder:
            path = Path(folder) / f"blob{suffix}"
            self.client.download_file(self.bucket, self._key(name), str(path), Config=self.transfer)
            yield path

    def delete(self, *names: str) -> None:
        for first in range(0, len(names), DELETE_BATCH):
            batch = [{"Key": self._key(name)} for name in names[first : first + DELETE_BATCH]]
            reply = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            if reply.get("Errors"):  # kept in the expiry index: the next sweep tries again
                raise RuntimeError(f"S3 refused to delete {len(reply['Errors'])} objects: {reply['Errors'][0]}")
        self.expiry.forget(*names)

    def download_url(self, name: str, disposition: str, media_type: str) -> str | None:
        if not self.redirect:
            return None
        params = {
            "Bucket": self.bucket,
            "Key": self._key(name),
            "ResponseContentDisposition": disposition,
            "ResponseContentType": media_type,
        }
        return self.client.generate_presigned_url("get_object", Params=params, ExpiresIn=self.presign_seconds)

    def sweep(self) -> int:
        expired = self.expiry.expired()
        self.delete(*expired)
        aborted = 0
        if time.monotonic() >= self._next_stale_scan:
            # one listing per half bound is enough: a stale upload waits at most 1.5 bounds
            self._next_stale_scan = time.monotonic() + min(self.stale_seconds / 2, 60.0)
            aborted = self.abort_stale_uploads()
        return len(expired) + aborted

    def abort_stale_uploads(self) -> int:
        """Abort the unfinished multipart uploads under the prefix whose writer made no progress for the bound;
        returns how many."""
        cutoff = time.time() - self.stale_seconds
        marks = {name.decode(): seen for name, seen in self.redis.zrange(keys.S3_WRITES, 0, -1, withscores=True)}
        aborted = 0
        for page in self.client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.bucket, Prefix=self.prefix
        ):
            for upload in page.get("Uploads", []):
                name = upload["Key"].removeprefix(self.prefix)
                if marks.get(name, upload["Initiated"].timestamp()) >= cutoff:
                    continue
                try:
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
                except ClientError as err:
                    if err.response.get("Error", {}).get("Code") != "NoSuchUpload":  # another API aborted it first
                        raise
                aborted += 1
        self.redis.zremrangebyscore(keys.S3_WRITES, "-inf", cutoff)  # marks of writers that died
        return aborted
