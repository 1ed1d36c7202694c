"""Managed Redis: a real redis-server that speaks only TLS and requires a password, reached through the one
client factory (service.connection) with the password read from a file, and the whole service (API and a
worker) running a job over ``rediss://``. The test makes its own CA and server certificate."""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from redis.exceptions import AuthenticationError, ConnectionError, ResponseError
from service_harness import CLIENT_TIMEOUT, QUICK, REDIS_SERVER, WAIT, make_stack, wait_for_status, wait_until

from model.testkit import free_port
from service.connection import connect
from service.settings import Settings

PASSWORD = "s3cret-managed-redis-password"
SETTINGS = {
    "MMAUDIO_WEIGHTS": "tiny",
    "MMAUDIO_VARIANT": "small_16k",
    "MMAUDIO_WORKER_HEARTBEAT_SECONDS": "0.5",
    "MMAUDIO_WORKER_TTL_SECONDS": "2",
}


@dataclass(frozen=True)
class TlsRedis:
    url: str  # rediss://, no password in it
    ca: Path
    password_file: Path


def write_pem(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate it signs for 127.0.0.1 and localhost: (CA, server certificate, server key)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mmaudio test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    names = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(names, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return (
        write_pem(folder / "ca.pem", ca.public_bytes(serialization.Encoding.PEM)),
        write_pem(folder / "server.pem", server.public_bytes(serialization.Encoding.PEM)),
        write_pem(folder / "server.key", key_pem),
    )


def tls_answers(port: int, ca: Path) -> bool:
    try:
        return connect(Settings(_env_file=None, redis_url=f"rediss://127.0.0.1:{port}", redis_tls_ca_file=ca)).ping()
    except AuthenticationError:
        return True  # it answers; it wants the password
    except ConnectionError:
        return False


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    if not shutil.which(REDIS_SERVER) and not Path(REDIS_SERVER).exists():
        pytest.fail("redis-server is not installed")
    folder = tmp_path_factory.mktemp("tls-redis")
    ca, certificate, key = make_certificates(folder)
    password_file = folder / "redis-password"
    password_file.write_text(PASSWORD + "\n")  # as secret mounts and `echo` write it
    port = free_port()
    command = [REDIS_SERVER, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--dir", str(folder)]
    command += ["--tls-cert-file", str(certificate), "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca)]
    command += ["--tls-auth-clients", "no", "--requirepass", PASSWORD, "--save", "", "--appendonly", "no"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        wait_until(lambda: tls_answers(port, ca), 20, "the TLS redis-server")
        yield TlsRedis(f"rediss://127.0.0.1:{port}", ca, password_file)
    finally:
        process.terminate()
        process.wait(10)


def test_the_client_factory_reads_the_password_file_and_verifies_the_server(tls_redis: TlsRedis) -> None:
    settings = Settings(
        _env_file=None,
        redis_url=tls_redis.url,
        redis_password_file=tls_redis.password_file,
        redis_tls_ca_file=tls_redis.ca,
    )
    client = connect(settings)
    client.set("mmaudio-tls-check", "over TLS")
    assert client.get("mmaudio-tls-check") == b"over TLS"
    assert client.connection_pool.connection_kwargs["password"] == PASSWORD  # without the file's newline

    with pytest.raises((AuthenticationError, ResponseError)):  # the server requires the password
        connect(Settings(_env_file=None, redis_url=tls_redis.url, redis_tls_ca_file=tls_redis.ca)).ping()
    with pytest.raises(ConnectionError) as refused:  # a certificate signed by a CA we were not told to trust
        connect(Settings(_env_file=None, redis_url=tls_redis.url, redis_password_file=tls_redis.password_file)).ping()
    assert isinstance(refused.value.__context__, ssl.SSLCertVerificationError) or "certificate" in str(refused.value)
    plain = tls_redis.url.replace("rediss://", "redis://")
    with pytest.raises(ValueError, match="rediss://"):
        connect(Settings(_env_file=None, redis_url=plain, redis_tls_ca_file=tls_redis.ca))


def test_api_and_worker_run_a_job_over_tls_with_a_password_file(tls_redis: TlsRedis, tmp_path: Path) -> None:
    settings = SETTINGS | {
        "MMAUDIO_REDIS_PASSWORD_FILE": str(tls_redis.password_file),
        "MMAUDIO_REDIS_TLS_CA_FILE": str(tls_redis.ca),
    }
    with (
        make_stack(tls_redis.url, tmp_path, "tls", 0, settings).running(1) as stack,
        httpx.Client(base_url=stack.url, timeout=CLIENT_TIMEOUT) as client,
    ):
        job = client.post("/v1/jobs", json=QUICK, headers=WAIT).json()
        done = wait_for_status(client, job["id"], {"succeeded", "failed"})
        assert done["status"] == "succeeded", done["error"]
        assert client.get(done["links"]["result"]).status_code == 200
