"""The commands: submit (optionally waiting with a progress bar, then downloading), status, list, cancel,
delete and download. Errors print the API's problem title and detail and exit 1."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from service.client.connection import TERMINAL, Connection, ProblemReport
from service.client.progress import JobBar

DEFAULT_URL = "http://localhost:8000"
FORMATS = ("mp4", "flac", "wav", "m4a")
STATUSES = ("queued", "running", *TERMINAL)


def duration(value: str) -> float | str:
    """Seconds, or `video` for the whole video."""
    if value == "video":
        return value
    try:
        return float(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError("seconds, or 'video' for the whole video") from err


def add_connection_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """--url and --api-key, before the command (with defaults) or after it (given only when typed)."""
    keep = {} if defaults else {"default": argparse.SUPPRESS}
    parser.add_argument(
        "--url",
        help=f"the service (env MMAUDIO_URL, default {DEFAULT_URL})",
        **({"default": os.environ.get("MMAUDIO_URL", DEFAULT_URL)} if defaults else keep),
    )
    parser.add_argument(
        "--api-key",
        help="API key, sent as Authorization: Bearer (env MMAUDIO_API_KEY)",
        **({"default": os.environ.get("MMAUDIO_API_KEY") or None} if defaults else keep),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service.client", description="Client of the MMAudio service.")
    add_connection_options(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text)
        add_connection_options(sub, defaults=False)
        return sub

    submit = command("submit", "Submit a job: a video (positional), --image IMG or --text.")
    source = submit.add_mutually_exclusive_group(required=True)
    source.add_argument("video", nargs="?", type=Path, help="a video to generate its soundtrack")
    source.add_argument("--image", type=Path, help="a still image")
    source.add_argument("--text", action="store_true", help="text to audio (no file)")
    submit.add_argument("--prompt", default=None)
    submit.add_argument("--negative-prompt", default=None)
    submit.add_argument("--duration", type=duration, help="seconds, or 'video' for the whole video")
    submit.add_argument("--steps", type=int, help="sampling steps")
    submit.add_argument("--cfg", type=float, help="classifier-free guidance strength")
    submit.add_argument("--seed", type=int)
    submit.add_argument("--num-samples", type=int)
    submit.add_argument("--variant")
    submit.add_argument("--format", choices=FORMATS, help="output format (default: mp4 for a video, else flac)")
    submit.add_argument("--sample-rate", type=int, help="output sample rate (the variant's native one by default)")
    submit.add_argument("--wait", action="store_true", help="follow the job with a progress bar and download it")
    submit.add_argument("--out", type=Path, help="where --wait writes the result (default: mmaudio-<id>.<format>)")

    for name, text in (
        ("status", "Print a job (JSON)."),
        ("cancel", "Cancel a queued or running job."),
        ("delete", "Delete a job, its upload and its results."),
    ):
        command(name, text).add_argument("id")
    download = command("download", "Download a finished job's result.")
    download.add_argument("id")
    download.add_argument("--format", choices=FORMATS, help="default: the job's output format")
    download.add_argument("--sample", type=int, help="only this sample (0-based); default: every sample")
    download.add_argument("--out", type=Path, help="default: mmaudio-<id>.<format>")

    listing = command("list", "List your jobs, newest first.")
    listing.add_argument("--status", action="append", choices=STATUSES, default=[], help="repeatable")
    listing.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    return parser


def submit_params(args: argparse.Namespace) -> dict[str, Any]:
    given = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "duration": args.duration,
        "num_steps": args.steps,
        "cfg_strength": args.cfg,
        "seed": args.seed,
        "num_samples": args.num_samples,
        "variant": args.variant,
        "output_format": args.format,
        "sample_rate": args.sample_rate,
    }
    return {name: value for name, value in given.items() if value is not None}


def say(text: str) -> None:
    print(text, file=sys.stderr)


def sample_path(out: Path, sample: int, samples: int) -> Path:
    """``out`` itself for one sample; ``<stem>-<k><suffix>`` for each of several."""
    return out if samples == 1 else out.with_name(f"{out.stem}-{sample}{out.suffix}")


def download_result(connection: Connection, job: dict, fmt: str | None, sample: int | None, out: Path | None) -> None:
    fmt = fmt or job["params"]["output_format"]
    out = out or Path(f"mmaudio-{job['id'][:8]}.{fmt}")
    samples = job["result"]["num_samples"]
    for file in job["result"]["files"]:
        if file["format"] == fmt and sample in (None, file["sample"]):
            path = sample_path(out, file["sample"], 1 if sample is not None else samples)
            size = connection.download(file["href"], path)
            print(path)
            say(f"wrote {path} ({size} bytes)")


def describe(job: dict) -> None:
    """The facts of an ended job, on stderr (stdout keeps what scripts read)."""
    params, timings = job["params"], job["timings"]
    say(f"job {job['id']} {job['status']}: seed {params['seed']}, {params['num_steps']} steps, {params['variant']}")
    if "total" in timings:
        say(f"took {timings['total']:.2f} s (queued {timings.get('queue', 0):.2f} s)")
    if job["model"]["weights"]["random_weights"]:
        say("note: tiny preset, random weights: the audio is noise-like, not a real model's output")
    if job["error"]:
        error = job["error"]
        say(f"error: {error['title']}" + (f": {error['detail']}" if error.get("detail") else ""))


def follow(connection: Connection, job: dict) -> dict:
    bar = JobBar(job)
    try:
        for state in connection.follow(job["id"]):
            job = state
            bar.update(job)
    finally:
        bar.close()
    return job if job["status"] in TERMINAL else connection.job(job["id"])


def run_submit(connection: Connection, args: argparse.Namespace) -> int:
    params = submit_params(args)
    if args.text:
        job = connection.submit(params)
    else:
        field, path = ("image", args.image) if args.image else ("video", args.video)
        if not path.is_file():
            raise ProblemReport(f"No file {path}")
        job = connection.submit(params, field, path)
    if not args.wait:
        print(job["id"])
        return 0
    say(f"job {job['id']}")
    job = follow(connection, job)
    describe(job)
    if job["status"] != "succeeded":
        return 1
    download_result(connection, job, None, None, args.out)
    return 0


def run_list(connection: Connection, args: argparse.Namespace) -> int:
    for count, job in enumerate(connection.jobs(args.limit, args.status)):
        if count == args.limit:
            break
        source = job["input"]["filename"] or job["input"]["kind"]
        print(f"{job['id']}  {job['status']:<9}  {job['created_at'][:19]}  {source}  {job['params']['prompt']}")
    return 0


def run(connection: Connection, args: argparse.Namespace) -> int:
    if args.command == "submit":
        return run_submit(connection, args)
    if args.command == "list":
        return run_list(connection, args)
    if args.command == "status":
        print(json.dumps(connection.job(args.id), indent=2))
    elif args.command == "cancel":
        job = connection.cancel(args.id)
        print(job["status"] if job["status"] in TERMINAL else "cancel requested (stops at its next step)")
    elif args.command == "delete":
        connection.delete(args.id)
        print(f"deleted {args.id}")
    elif args.command == "download":
        job = connection.job(args.id)
        if job["status"] != "succeeded":
            raise ProblemReport("The job has no result", f"It is {job['status']}.")
        download_result(connection, job, args.format, args.sample, args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    connection = Connection(args.url, args.api_key)
    try:
        return run(connection, args)
    except ProblemReport as problem:
        say(f"error: {problem}")
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        connection.close()
