"""`python -m model.generate` as a user runs it: a real subprocess, tiny weights, files it writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from model.testkit import audio_length, make_video, video_packets

VARIANT_ARGS = ["--variant", "small_16k", "--weights", "tiny", "--steps", "1"]
TIMEOUT = 600


def generate(*args: str | Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "model.generate", *VARIANT_ARGS, *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, check=False)


def test_the_whole_of_a_long_video_comes_back_with_its_soundtrack(tmp_path: Path) -> None:
    clip = make_video(tmp_path / "walk.mp4", seconds=11.0, fps=25, size=(160, 96))
    done = generate("--video", clip, "--duration", "video", "--seed", "5", "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr

    assert done.stdout.split() == [str(tmp_path / "out" / "walk.flac"), str(tmp_path / "out" / "walk.mp4")]
    metadata = json.loads(done.stderr[done.stderr.index("{\n") :])
    assert metadata["windows"]["count"] == 2 and metadata["weights"]["random_weights"]  # windows at 0 s and 6 s
    decoded, _, rate = audio_length(tmp_path / "out" / "walk.flac")
    assert decoded == 11 * rate
    assert video_packets(tmp_path / "out" / "walk.mp4") == video_packets(clip)  # every packet, unchanged


def test_a_long_text_only_duration_and_a_bad_one(tmp_path: Path) -> None:
    done = generate("--prompt", "rain", "--duration", "20", "--out", tmp_path)
    assert done.returncode == 0, done.stderr
    decoded, _, rate = audio_length(tmp_path / "rain.flac")
    assert decoded == 20 * rate

    refused = generate("--prompt", "rain", "--duration", "0.01", "--out", tmp_path / "none")
    last_line = refused.stderr.splitlines()[-1]
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert last_line == "error: duration 0.010 s is too short: the model needs at least 0.64 s"
    assert not (tmp_path / "none").exists()
