"""The manifest of the official weight files: what each file is, where it comes from and where it lives.

weights/manifest.json lists every file (URL or Hugging Face repo, md5, size) and which variant needs which.
Direct downloads land in ``<weights_dir>/<file>``, Hub files in ``<weights_dir>/hf/<repo>/<file>``.
"""

from __future__ import annotations

import functools
import json
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from huggingface_hub import hf_hub_url

DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "weights"
OFFICIAL_MANIFEST = DEFAULT_WEIGHTS_DIR / "manifest.json"
ALL_VARIANTS = "all"  # pseudo-variant: every file of every variant
HF_SUBDIR = "hf"


class WeightsError(RuntimeError):
    """Any problem with the weight files."""


@dataclass(frozen=True)
class FileSpec:
    """One official file: fetched from ``url``, or from ``hf_repo`` on the Hugging Face Hub."""

    id: str
    file: str
    what: str
    md5: str | None
    size: int | None
    url: str | None = None
    hf_repo: str | None = None
    revision: str = "main"

    @property
    def relpath(self) -> Path:
        """Location inside the weights folder."""
        if self.hf_repo is None:
            return Path(self.file)
        return Path(HF_SUBDIR, *self.hf_repo.split("/"), self.file)

    def source(self, base_url: str | None = None, hf_endpoint: str | None = None) -> str:
        """The URL the file comes from; ``base_url`` replaces the host and folder of direct downloads (mirrors)."""
        if self.hf_repo is not None:
            return hf_hub_url(self.hf_repo, self.file, revision=self.revision, endpoint=hf_endpoint)
        return f"{base_url.rstrip('/')}/{self.file}" if base_url else str(self.url)


@dataclass(frozen=True)
class VariantPaths:
    """Where the pipeline finds each checkpoint of one variant."""

    flow: Path
    vae: Path
    vocoder: Path
    synchformer: Path
    clip: Path
    clip_config: Path
    vocoder_config: Path | None = None  # BigVGAN-v2 config.json (44k); the 16k vocoder's config is built in


ROLES = frozenset(f.name for f in fields(VariantPaths))
REQUIRED_ROLES = frozenset(f.name for f in fields(VariantPaths) if f.default is MISSING)


@dataclass(frozen=True)
class WeightsManifest:
    files: dict[str, FileSpec]
    variants: dict[str, dict[str, str]]  # variant -> role (a VariantPaths field) -> file id

    @classmethod
    def load(cls, path: str | Path) -> WeightsManifest:
        raw = json.loads(Path(path).read_text())
        files = {file_id: _file_spec(file_id, entry) for file_id, entry in raw["files"].items()}
        variants: dict[str, dict[str, str]] = raw["variants"]
        for variant, roles in variants.items():
            problems = [f"missing role {r}" for r in sorted(REQUIRED_ROLES - set(roles))]
            problems += [f"unknown role {r}" for r in sorted(set(roles) - ROLES)]
            problems += [f"unknown file {f}" for f in roles.values() if f not in files]
            if problems:
                raise ValueError(f"{path}: variant {variant}: " + ", ".join(problems))
        return cls(files, variants)


def _file_spec(file_id: str, entry: dict[str, Any]) -> FileSpec:
    if ("url" in entry) == ("hf_repo" in entry):
        raise ValueError(f"manifest file {file_id} needs exactly one of 'url' and 'hf_repo'")
    return FileSpec(id=file_id, **entry)


@functools.cache
def official_manifest() -> WeightsManifest:
    return WeightsManifest.load(OFFICIAL_MANIFEST)


def files_for(variant: str, manifest: WeightsManifest | None = None) -> list[FileSpec]:
    """The files ``variant`` needs (every file for ``all``), in manifest order."""
    manifest = manifest or official_manifest()
    if variant == ALL_VARIANTS:
        return list(manifest.files.values())
    if variant not in manifest.variants:
        raise KeyError(f"unknown variant {variant!r}; known: {', '.join(manifest.variants)}")
    needed = set(manifest.variants[variant].values())
    return [spec for file_id, spec in manifest.files.items() if file_id in needed]


def paths_for(variant: str, weights_dir: str | Path, manifest: WeightsManifest | None = None) -> VariantPaths:
    """Where each checkpoint of ``variant`` lives under ``weights_dir`` (whether or not it is there yet)."""
    manifest = manifest or official_manifest()
    if variant not in manifest.variants:
        raise KeyError(f"unknown variant {variant!r}; known: {', '.join(manifest.variants)}")
    roles = manifest.variants[variant]
    return VariantPaths(**{role: Path(weights_dir) / manifest.files[fid].relpath for role, fid in roles.items()})
