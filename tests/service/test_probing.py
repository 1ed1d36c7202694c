"""Uploads are probed in child processes: the same answers as probing in-process, and a probe that hangs
or crashes costs its own upload a 422 and its child process, nothing else."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from service_harness import Media, wait_until

from service.api.inspection import inspect_upload
from service.api.probing import PROCESS_NAME, ProbePool
from service.problems import ProblemError
from service.settings import Settings

TIMEOUT = 2.0
SETTINGS = Settings(_env_file=None, probe_processes=1, probe_timeout_seconds=TIMEOUT)


@pytest.fixture
def pool() -> Iterator[ProbePool]:
    probes = ProbePool(SETTINGS)
    probes.start()
    yield probes
    probes.close()


def probe_children() -> list[multiprocessing.Process]:
    return [child for child in multiprocessing.active_children() if child.name == PROCESS_NAME]


def problem_slug(probe, *args) -> str:
    with pytest.raises(ProblemError) as refused:
        probe(*args)
    return refused.value.problem.slug


def test_a_child_answers_as_the_in_process_probe(pool: ProbePool, media: Media, tmp_path: Path) -> None:
    assert pool.inspect(media.video, "video") == inspect_upload(media.video, "video", SETTINGS)
    assert pool.inspect(media.image, "image") == inspect_upload(media.image, "image", SETTINGS)
    empty, text = tmp_path / "empty.mp4", tmp_path / "notes.mp4"
    empty.touch()
    text.write_text("not a video at all")
    for path, kind in ((empty, "video"), (text, "video"), (media.video, "image")):
        assert problem_slug(pool.inspect, path, kind) == problem_slug(inspect_upload, path, kind, SETTINGS)


def test_a_hanging_probe_times_out_and_its_child_is_replaced(pool: ProbePool, media: Media) -> None:
    (child,) = probe_children()
    os.kill(child.pid, signal.SIGSTOP)  # it hangs, as a demuxer looping on a hostile file would
    started = time.monotonic()
    assert problem_slug(pool.inspect, media.video, "video") == "media-timeout"
    assert TIMEOUT <= time.monotonic() - started < TIMEOUT + 5
    assert not child.is_alive()
    assert pool.inspect(media.video, "video").width == 320  # by a new child
    assert len(probe_children()) == 1 and probe_children()[0].pid != child.pid


def test_a_crashing_probe_fails_only_its_upload(pool: ProbePool, media: Media) -> None:
    (child,) = probe_children()
    os.kill(child.pid, signal.SIGSTOP)  # hold it, so that it dies in the middle of a probe
    outcome: list[str] = []
    probing = threading.Thread(target=lambda: outcome.append(problem_slug(pool.inspect, media.video, "video")))
    probing.start()
    time.sleep(0.3)
    os.kill(child.pid, signal.SIGKILL)  # as a decoder crash would end it
    probing.join(timeout=TIMEOUT)
    assert outcome == ["unreadable-media"]
    assert pool.inspect(media.video, "video").width == 320

    # a child that died while idle is replaced before it is given an upload
    (idle,) = probe_children()
    os.kill(idle.pid, signal.SIGKILL)
    wait_until(lambda: not idle.is_alive(), 10, "the killed child to be gone")
    assert pool.inspect(media.image, "image").width > 0
