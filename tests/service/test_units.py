"""The service's pure parts, without any process: settings, keys, ranges, webhook URL checks."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from service_harness import REPO

from service.api.auth import ANONYMOUS, KeyRing
from service.api.ranges import byte_range, content_disposition
from service.api.submission import cancel_after_seconds
from service.api.uploads import safe_filename
from service.outbound import ForbiddenURL, UnresolvableURL, checked_address, pinned_request
from service.problems import ProblemError
from service.settings import Settings, settings_table
from service.upkeep.webhooks import signature


def test_every_setting_is_documented() -> None:
    for name, field in Settings.model_fields.items():
        assert field.description, name
    # README's table is the generated one: every setting with its default and description, no other row
    readme_rows = [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| `MMAUDIO_")]
    expected_rows = settings_table().splitlines()[2:]
    assert readme_rows == expected_rows


def test_settings_read_lists_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMAUDIO_VARIANTS", "small_16k, large_44k")
    monkeypatch.setenv("MMAUDIO_VARIANT", "small_16k")
    settings = Settings(_env_file=None)
    assert settings.enabled_variants == ["small_16k", "large_44k"]
    assert settings.redis_address == "redis://127.0.0.1:6379/0"


def test_keyring_from_settings_and_file(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"first").hexdigest()
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# comment\n\nteam:{hashlib.sha256(b'second').hexdigest()}  # trailing\n")
    ring = KeyRing.from_settings(Settings(_env_file=None, api_keys=[digest], api_keys_file=keys_file))
    assert ring.owner("Bearer first") == digest[:12]
    assert ring.owner("bearer second") == "team"
    for header in (None, "Bearer", "Basic Zmlyc3Q=", "Bearer third"):
        with pytest.raises(ProblemError) as refused:
            ring.owner(header)
        assert refused.value.problem.status == 401
    assert KeyRing({}).owner(None) == ANONYMOUS
    with pytest.raises(ValueError):
        KeyRing.from_settings(Settings(_env_file=None, api_keys=["not-a-digest"]))


def test_byte_ranges() -> None:
    assert byte_range(None, 10) is None
    assert byte_range("bytes=2-4", 10) == (2, 4)
    assert byte_range("bytes=2-", 10) == (2, 9)
    assert byte_range("bytes=-3", 10) == (7, 9)
    assert byte_range("bytes=-30", 10) == (0, 9)
    assert byte_range("bytes=5-400", 10) == (5, 9)
    assert byte_range("bytes=4-2", 10) is None  # invalid: the whole file
    assert byte_range("bytes=0-1,4-5", 10) is None  # several ranges: the whole file
    for unsatisfiable in ("bytes=10-", "bytes=-0"):
        with pytest.raises(ProblemError) as refused:
            byte_range(unsatisfiable, 10)
        assert refused.value.headers["Content-Range"] == "bytes */10"


def test_download_names_are_harmless() -> None:
    assert safe_filename("../../etc/passwd") == "passwd"
    assert safe_filename("C:\\videos\\my clip (1).mp4") == "my_clip_1_.mp4"
    assert safe_filename("..") is None
    assert content_disposition("été.mp4") == "attachment; filename=\"_t_.mp4\"; filename*=UTF-8''%C3%A9t%C3%A9.mp4"


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1/hook", "http://10.1.2.3/x", "http://169.254.169.254/latest", "http://[::1]:80/"]
)
def test_webhooks_to_internal_addresses_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        checked_address(url, allow_private=False)
    checked_address(url, allow_private=True)


def test_webhook_deliveries_connect_to_the_checked_address() -> None:
    assert checked_address("http://127.0.0.1:9/hook", allow_private=True) == "127.0.0.1"
    target, host, extensions = pinned_request("https://user:pw@hooks.example.com:8443/in?x=1", "93.184.216.34")
    assert target == "https://user:pw@93.184.216.34:8443/in?x=1"
    assert host == "hooks.example.com:8443" and extensions == {"sni_hostname": "hooks.example.com"}
    target, host, extensions = pinned_request("http://hooks.example.com/in", "2606:2800:220:1::1")
    assert (target, host, extensions) == ("http://[2606:2800:220:1::1]/in", "hooks.example.com", {})


def test_webhook_urls_need_http() -> None:
    for url in ("ftp://example.com/x", "file:///etc/passwd", "http:///nohost"):
        with pytest.raises(ValueError):
            checked_address(url, allow_private=True)


def test_webhook_signature_matches_the_standard_webhooks_example() -> None:
    # the example of the Standard Webhooks specification (github.com/standard-webhooks/standard-webhooks)
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    expected = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    assert signature(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == expected


def test_outbound_checks_resolve_names_and_ports() -> None:
    with pytest.raises(ForbiddenURL):
        checked_address("http://localhost/x", allow_private=False)  # a name: its addresses are checked
    with pytest.raises(ForbiddenURL):
        checked_address("http://example.com:99999/x", allow_private=True)
    with pytest.raises(UnresolvableURL):
        checked_address("http://no-such-host.invalid/x", allow_private=True)


def test_cancel_after_values() -> None:
    assert [cancel_after_seconds(value, 7200) for value in ("90", "90s", "1.5m", "2m", "1h", " 45 ")] == [
        90,
        90,
        90,
        120,
        3600,
        45,
    ]
    assert cancel_after_seconds(None, 10) is None
    for garbage in ("", "0", "-1", "1e3", "3h", "1h30m", "nan", "inf", "9" * 400, "90 minutes"):
        with pytest.raises(ProblemError):
            cancel_after_seconds(garbage, 7200)


def test_malformed_urls_are_forbidden() -> None:
    for url in ("http://[::1", "http://[not-an-ip]/x", "http://example.com:port/x"):
        with pytest.raises(ForbiddenURL):
            checked_address(url, allow_private=True)
