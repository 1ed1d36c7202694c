"""Weights manifest, downloader and verifier, against a real HTTP server on 127.0.0.1 serving files made here."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from model.weights.downloader import download, main
from model.weights.manifest import HF_SUBDIR, WeightsManifest, files_for, official_manifest, paths_for
from model.weights.verification import WeightsMissingError, verify

REPO_ROOT = Path(__file__).resolve().parent.parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"
FAST = {"retries": 2, "backoff_s": 0.01, "timeout_s": 5.0, "progress": None}


@dataclass
class Fault:
    drop_after: int = 0  # close the connection after sending this many body bytes ...
    drops_left: int = 0  # ... in this many responses
    short_by: int = 0  # every body stops this many bytes before the announced end
    ignore_range: bool = False


@dataclass
class FileServer:
    url: str = ""
    files: dict[str, bytes] = field(default_factory=dict)  # URL path -> body
    faults: dict[str, Fault] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Range header)

    def ranges(self, path: str) -> list[str | None]:
        return [rng for method, p, rng in self.requests if method == "GET" and p == path]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ThreadingHTTPServer

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def do_GET(self) -> None:
        self._serve(send_body=True)

    def _serve(self, send_body: bool) -> None:
        state: FileServer = self.server.state  # type: ignore[attr-defined]
        requested_range = self.headers.get("Range")
        state.requests.append((self.command, self.path, requested_range))
        body = state.files.get(self.path)
        fault = state.faults.get(self.path, Fault())
        if body is None:
            self._reply(404, {"Content-Length": "0"})
            return
        start = 0
        if requested_range and not fault.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", requested_range)[1])
            if start >= len(body):
                self._reply(416, {"Content-Range": f"bytes */{len(body)}", "Content-Length": "0"})
                return
            self._reply(206, {"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"}, len(body) - start)
        else:
            self._reply(200, {}, len(body))
        if not send_body:
            return
        end = len(body) - fault.short_by
        if fault.drops_left:
            fault.drops_left -= 1
            end = min(end, start + fault.drop_after)
        self.wfile.write(body[start:end])
        if end < len(body):
            self.close_connection = True  # the client sees fewer bytes than Content-Length

    def _reply(self, status: int, headers: dict[str, str], length: int | None = None) -> None:
        self.send_response(status)
        all_headers = {**headers, "ETag": '"etag-1"', "X-Repo-Commit": COMMIT}
        if length is not None:
            all_headers["Content-Length"] = str(length)
        for name, value in all_headers.items():
            self.send_header(name, value)
        self.end_headers()


@pytest.fixture
def server() -> Iterator[FileServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    state = FileServer(url=f"http://127.0.0.1:{httpd.server_address[1]}")
    httpd.state = state  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def _blob(size: int, seed: int) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (size // 32) + b"x" * (size % 32)


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _manifest(tmp_path: Path, files: dict[str, dict]) -> WeightsManifest:
    """A one-variant manifest 'tiny' over the given files; roles are filled in order."""
    roles = ["flow", "vae", "vocoder", "synchformer", "clip", "clip_config", "vocoder_config"]
    variant = {role: file_id for role, file_id in zip(roles, files, strict=False)}
    for role in roles[len(files) : 6]:  # every required role must name some file
        variant[role] = next(iter(files))
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"files": files, "variants": {"tiny": variant}}))
    return WeightsManifest.load(path)


def _direct(name: str, data: bytes, server: FileServer, *, size: bool = True, md5: str | None = None) -> dict:
    server.files[f"/files/{name}"] = data
    return {
        "what": name,
        "file": name,
        "url": f"{server.url}/files/{name}",
        "md5": md5 or _md5(data),
        "size": len(data) if size else None,
    }


# ---------------------------------------------------------------- the official manifest


def test_official_manifest_names_each_variants_files() -> None:
    expected_flow = {
        "small_16k": "mmaudio_small_16k.pth",
        "small_44k": "mmaudio_small_44k.pth",
        "medium_44k": "mmaudio_medium_44k.pth",
        "large_44k": "mmaudio_large_44k.pth",
        "large_44k_v2": "mmaudio_large_44k_v2.pth",
    }
    manifest = official_manifest()
    assert set(manifest.variants) == set(expected_flow)
    clip = {"hf/apple/DFN5B-CLIP-ViT-H-14-384/open_clip_pytorch_model.bin"}
    clip |= {"hf/apple/DFN5B-CLIP-ViT-H-14-384/open_clip_config.json"}
    for variant, flow in expected_flow.items():
        names = {str(spec.relpath) for spec in files_for(variant)}
        if variant == "small_16k":
            rest = {"v1-16.pth", "best_netG.pt"}
        else:
            bigvgan = "hf/nvidia/bigvgan_v2_44khz_128band_512x"
            rest = {"v1-44.pth", f"{bigvgan}/bigvgan_generator.pt", f"{bigvgan}/config.json"}
        assert names == {flow, "synchformer_state_dict.pth", *clip, *rest}, variant
    for spec in files_for("all"):
        assert (spec.url is None) != (spec.hf_repo is None)
        if spec.url is not None:
            assert re.fullmatch(r"[0-9a-f]{32}", spec.md5 or ""), spec.id
            assert spec.url.endswith("/" + spec.file)
    sizes = {spec.file: spec.size for spec in files_for("all") if spec.size is not None}
    assert sizes == {
        "v1-16.pth": 686652758,
        "best_netG.pt": 449217313,
        "synchformer_state_dict.pth": 950058171,
        "open_clip_pytorch_model.bin": 3947081637,
    }


def test_paths_for_uses_the_documented_layout(tmp_path: Path) -> None:
    v2 = paths_for("large_44k_v2", tmp_path)
    assert v2.flow == tmp_path / "mmaudio_large_44k_v2.pth"
    assert v2.vae == tmp_path / "v1-44.pth"
    assert v2.synchformer == tmp_path / "synchformer_state_dict.pth"
    bigvgan = tmp_path / HF_SUBDIR / "nvidia" / "bigvgan_v2_44khz_128band_512x"
    assert (v2.vocoder, v2.vocoder_config) == (bigvgan / "bigvgan_generator.pt", bigvgan / "config.json")
    clip = tmp_path / HF_SUBDIR / "apple" / "DFN5B-CLIP-ViT-H-14-384"
    assert (v2.clip, v2.clip_config) == (clip / "open_clip_pytorch_model.bin", clip / "open_clip_config.json")
    small = paths_for("small_16k", tmp_path)
    assert (small.vocoder, small.vocoder_config) == (tmp_path / "best_netG.pt", None)
    with pytest.raises(KeyError, match="small_16k"):
        paths_for("tiny_8k", tmp_path)


def test_manifest_with_a_variant_lacking_a_role_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    spec = {"what": "x", "file": "x.pth", "url": "http://h/x.pth", "md5": None, "size": None}
    path.write_text(json.dumps({"files": {"x": spec}, "variants": {"v": {"flow": "x", "vea": "x"}}}))
    with pytest.raises(ValueError, match=r"missing role vae.*unknown role vea"):
        WeightsManifest.load(path)


def test_present_hub_files_are_found_by_paths_for_and_verify(tmp_path: Path) -> None:
    paths = paths_for("small_44k", tmp_path)
    for hub_file in (paths.vocoder, paths.vocoder_config, paths.clip, paths.clip_config):
        hub_file.parent.mkdir(parents=True, exist_ok=True)
        hub_file.write_bytes(b"{}")
    with paths.clip.open("r+b") as handle:  # sparse: the published 3.9 GB size without writing it
        handle.truncate(3947081637)
    report = verify("small_44k", tmp_path, progress=None)
    by_path = {check.path: check for check in report.checks}
    assert all(by_path[p].ok for p in (paths.vocoder, paths.vocoder_config, paths.clip, paths.clip_config))
    assert [c.path for c in report.checks if not c.ok] == [paths.flow, paths.vae, paths.synchformer]
    with pytest.raises(WeightsMissingError) as caught:
        report.raise_for_problems()
    assert [item.path for item in caught.value.missing] == [paths.flow, paths.vae, paths.synchformer]
    assert "download https://github.com/hkchengrex/MMAudio/releases/download/v0.1/v1-44.pth" in str(caught.value)
    assert f"into     {paths.vae} (md5 fab020275fa44c6589820ce025191600)" in str(caught.value)
    with paths.clip.open("r+b") as handle:
        handle.truncate(1000)
    by_path = {check.path: check for check in verify("small_44k", tmp_path, progress=None).checks}
    assert by_path[paths.clip].problem == "1000 bytes, expected 3947081637"


# ---------------------------------------------------------------- direct downloads


def test_download_fetches_verifies_and_then_leaves_good_files_alone(tmp_path: Path, server: FileServer) -> None:
    data = {"a.pth": _blob(300_000, 1), "b.pt": _blob(12_345, 2)}
    manifest = _manifest(tmp_path, {name: _direct(name, body, server) for name, body in data.items()})
    weights = tmp_path / "weights"
    report = download("tiny", weights, manifest=manifest, **FAST)
    assert report.ok
    for name, body in data.items():
        assert (weights / name).read_bytes() == body
        assert not (weights / f"{name}.part").exists()
        assert json.loads((weights / f"{name}.md5").read_text())["md5"] == _md5(body)
    assert server.ranges("/files/a.pth") == [None]
    server.requests.clear()
    assert download("tiny", weights, manifest=manifest, **FAST).ok
    assert server.requests == []


def test_md5_mismatch_leaves_no_file_behind(tmp_path: Path, server: FileServer) -> None:
    body = _blob(50_000, 3)
    manifest = _manifest(tmp_path, {"a": _direct("a.pth", body, server, md5=_md5(b"other bytes"))})
    with pytest.raises(WeightsMissingError, match=rf"md5 {_md5(body)}, expected {_md5(b'other bytes')}"):
        download("tiny", tmp_path, manifest=manifest, **FAST)
    assert not (tmp_path / "a.pth").exists()
    assert not (tmp_path / "a.pth.part").exists()


def test_dropped_connection_is_resumed_with_range(tmp_path: Path, server: FileServer) -> None:
    body = _blob(400_000, 4)
    manifest = _manifest(tmp_path, {"a": _direct("a.pth", body, server)})
    server.faults["/files/a.pth"] = Fault(drop_after=150_000, drops_left=1)
    assert download("tiny", tmp_path, manifest=manifest, **FAST).ok
    assert server.ranges("/files/a.pth") == [None, "bytes=150000-"]
    assert _md5((tmp_path / "a.pth").read_bytes()) == _md5(body)


def test_more_drops_than_retries_complete_while_each_adds_bytes(tmp_path: Path, server: FileServer) -> None:
    body = _blob(400_000, 5)
    manifest = _manifest(tmp_path, {"a": _direct("a.pth", body, server, size=False)})
    server.faults["/files/a.pth"] = Fault(drop_after=50_000, drops_left=5)  # FAST allows 2 retries
    assert download("tiny", tmp_path, manifest=manifest, **FAST).ok
    assert server.ranges("/files/a.pth") == [None] + [f"bytes={n * 50_000}-" for n in range(1, 6)]
    assert (tmp_path / "a.pth").read_bytes() == body


def test_body_shorter_than_content_length_is_detected(tmp_path: Path, server: FileServer) -> None:
    body = _blob(80_000, 6)
    manifest = _manifest(tmp_path, {"a": _direct("a.pth", body, server)})
    server.faults["/files/a.pth"] = Fault(short_by=1_000)
    with pytest.raises(WeightsMissingError, match=r"79000 bytes kept in .*a\.pth\.part") as caught:
        download("tiny", tmp_path, manifest=manifest, **FAST)
    assert not (tmp_path / "a.pth").exists()
    assert (tmp_path / "a.pth.part").read_bytes() == body[:79_000]
    assert caught.value.missing[0].path == tmp_path / "a.pth"
    assert server.ranges("/files/a.pth") == [None] + ["bytes=79000-"] * 3  # 1 try + 2 retries without progress


def test_existing_part_file_is_resumed(tmp_path: Path, server: FileServer) -> None:
    body = _blob(200_000, 7)
    manifest = _manifest(tmp_path, {"a": _direct("a.pth", body, server)})
    (tmp_path / "a.pth.part").write_bytes(body[:123_456])
    assert "123456 bytes already in a.pth.part" in str(verify("tiny", tmp_path, manifest=manifest).checks[0].problem)
    assert download("tiny", tmp_path, manifest=manifest, **FAST).ok
    assert server.ranges("/files/a.pth") == ["bytes=123456-"]
    assert (tmp_path / "a.pth").read_bytes() == body


def test_complete_part_file_is_finished_without_new_bytes(tmp_path: Path, server: FileServer) -> None:
    body = _blob(20_000, 8)
    manifest = _manifest(tmp_path, {"a": _direct("a.pth", body, server)})
    (tmp_path / "a.pth.part").write_bytes(body)
    assert download("tiny", tmp_path, manifest=manifest, **FAST).ok  # the server answers 416
    assert (tmp_path / "a.pth").read_bytes() == body


def test_corrupt_part_file_is_deleted(tmp_path: Path, server: FileServer) -> None:
    body = _blob(60_000, 9)
    manifest = _manifest(tmp_path, {"a": _direct("a.pth", body, server)})
    (tmp_path / "a.pth.part").write_bytes(b"\0" * 30_000)
    with pytest.raises(WeightsMissingError, match=r"corrupt.*deleted it"):
        download("tiny", tmp_path, manifest=manifest, **FAST)
    assert not (tmp_path / "a.pth.part").exists()
    assert download("tiny", tmp_path, manifest=manifest, **FAST).ok  # the next run starts over
    assert (tmp_path / "a.pth").read_bytes() == body


def test_server_ignoring_range_restarts_the_part(tmp_path: Path, server: FileServer) -> None:
    body = _blob(90_000, 10)
    manifest = _manifest(tmp_path, {"a": _direct("a.pth", body, server)})
    server.faults["/files/a.pth"] = Fault(ignore_range=True)
    (tmp_path / "a.pth.part").write_bytes(body[:40_000])
    assert download("tiny", tmp_path, manifest=manifest, **FAST).ok
    assert (tmp_path / "a.pth").read_bytes() == body


def test_wrong_size_on_the_server_stops_before_the_body(tmp_path: Path, server: FileServer) -> None:
    body = _blob(10_000, 11)
    entry = _direct("a.pth", body, server)
    manifest = _manifest(tmp_path, {"a": {**entry, "size": 9_999}})
    with pytest.raises(WeightsMissingError, match="serves 10000 bytes, the manifest expects 9999"):
        download("tiny", tmp_path, manifest=manifest, **FAST)
    assert not (tmp_path / "a.pth").exists()


def test_http_404_names_the_url(tmp_path: Path, server: FileServer) -> None:
    entry = _direct("a.pth", b"abc", server)
    del server.files["/files/a.pth"]
    manifest = _manifest(tmp_path, {"a": entry})
    with pytest.raises(WeightsMissingError, match=rf"{re.escape(entry['url'])}: HTTP 404"):
        download("tiny", tmp_path, manifest=manifest, **FAST)


def test_base_url_override_serves_direct_files_from_a_mirror(tmp_path: Path, server: FileServer) -> None:
    body = _blob(5_000, 12)
    entry = _direct("a.pth", body, server)
    server.files["/mirror/a.pth"] = server.files.pop("/files/a.pth")
    manifest = _manifest(tmp_path, {"a": entry})
    assert download("tiny", tmp_path, manifest=manifest, base_url=f"{server.url}/mirror/", **FAST).ok
    assert server.ranges("/mirror/a.pth") == [None]


# ---------------------------------------------------------------- verify


def test_verify_detects_truncated_and_corrupted_files_and_caches_md5(tmp_path: Path, server: FileServer) -> None:
    body = _blob(70_000, 13)
    manifest = _manifest(tmp_path, {"a": _direct("a.pth", body, server, size=False)})
    target = tmp_path / "a.pth"
    target.write_bytes(body)
    assert verify("tiny", tmp_path, manifest=manifest, progress=None).ok

    target.write_bytes(body[:-1])
    check = verify("tiny", tmp_path, manifest=manifest, progress=None).checks[0]
    assert check.problem == f"md5 {_md5(body[:-1])}, expected {_md5(body)}"
    assert not verify("tiny", tmp_path, manifest=manifest, check_md5=False, progress=None).checks[0].problem

    corrupted = bytearray(body)
    corrupted[1234] ^= 0xFF
    target.write_bytes(bytes(corrupted))
    os.utime(target, ns=(1, 1))
    assert not verify("tiny", tmp_path, manifest=manifest, progress=None).ok
    # the sidecar is trusted while size and mtime are unchanged, and ignored once they change
    sidecar = json.loads((tmp_path / "a.pth.md5").read_text())
    assert (sidecar["size"], sidecar["mtime_ns"], sidecar["md5"]) == (70_000, 1, _md5(bytes(corrupted)))
    (tmp_path / "a.pth.md5").write_text(json.dumps({**sidecar, "md5": _md5(body)}))
    assert verify("tiny", tmp_path, manifest=manifest, progress=None).ok
    os.utime(target, ns=(2, 2))
    assert not verify("tiny", tmp_path, manifest=manifest, progress=None).ok


def test_download_replaces_a_corrupted_final_file(tmp_path: Path, server: FileServer) -> None:
    body = _blob(30_000, 14)
    manifest = _manifest(tmp_path, {"a": _direct("a.pth", body, server)})
    (tmp_path / "a.pth").write_bytes(b"\1" * 30_000)
    assert download("tiny", tmp_path, manifest=manifest, **FAST).ok
    assert (tmp_path / "a.pth").read_bytes() == body


# ---------------------------------------------------------------- offline and the hub


def test_offline_error_lists_every_missing_file_with_source_and_destination(tmp_path: Path, server: FileServer) -> None:
    present = paths_for("small_16k", tmp_path).vocoder
    present.write_bytes(b"stale")
    with pytest.raises(WeightsMissingError) as caught:
        download("small_16k", tmp_path, offline=True, base_url=server.url, **FAST)
    message = str(caught.value)
    assert len(caught.value.missing) == 6
    for spec in files_for("small_16k"):
        assert f"into     {tmp_path / spec.relpath}" in message
        assert spec.source(base_url=server.url) in message
    assert "best_netG.pt: 5 bytes, expected 449217313; offline" in message
    assert "Hugging Face repo apple/DFN5B-CLIP-ViT-H-14-384, file open_clip_pytorch_model.bin" in message
    assert f"python -m model.weights download small_16k --dir {tmp_path}" in message
    assert server.requests == []


def test_cli_with_hf_hub_offline_exits_nonzero_and_says_what_to_fetch(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "model.weights", "download", "large_44k_v2", "--dir", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    for spec in files_for("large_44k_v2"):
        assert f"into     {tmp_path / spec.relpath}" in result.stderr
        assert spec.source() in result.stderr
    assert "https://huggingface.co/nvidia/bigvgan_v2_44khz_128band_512x/resolve/main/config.json" in result.stderr


def _hub_entry(repo: str, name: str, data: bytes, server: FileServer) -> dict:
    server.files[f"/{repo}/resolve/main/{name}"] = data
    return {"what": name, "hf_repo": repo, "revision": "main", "file": name, "md5": None, "size": len(data)}


def test_hub_files_download_through_huggingface_hub_into_the_hf_folder(tmp_path: Path, server: FileServer) -> None:
    model, config = _blob(50_000, 15), b'{"sampling_rate": 44100}'
    manifest = _manifest(
        tmp_path,
        {
            "gen": _hub_entry("org/vocoder", "generator.pt", model, server),
            "cfg": _hub_entry("org/vocoder", "config.json", config, server),
        },
    )
    assert download("tiny", tmp_path, manifest=manifest, hf_endpoint=server.url, **FAST).ok
    paths = paths_for("tiny", tmp_path, manifest)
    assert paths.flow == tmp_path / "hf" / "org" / "vocoder" / "generator.pt"
    assert (paths.flow.read_bytes(), paths.vae.read_bytes()) == (model, config)
    assert any(path == "/org/vocoder/resolve/main/generator.pt" for _, path, _ in server.requests)


def test_hub_failure_is_reported_with_repo_and_destination(tmp_path: Path, server: FileServer) -> None:
    manifest = _manifest(tmp_path, {"gen": _hub_entry("org/gone", "generator.pt", b"x", server)})
    server.files.clear()
    with pytest.raises(WeightsMissingError, match=r"Hugging Face org/gone/generator\.pt: \w+") as caught:
        download("tiny", tmp_path, manifest=manifest, hf_endpoint=server.url, **FAST)
    assert caught.value.missing[0].path == tmp_path / "hf" / "org" / "gone" / "generator.pt"


# ---------------------------------------------------------------- CLI


def test_cli_verify_and_list_exit_codes(tmp_path: Path, server: FileServer, capsys: pytest.CaptureFixture) -> None:
    body = _blob(1_000, 16)
    _manifest(tmp_path, {"a": _direct("a.pth", body, server)})
    args = ["--manifest", str(tmp_path / "manifest.json")]
    assert main([*args, "verify", "tiny", "--dir", str(tmp_path)]) == 1
    assert "BAD a.pth: not found" in capsys.readouterr().out
    (tmp_path / "a.pth").write_bytes(body)
    assert main([*args, "verify", "tiny", "--dir", str(tmp_path)]) == 0
    assert main([*args, "verify", "huge_8k", "--dir", str(tmp_path)]) == 1
    assert "unknown variant 'huge_8k'" in capsys.readouterr().err
    assert main(["list"]) == 0
    table = capsys.readouterr().out
    assert "synchformer_state_dict.pth" in table and "5b2f5594b0730f70e41e549b7c94390c" in table
