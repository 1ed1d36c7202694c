"""Resumable, verified downloads of the official weight files, and the command line:

    python -m model.weights list
    python -m model.weights verify large_44k_v2 [--dir weights] [--quick]
    python -m model.weights download large_44k_v2 [--dir weights]
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download
from tqdm import tqdm

from model.weights.manifest import (
    ALL_VARIANTS,
    DEFAULT_WEIGHTS_DIR,
    HF_SUBDIR,
    OFFICIAL_MANIFEST,
    FileSpec,
    WeightsError,
    WeightsManifest,
)
from model.weights.verification import (
    CHUNK_BYTES,
    MissingFile,
    VerifyReport,
    WeightsMissingError,
    check_file,
    part_path,
    progress_bar,
    verify,
    write_md5_sidecar,
)

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class WeightsDownloadError(WeightsError):
    """One file could not be downloaded intact."""


def download(
    variant: str,
    weights_dir: str | Path,
    *,
    manifest: WeightsManifest | None = None,
    base_url: str | None = None,
    hf_endpoint: str | None = None,
    offline: bool = False,
    timeout_s: float = 30.0,
    retries: int = 3,
    backoff_s: float = 1.0,
    progress: type[tqdm] | None = tqdm,
) -> VerifyReport:
    """Fetch every file of ``variant`` that is absent or fails verification; return the final report.

    Direct files stream into ``<file>.part`` (resumed with an HTTP Range request after a dropped connection or
    in a later run) and are renamed into place only once their md5 matches. Hub files go through
    huggingface_hub. ``offline`` (or HF_HUB_OFFLINE) forbids all network access. Whatever cannot be fetched is
    raised together as one WeightsMissingError.
    """
    weights_dir = Path(weights_dir)
    report = verify(variant, weights_dir, manifest=manifest, progress=progress)
    if report.ok:
        return report
    offline = offline or hf_constants.is_offline_mode()
    missing: list[MissingFile] = []
    with httpx.Client(follow_redirects=True, timeout=timeout_s) as client:
        for check in report.checks:
            if check.ok:
                continue
            spec, dest = check.spec, check.path
            source = spec.source(base_url, hf_endpoint)
            if offline:
                missing.append(MissingFile(spec, dest, f"{check.problem}; offline, so not downloaded", source))
                continue
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                with _exclusive(dest):
                    if check_file(spec, dest, True, progress).ok:  # another process finished it meanwhile
                        continue
                    if spec.hf_repo is None:
                        _fetch_direct(spec, dest, source, client, retries, backoff_s, progress)
                    else:
                        _fetch_hub(spec, dest, weights_dir, hf_endpoint, timeout_s, progress)
            except (WeightsDownloadError, OSError, httpx.HTTPError) as err:  # report every file, not just the first
                missing.append(MissingFile(spec, dest, str(err), source))
    if missing:
        raise WeightsMissingError(variant, weights_dir, missing)
    return verify(variant, weights_dir, manifest=manifest, progress=progress)


@contextmanager
def _exclusive(dest: Path) -> Iterator[None]:
    """Hold ``<dest>.lock`` so that workers sharing a weights volume never write the same .part at once."""
    with dest.with_name(dest.name + ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


class _TransientError(Exception):
    """A failure worth retrying: the next attempt resumes where this one stopped."""


class _Partial:
    """A ``.part`` file and the running md5 of its bytes, so a resume never re-reads what is already there."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.md5 = hashlib.md5()
        self.size = 0
        if path.is_file():
            with path.open("rb") as handle:
                while chunk := handle.read(CHUNK_BYTES):
                    self.md5.update(chunk)
                    self.size += len(chunk)

    def restart(self) -> None:
        self.path.write_bytes(b"")
        self.md5, self.size = hashlib.md5(), 0

    def append(self, response: httpx.Response, bar: tqdm) -> None:
        with self.path.open("ab") as out:
            for chunk in response.iter_bytes():  # unbuffered: bytes received before a drop still reach the disk
                out.write(chunk)
                self.md5.update(chunk)
                self.size += len(chunk)
                bar.update(len(chunk))


def _fetch_direct(
    spec: FileSpec,
    dest: Path,
    url: str,
    client: httpx.Client,
    retries: int,
    backoff_s: float,
    progress: type[tqdm] | None,
) -> None:
    part = _Partial(part_path(dest))
    failures = 0  # consecutive attempts that added no bytes
    while True:
        size_before = part.size
        try:
            _stream_once(spec, url, client, part, progress)
            break
        except (httpx.TransportError, _TransientError) as err:
            failures = 0 if part.size > size_before else failures + 1
            if failures > retries:
                raise WeightsDownloadError(
                    f"{url}: {err} ({retries} retries without progress); "
                    f"{part.size} bytes kept in {part.path}, the next run resumes from there"
                ) from err
            time.sleep(backoff_s * 2 ** max(failures - 1, 0))
    md5 = part.md5.hexdigest()
    if spec.md5 is not None and md5 != spec.md5:
        problem = f"md5 {md5}, expected {spec.md5}"
    elif spec.size is not None and part.size != spec.size:
        problem = f"{part.size} bytes, expected {spec.size}"
    else:
        os.replace(part.path, dest)
        write_md5_sidecar(dest, md5)
        return
    part.path.unlink()
    raise WeightsDownloadError(f"download from {url} is corrupt ({problem}); deleted it, run again to start over")


def _stream_once(spec: FileSpec, url: str, client: httpx.Client, part: _Partial, progress: type[tqdm] | None) -> None:
    headers = {"Accept-Encoding": "identity"}  # byte ranges and md5 refer to the file as stored
    if part.size:
        headers["Range"] = f"bytes={part.size}-"
    with client.stream("GET", url, headers=headers) as response:
        if response.status_code == 416 and part.size:  # nothing past our last byte: the .part is already whole
            return
        if response.status_code in RETRY_STATUSES:
            raise _TransientError(f"HTTP {response.status_code}")
        if response.status_code not in (200, 206):
            raise WeightsDownloadError(f"{url}: HTTP {response.status_code}")
        if response.status_code == 200 and part.size:  # the server ignored the Range: take the whole body
            part.restart()
        total = _total_size(response, part.size)
        if spec.size is not None and total is not None and total != spec.size:
            raise WeightsDownloadError(f"{url} serves {total} bytes, the manifest expects {spec.size}")
        with progress_bar(progress, spec.file, total, part.size) as bar:
            part.append(response, bar)
    if total is not None and part.size < total:  # a close-delimited body cut short raises nothing in httpx
        raise _TransientError(f"connection closed at byte {part.size} of {total}")


def _total_size(response: httpx.Response, offset: int) -> int | None:
    """Full file size from Content-Range (206) or Content-Length (200); None if the server does not say."""
    if response.status_code == 206:
        content_range = response.headers.get("content-range", "")
        match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", content_range)
        if match is None or int(match[1]) != offset:
            raise WeightsDownloadError(f"answer to a resume from byte {offset} has Content-Range {content_range!r}")
        return None if match[2] == "*" else int(match[2])
    length = response.headers.get("content-length")
    return int(length) if length is not None else None


def _fetch_hub(
    spec: FileSpec,
    dest: Path,
    weights_dir: Path,
    hf_endpoint: str | None,
    timeout_s: float,
    progress: type[tqdm] | None,
) -> None:
    assert spec.hf_repo is not None
    # A present but wrong file would be kept by huggingface_hub while its download metadata still matches.
    dest.unlink(missing_ok=True)
    try:
        hf_hub_download(
            spec.hf_repo,
            spec.file,
            revision=spec.revision,
            local_dir=weights_dir / HF_SUBDIR / spec.hf_repo,
            endpoint=hf_endpoint,
            etag_timeout=timeout_s,
            tqdm_class=progress,
        )
    except (OSError, httpx.HTTPError) as err:  # the hub's own errors are OSErrors
        raise WeightsDownloadError(f"Hugging Face {spec.hf_repo}/{spec.file}: {type(err).__name__}: {err}") from err
    size = dest.stat().st_size
    if spec.size is not None and size != spec.size:
        dest.unlink()
        raise WeightsDownloadError(f"Hugging Face {spec.hf_repo}/{spec.file} has {size} bytes, expected {spec.size}")


def _human_size(size: int | None) -> str:
    if size is None:
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"


def format_table(manifest: WeightsManifest) -> str:
    """One line per file: location, size, md5, source and the variants that need it."""
    users = {
        file_id: [v for v, roles in manifest.variants.items() if file_id in roles.values()]
        for file_id in manifest.files
    }
    rows = [("path", "size", "md5", "variants", "source")]
    rows += [
        (str(s.relpath), _human_size(s.size), s.md5 or "-", ",".join(users[s.id]) or "-", s.source())
        for s in manifest.files.values()
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]  # the last column is not padded
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(row, widths, strict=False)), row[-1]]) for row in rows)


def main(argv: list[str] | None = None) -> int:
    description = "The official weight files: list, verify, download."
    parser = argparse.ArgumentParser(prog="python -m model.weights", description=description)
    parser.add_argument("--manifest", type=Path, default=OFFICIAL_MANIFEST)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="print every file, its size, md5, source and the variants that need it")
    verify_cmd = commands.add_parser("verify", help="check presence, size and md5 of a variant's files")
    download_cmd = commands.add_parser("download", help="fetch whatever a variant is missing, then verify")
    for cmd in (verify_cmd, download_cmd):
        cmd.add_argument("variant", help=f"a variant name or '{ALL_VARIANTS}'")
        cmd.add_argument("--dir", type=Path, default=DEFAULT_WEIGHTS_DIR, help="weights folder")
    verify_cmd.add_argument("--quick", action="store_true", help="presence and size only, no md5")
    download_cmd.add_argument("--base-url", help="mirror serving the direct files flat by name")
    download_cmd.add_argument("--timeout", type=float, default=30.0, help="network timeout in seconds")
    download_cmd.add_argument("--retries", type=int, default=3, help="retries of an attempt that made no progress")
    args = parser.parse_args(argv)

    manifest = WeightsManifest.load(args.manifest)
    if args.command == "list":
        print(format_table(manifest))
        return 0
    try:
        if args.command == "verify":
            report = verify(args.variant, args.dir, check_md5=not args.quick, manifest=manifest)
        else:
            report = download(
                args.variant,
                args.dir,
                manifest=manifest,
                base_url=args.base_url,
                timeout_s=args.timeout,
                retries=args.retries,
            )
    except (WeightsError, KeyError) as err:
        print(err.args[0] if isinstance(err, KeyError) else err, file=sys.stderr)
        return 1
    print(report.format())
    return 0 if report.ok else 1
