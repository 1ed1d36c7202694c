"""python -m model.generate: one generation from the command line, like the official demo.

    python -m model.generate --video clip.mp4 --prompt "waves crashing" --out output/
    python -m model.generate --prompt "a dog barking in the rain" --duration 5 --out output/
    python -m model.generate --image photo.jpg --prompt "birdsong" --weights tiny --out output/
    python -m model.generate --video long.mp4 --duration video --out output/   # the whole video, any length

Writes <name>.flac (and <name>.mp4 with a video: its video stream copied, the new audio as AAC).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

import torch

from model.build import VARIANTS, load_pipeline
from model.media import mux_video, write_audio
from model.media_errors import MediaError
from model.request import REQUEST_PARAMETERS, GenerationRequest
from model.weights.manifest import WeightsError
from model.windows import DEFAULT_OVERLAP, DEFAULT_SCHEDULE, SCHEDULES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def output_stem(request: GenerationRequest) -> str:
    media = request.video or request.image
    if media is not None:
        return Path(media).stem
    return re.sub(r"[^A-Za-z0-9_-]+", "_", request.prompt).strip("_")[:80] or "audio"


def seconds_or_video(text: str) -> float | None:
    """--duration: seconds, or "video" for the whole video (None)."""
    return None if text == "video" else float(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m model.generate", description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--video", type=Path, help="video to make a soundtrack for")
    source.add_argument("--image", type=Path, help="still image (image-to-audio)")
    for item in REQUEST_PARAMETERS:
        flag = item.metadata["flag"] or "--" + item.name.replace("_", "-")
        if isinstance(item.default, bool):
            parser.add_argument(flag, dest=item.name, action="store_true", help=item.metadata["help"])
        else:
            kind = seconds_or_video if item.name == "duration" else type(item.default)
            parser.add_argument(flag, dest=item.name, type=kind, default=item.default, help=item.metadata["help"])
    parser.add_argument("--variant", default="large_44k_v2", choices=VARIANTS)
    parser.add_argument("--weights", default="official", choices=("official", "tiny"), help="tiny: random weights")
    parser.add_argument("--weights-dir", type=Path, default=Path("weights"))
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=tuple(DTYPES), help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--fast-frames", action="store_true", help="faster, inexact video frame path")
    parser.add_argument("--window-overlap", type=float, default=DEFAULT_OVERLAP, help="seconds, past 8 s")
    parser.add_argument("--window-schedule", choices=SCHEDULES, default=DEFAULT_SCHEDULE, help="windows, past 8 s")
    parser.add_argument("--out", type=Path, default=Path("output"), help="output folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = parse_args(argv)
    request = GenerationRequest(
        **{item.name: getattr(args, item.name) for item in REQUEST_PARAMETERS}, video=args.video, image=args.image
    )
    try:
        pipeline = load_pipeline(
            args.variant,
            weights=args.weights,
            weights_dir=args.weights_dir,
            device=args.device,
            dtype=DTYPES[args.dtype] if args.dtype else None,
            frame_path="fast" if args.fast_frames else "exact",
            window_overlap=args.window_overlap,
            window_schedule=args.window_schedule,
        )
        result = pipeline.generate(request)
    except (WeightsError, MediaError, ValueError) as exc:  # the user's to fix: say what, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    stem = output_stem(request)
    for k, audio in enumerate(result.audio):
        name = stem if result.audio.shape[0] == 1 else f"{stem}_{k}"
        write_audio(args.out / f"{name}.flac", audio[None], result.sample_rate, "flac")
        print(args.out / f"{name}.flac")
        if args.video is not None:
            mp4 = args.out / f"{name}.mp4"
            mux_video(args.video, audio[None], result.sample_rate, mp4, result.duration, request.duration is None)
            print(mp4)
    if result.metadata["weights"]["random_weights"]:
        print(f"NOTE: {result.metadata['weights'].get('note', 'random weights')}", file=sys.stderr)
    print(json.dumps(result.metadata, indent=1), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
