"""Fixtures of the end-to-end tests: the real service, its clients and media files made with PyAV."""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest
from service_harness import (
    CLIENT_TIMEOUT,
    KEY_A,
    KEY_B,
    MAIN_SETTINGS,
    Media,
    Stack,
    make_stack,
    start_redis,
)

from model.testkit import free_port, make_audio_only, make_image, make_truncated, make_unknown_codec, make_video


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server: the one scripts/test (CI) started, or one of our own on a free port."""
    given = os.environ.get("MMAUDIO_TEST_REDIS_URL")
    if given:
        yield given.rstrip("/")
        return
    port = free_port()
    process = start_redis(port, tmp_path_factory.mktemp("redis"))
    try:
        yield f"redis://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture(scope="session")
def stack(redis_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The main deployment: API keys on, one worker (tests may add more)."""
    with make_stack(redis_server, tmp_path_factory.mktemp("main"), "main", 0, MAIN_SETTINGS).running(1) as main:
        yield main


def keyed_client(stack: Stack, key: str) -> httpx.Client:
    return httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=CLIENT_TIMEOUT)


@pytest.fixture
def alice(stack: Stack) -> Iterator[httpx.Client]:
    with keyed_client(stack, KEY_A) as client:
        yield client


@pytest.fixture
def bob(stack: Stack) -> Iterator[httpx.Client]:
    with keyed_client(stack, KEY_B) as client:
        yield client


@pytest.fixture(scope="session")
def media(tmp_path_factory: pytest.TempPathFactory) -> Media:
    folder = tmp_path_factory.mktemp("media")
    video = make_video(folder / "clip.mp4", seconds=1.6, fps=25, size=(320, 240), with_audio=True)
    empty = folder / "empty.mp4"
    empty.write_bytes(b"")
    text = folder / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    return Media(
        video=video,
        image=make_image(folder / "still.png"),
        audio_only=make_audio_only(folder / "sound.m4a", seconds=2.0),
        truncated=make_truncated(folder / "cut.mp4", video, keep=0.5),
        empty=empty,
        text=text,
        unknown_codec=make_unknown_codec(folder / "odd.mp4", video),
        too_long=make_video(folder / "long.mp4", seconds=25.0, fps=5, size=(64, 48), preset="ultrafast"),
        too_short=make_video(folder / "short.mp4", seconds=0.4, fps=25, size=(64, 48)),
        too_wide=make_video(folder / "wide.mp4", seconds=0.5, fps=5, size=(1280, 64), preset="ultrafast"),
    )
