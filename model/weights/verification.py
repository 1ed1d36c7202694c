"""Integrity of the weight files on disk: presence, size and md5 (cached beside each file)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from model.weights.manifest import FileSpec, WeightsError, WeightsManifest, files_for

CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class MissingFile:
    spec: FileSpec
    path: Path
    reason: str
    source: str


class WeightsMissingError(WeightsError):
    """Files absent or unusable; the message says, for each, what to download and where to put it."""

    def __init__(self, variant: str, weights_dir: Path, missing: list[MissingFile]) -> None:
        self.variant, self.weights_dir, self.missing = variant, weights_dir, missing
        lines = [f"{len(missing)} weight file(s) for {variant} missing or unusable in {weights_dir}:"]
        for item in missing:
            hub = f" (Hugging Face repo {item.spec.hf_repo}, file {item.spec.file})" if item.spec.hf_repo else ""
            md5 = f" (md5 {item.spec.md5})" if item.spec.md5 else ""
            lines += [
                f"  {item.spec.relpath}: {item.reason}",
                f"    download {item.source}{hub}",
                f"    into     {item.path}{md5}",
            ]
        lines.append(f"or run: python -m model.weights download {variant} --dir {weights_dir}")
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class FileCheck:
    spec: FileSpec
    path: Path
    size: int | None  # bytes on disk, None when absent
    md5: str | None  # None when not computed
    problem: str | None  # None when the file is present and matches the manifest

    @property
    def ok(self) -> bool:
        return self.problem is None


@dataclass(frozen=True)
class VerifyReport:
    variant: str
    weights_dir: Path
    checks: list[FileCheck]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def raise_for_problems(self) -> None:
        missing = [MissingFile(c.spec, c.path, str(c.problem), c.spec.source()) for c in self.checks if not c.ok]
        if missing:
            raise WeightsMissingError(self.variant, self.weights_dir, missing)

    def format(self) -> str:
        return "\n".join(
            f"{'OK ' if c.ok else 'BAD'} {c.spec.relpath}" + (f": {c.problem}" if c.problem else "")
            for c in self.checks
        )


def verify(
    variant: str,
    weights_dir: str | Path,
    *,
    check_md5: bool = True,
    manifest: WeightsManifest | None = None,
    progress: type[tqdm] | None = tqdm,
) -> VerifyReport:
    """Check presence, size and (where the manifest has one, unless ``check_md5`` is off) md5 of every file."""
    weights_dir = Path(weights_dir)
    checks = [
        check_file(spec, weights_dir / spec.relpath, check_md5, progress) for spec in files_for(variant, manifest)
    ]
    return VerifyReport(variant, weights_dir, checks)


def check_file(spec: FileSpec, path: Path, check_md5: bool, progress: type[tqdm] | None) -> FileCheck:
    if not path.is_file():
        part = part_path(path)
        resumable = f" ({part.stat().st_size} bytes already in {part.name})" if part.is_file() else ""
        return FileCheck(spec, path, None, None, "not found" + resumable)
    size = path.stat().st_size
    if spec.size is not None and size != spec.size:
        return FileCheck(spec, path, size, None, f"{size} bytes, expected {spec.size}")
    if not (check_md5 and spec.md5):
        return FileCheck(spec, path, size, None, None)
    md5 = cached_md5(path, progress)
    problem = None if md5 == spec.md5 else f"md5 {md5}, expected {spec.md5}"
    return FileCheck(spec, path, size, md5, problem)


def part_path(path: Path) -> Path:
    return path.with_name(path.name + ".part")


def _md5_sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".md5")


def cached_md5(path: Path, progress: type[tqdm] | None = None) -> str:
    """md5 of ``path``, remembered in ``<path>.md5`` for as long as the file keeps its size and mtime."""
    stat = path.stat()
    try:
        cached = json.loads(_md5_sidecar(path).read_text())
        if cached["size"] == stat.st_size and cached["mtime_ns"] == stat.st_mtime_ns:
            return cached["md5"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = hashlib.md5()
    with progress_bar(progress, f"md5 {path.name}", stat.st_size, 0) as bar, path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
            bar.update(len(chunk))
    write_md5_sidecar(path, digest.hexdigest())
    return digest.hexdigest()


def write_md5_sidecar(path: Path, md5: str) -> None:
    stat = path.stat()
    sidecar = _md5_sidecar(path)
    tmp = sidecar.with_name(f"{sidecar.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "md5": md5}))
        os.replace(tmp, sidecar)
    except OSError:  # a read-only weights volume still verifies, just without the cache
        tmp.unlink(missing_ok=True)


def progress_bar(progress: type[tqdm] | None, desc: str, total: int | None, initial: int) -> tqdm:
    bar_class = progress or tqdm
    return bar_class(
        desc=desc, total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, disable=progress is None
    )
