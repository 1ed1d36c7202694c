"""The container files: no Docker engine runs here, so lint the Dockerfile and check the compose structure."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_non_root_on_cuda_without_weights() -> None:
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    assert lines[next(i for i, line in enumerate(lines) if line.startswith("FROM"))].startswith("FROM nvidia/cuda:")
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    copies = " ".join(line for line in lines if line.startswith("COPY"))
    assert ".pth" not in copies and "weights/manifest.json" in copies  # the manifest, never weight files
    assert any(line.startswith("VOLUME") and "/weights" in line for line in lines)


def test_redis_keeps_an_append_only_file(compose: dict) -> None:
    redis = compose["services"]["redis"]
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert any(str(v).endswith(":/data") for v in redis["volumes"])


def test_api_and_workers_share_redis_and_workers_reserve_gpus(compose: dict) -> None:
    services = compose["services"]
    api, worker = services["api"], services["worker"]
    assert (
        api["environment"]["MMAUDIO_REDIS_URL"] == worker["environment"]["MMAUDIO_REDIS_URL"] == "redis://redis:6379/0"
    )
    assert "8000:8000" in api["ports"]
    assert worker["command"][-1] == "service.worker"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert "weights:/weights" in worker["volumes"]
    assert "weights" in compose["volumes"]
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
