"""Claims at queue scale (issue 12): no model, a real redis-server this script starts on a free port.

    .venv/bin/python -m bench.queue_scale [--sizes 1000,10000,100000] [--claimers 64] [--max-batch 8]
        [--window 64] [--claims-from COMMIT] [--claim-budget N]

For each size: flush, queue that many jobs through the real JobStore.create (transactions of 500 jobs, the
API's one job each; several producer processes), read Redis's memory before and after (INFO memory: bytes per queued
job, the job hash, RQ's hash and the list entry), then start --claimers processes (forked, each its own
connection and QueueClaims, as a worker has) that claim batches of up to --max-batch samples until the queue
is empty. Jobs have one of three (duration, steps) groups, so claims batch within the window.

Prints claims per second over the whole drain, p50/p99 of one claim's latency as a claimer sees it (the
round trips, the script, the contention of every claimer on the machine's cores), Redis's time per claim
script (INFO commandstats: how long Redis is blocked for every other client, waits for a core included) and
the CPU time of Redis's main thread per claim (INFO cpu: every command of a claim, not inflated by a busy
machine), and the proof: every job claimed exactly once (no id twice, none missing, each job `running` at
attempt 1 in Redis).

--claims-from COMMIT loads service/worker/claims.py of that commit (`git show`; 625401f is the claim that
read the whole queue) to compare; --claim-budget stops after that many claims (the old claim needs minutes
to drain 100,000 jobs), and the exactly-once check then covers the jobs claimed.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import ModuleType

from redis import Redis

from model.testkit import free_port
from service import keys, queue
from service.jobs import JobRecord, JobStore
from service.schemas import EffectiveParams, InputInfo, JobStatus, ModelInfo, WeightsInfo
from service.settings import Settings
from service.storage import RedisStore
from service.worker import claims as current_claims

VARIANT = "large_44k_v2"
MODEL = ModelInfo(variant=VARIANT, weights=WeightsInfo(kind="tiny", random_weights=True))
GROUPS = ((8.0, 25), (8.0, 50), (4.0, 25))  # (duration, steps): jobs of one group may share a batch
PRODUCERS = 4
CREATE_CHUNK = 500  # jobs per JobStore.create transaction
REPO = Path(__file__).resolve().parent.parent


def start_redis(folder: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), "--save", ""]
    process = subprocess.Popen([*command, "--appendonly", "no"], stdout=subprocess.DEVNULL)
    client = Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            return process, port
        except Exception:
            time.sleep(0.1)
    raise SystemExit("redis-server did not start")


def job_store(port: int, settings: Settings) -> JobStore:
    redis = Redis(port=port)
    return JobStore(redis, settings, RedisStore(redis))


def produce(port: int, settings: Settings, count: int, first: int) -> list[str]:
    jobs = job_store(port, settings)
    records = []
    for index in range(first, first + count):
        duration, steps = GROUPS[index % len(GROUPS)]
        params = EffectiveParams(
            prompt=f"a queued job {index}",
            negative_prompt="",
            duration=duration,
            num_steps=steps,
            cfg_strength=4.5,
            seed=index,
            mask_away_clip=False,
            num_samples=1,
            variant=VARIANT,
            output_format="flac",
        )
        text = InputInfo(kind="text")
        records.append(JobRecord(str(uuid.uuid4()), "bench", JobStatus.queued, time.time(), params, text, MODEL))
    for chunk in range(0, count, CREATE_CHUNK):
        jobs.create(*records[chunk : chunk + CREATE_CHUNK])
    return [record.id for record in records]


def claimer(
    port: int,
    settings: Settings,
    module: ModuleType,
    name: str,
    start: multiprocessing.synchronize.Event,
    budget: multiprocessing.sharedctypes.Synchronized,
    out: multiprocessing.Queue,
) -> None:
    claims = module.QueueClaims(job_store(port, settings), VARIANT, name, 60)
    taken: list[str] = []
    latencies: list[float] = []
    start.wait()
    while True:
        with budget.get_lock():
            if budget.value <= 0:
                break
            budget.value -= 1
        began = time.perf_counter()
        batch = claims.claim(settings.max_batch, MODEL)
        latencies.append(time.perf_counter() - began)
        taken += [record.id for record in batch]
        if not batch and queue.depth(claims.redis, VARIANT) == 0:
            break
    out.put((taken, latencies, time.perf_counter()))


def used_memory(redis: Redis) -> int:
    return int(redis.info("memory")["used_memory"])


def redis_cpu_seconds(redis: Redis) -> float:
    """CPU time of Redis's main thread (the one running commands): unlike its command timings, not inflated
    when the machine is busy and the thread waits for a core."""
    cpu = redis.info("cpu")
    return float(cpu["used_cpu_user_main_thread"]) + float(cpu["used_cpu_sys_main_thread"])


def script_usec_per_call(redis: Redis) -> float:
    stats = redis.info("commandstats")
    calls = sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("evalsha", "eval"))
    usec = sum(stats.get(f"cmdstat_{name}", {}).get("usec", 0) for name in ("evalsha", "eval"))
    return usec / calls if calls else 0.0


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def run_size(port: int, settings: Settings, module: ModuleType, size: int, claimers: int, budget: int | None) -> None:
    redis = Redis(port=port)
    redis.flushall()
    before = used_memory(redis)
    began = time.perf_counter()
    share = -(-size // PRODUCERS)
    with multiprocessing.Pool(PRODUCERS) as pool:
        parts = pool.starmap(
            produce, [(port, settings, min(share, size - i * share), i * share) for i in range(PRODUCERS)]
        )
    created = [job_id for part in parts for job_id in part]
    made = time.perf_counter() - began
    assert queue.depth(redis, VARIANT) == size == len(created)
    per_job = (used_memory(redis) - before) / size
    redis.config_resetstat()
    cpu_before = redis_cpu_seconds(redis)

    start = multiprocessing.Event()
    left = multiprocessing.Value("l", budget if budget is not None else 1 << 62)
    out: multiprocessing.Queue = multiprocessing.Queue()
    processes = [
        multiprocessing.Process(target=claimer, args=(port, settings, module, f"w{i}", start, left, out))
        for i in range(claimers)
    ]
    for process in processes:
        process.start()
    time.sleep(1.0)  # every claimer connected and waiting
    started = time.perf_counter()
    start.set()
    results = [out.get() for _ in processes]
    for process in processes:
        process.join()
    wall = max(ended for _, _, ended in results) - started
    redis_cpu = redis_cpu_seconds(redis) - cpu_before  # read before the checks below add their own
    script_usec = script_usec_per_call(redis)

    taken = [job_id for ids, _, _ in results for job_id in ids]
    latencies = [seconds for _, values, _ in results for seconds in values]
    once = len(taken) == len(set(taken)) and set(taken) <= set(created)
    with redis.pipeline(transaction=False) as pipe:
        for job_id in taken:
            pipe.hmget(keys.job(job_id), "status", "attempts")
        states = pipe.execute()
    running = all(state == [b"running", b"1"] for state in states)
    complete = set(taken) == set(created)
    claims_made = len(latencies)
    print(
        f"{size:>7} queued | made in {made:6.1f} s, {per_job:6.0f} B/job | {claims_made:>6} claims "
        f"({len(taken) / max(claims_made, 1):.1f} jobs each) in {wall:6.2f} s: {claims_made / wall:7.0f} claims/s, "
        f"{len(taken) / wall:7.0f} jobs/s | latency p50 {1000 * statistics.median(latencies):7.2f} ms "
        f"p99 {1000 * percentile(latencies, 0.99):7.2f} ms | Redis: {script_usec:7.0f} us/script, "
        f"{1e6 * redis_cpu / claims_made:7.0f} us CPU/claim | "
        f"exactly once: {'yes' if once and running else 'NO'}, all claimed: {'yes' if complete else 'no'}"
        f" ({len(taken)}/{size})",
        flush=True,
    )
    if not (once and running) or (budget is None and not complete):
        raise SystemExit("a job was claimed twice, lost or left in a wrong state")


def claims_module(commit: str | None) -> ModuleType:
    if commit is None:
        return current_claims
    source = subprocess.run(
        ["git", "show", f"{commit}:service/worker/claims.py"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    spec = importlib.util.spec_from_loader(f"claims_{commit}", loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, f"{commit}:service/worker/claims.py", "exec"), module.__dict__)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--claimers", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--claims-from", default=None, help="a commit whose claims.py to run (e.g. 625401f)")
    parser.add_argument("--claim-budget", type=int, default=None, help="stop after this many claims in all")
    args = parser.parse_args()
    multiprocessing.set_start_method("fork")
    settings = Settings(_env_file=None, variant=VARIANT, max_batch=args.max_batch, claim_window=args.window)
    module = claims_module(args.claims_from)
    with tempfile.TemporaryDirectory(prefix="queue-scale-") as folder:
        process, port = start_redis(Path(folder))
        try:
            version = Redis(port=port).info("server")["redis_version"]
            print(
                f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load "
                f"{os.getloadavg()[0]:.1f}; redis-server {version}; Python {sys.version.split()[0]}; claims of "
                f"{args.claims_from or 'this checkout'}, window {args.window}, {args.claimers} claimers, "
                f"batches of up to {args.max_batch}",
                flush=True,
            )
            for size in (int(item) for item in args.sizes.split(",")):
                run_size(port, settings, module, size, args.claimers, args.claim_budget)
        finally:
            process.terminate()
            process.wait(10)


if __name__ == "__main__":
    main()
