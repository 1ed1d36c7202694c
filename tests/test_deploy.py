"""The container files: no Docker engine runs here, so lint the Dockerfile and check the compose structure; the
Kubernetes manifests of deploy/ against the Kubernetes schemas (kubernetes-validate, offline) and each other."""

import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from service import queue
from service.settings import Settings

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


# --- Kubernetes manifests (deploy/) ------------------------------------------------------------------------------

KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")  # an older supported release and the newest schemas bundled
# kubernetes-validate bundles the core API schemas only. KEDA's CRDs are checked against this schema of the
# fields we use (from KEDA 2.x's ScaledObject and TriggerAuthentication specs): required fields, types, and
# no unknown field, so a misspelt key fails here rather than being ignored by the cluster.
NAME = {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}


def keda_resource(spec: dict) -> dict:
    """Schema of a keda.sh/v1alpha1 resource with a name and this ``spec``."""
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "metadata": {"type": "object", "required": ["name"], "properties": {"name": NAME}},
            "spec": spec,
        },
    }


KEDA_SCHEMAS = {
    "ScaledObject": keda_resource(
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": {"name": NAME, "kind": {"type": "string"}, "apiVersion": {"type": "string"}},
                },
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["type", "metadata"],
                        "properties": {
                            "type": {"const": "redis"},
                            "metadata": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["address", "listName", "listLength"],
                                "properties": {
                                    "address": {"type": "string", "pattern": "^[^:/]+:[0-9]+$"},
                                    "listName": {"type": "string"},
                                    "listLength": {"type": "string", "pattern": "^[1-9][0-9]*$"},
                                    "activationListLength": {"type": "string", "pattern": "^[0-9]+$"},
                                    "enableTLS": {"enum": ["true", "false"]},
                                    "databaseIndex": {"type": "string", "pattern": "^[0-9]+$"},
                                },
                            },
                            "authenticationRef": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["name"],
                                "properties": {"name": NAME},
                            },
                        },
                    },
                },
            },
        },
    ),
    "TriggerAuthentication": keda_resource(
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["secretTargetRef"],
            "properties": {
                "secretTargetRef": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["parameter", "name", "key"],
                        "properties": {
                            "parameter": {"enum": ["username", "password", "ca", "cert", "key", "tls"]},
                            "name": NAME,
                            "key": {"type": "string"},
                        },
                    },
                }
            },
        },
    ),
}


@pytest.fixture(scope="module")
def manifests() -> dict[tuple[str, str], dict]:
    """Every resource of deploy/, by (kind, name)."""
    resources = {}
    for path in sorted((ROOT / "deploy").glob("*.yaml")):
        for resource in yaml.safe_load_all(path.read_text()):
            resources[(resource["kind"], resource["metadata"]["name"])] = resource
    return resources


def test_manifests_pass_the_kubernetes_schemas(manifests: dict[tuple[str, str], dict]) -> None:
    checked = set()
    for (kind, _), resource in manifests.items():
        if resource["apiVersion"].startswith("keda.sh/"):
            jsonschema.validate(resource, KEDA_SCHEMAS[kind])
        else:
            for version in KUBERNETES_VERSIONS:
                kubernetes_validate.validate(resource, version, strict=True)
        checked.add(kind)
    assert checked == {
        "ConfigMap",
        "Deployment",
        "Service",
        "PersistentVolumeClaim",
        "ScaledObject",
        "TriggerAuthentication",
    }
    broken = {**manifests[("Deployment", "mmaudio-worker")], "spec": {"replicas": "two"}}
    with pytest.raises(kubernetes_validate.ValidationError):  # the validator does refuse a bad resource
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_workers_autoscale_on_the_queue_list_and_the_pieces_fit(manifests: dict[tuple[str, str], dict]) -> None:

    config = manifests[("ConfigMap", "mmaudio-config")]["data"]
    assert all(name.removeprefix("MMAUDIO_").lower() in Settings.model_fields for name in config)  # no typo
    settings = Settings(
        _env_file=None, **{name.removeprefix("MMAUDIO_").lower(): value for name, value in config.items()}
    )
    scaled = manifests[("ScaledObject", "mmaudio-worker-large-44k-v2")]["spec"]
    trigger = scaled["triggers"][0]
    assert trigger["metadata"]["listName"] == queue.list_key(settings.variant)
    assert urlsplit(settings.redis_url).netloc == trigger["metadata"]["address"]
    assert (urlsplit(settings.redis_url).scheme == "rediss") == (trigger["metadata"]["enableTLS"] == "true")
    assert ("TriggerAuthentication", trigger["authenticationRef"]["name"]) in manifests
    assert scaled["minReplicaCount"] == 0 and ("Deployment", scaled["scaleTargetRef"]["name"]) in manifests

    worker = manifests[("Deployment", scaled["scaleTargetRef"]["name"])]["spec"]["template"]["spec"]
    api = manifests[("Deployment", "mmaudio-api")]["spec"]["template"]["spec"]
    (gpu_worker,) = worker["containers"]
    assert gpu_worker["command"][-1] == "service.worker"
    assert gpu_worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["terminationGracePeriodSeconds"] > settings.job_timeout_seconds  # a batch ends before the kill
    assert api["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/healthz"  # ready with zero workers
    for spec in (worker, api):  # the secret files the settings name are mounted where they say
        mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
        for path in (settings.redis_password_file, settings.redis_tls_ca_file):
            volume = mounts[str(path.parent)]
            secret = next(v["secret"]["secretName"] for v in spec["volumes"] if v["name"] == volume)
            auth = manifests[("TriggerAuthentication", trigger["authenticationRef"]["name"])]["spec"]
            assert {ref["name"] for ref in auth["secretTargetRef"]} == {secret}
            assert path.name in {ref["key"] for ref in auth["secretTargetRef"]}
