"""Every Redis key and channel the service uses, named in one place."""

PREFIX = "mmaudio:"

RUNNING_JOBS = PREFIX + "running"  # set of job ids in status running (scanned for abandoned jobs)
WORKERS = PREFIX + "workers"  # set of worker names ever seen; the live ones also have a heartbeat key
WEBHOOKS_DUE = PREFIX + "webhooks"  # sorted set: job id -> unix time the next delivery is due
FILE_EXPIRY = PREFIX + "files"  # sorted set: filesystem-store blob name -> unix time it expires
STATUS_COUNTS = PREFIX + "stats:status"  # hash: status -> jobs that ever entered it
JOB_SECONDS = PREFIX + "stats:job_seconds"  # hash: variant -> moving average of a job's run time
DEADLINES = PREFIX + "deadlines"  # sorted set: job id -> its Cancel-After deadline (unix time)
WEBHOOK_EVENT_PREFIX = "evt_"  # webhook message ids of started/progress events: evt_<job id>_<nonce>


def job(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def job_events(job_id: str) -> str:
    """Pub/sub channel announcing every change of one job."""
    return f"{PREFIX}events:{job_id}"


def owner_jobs(owner: str) -> str:
    """Sorted set of one owner's job ids by creation time (for listing); ids of expired jobs are pruned."""
    return f"{PREFIX}owner:{owner}:jobs"


def idempotency(owner: str, key_digest: str) -> str:
    return f"{PREFIX}idem:{owner}:{key_digest}"


def webhook_event(message_id: str) -> str:
    """Hash of one pending started/progress webhook message: its URL, body (a snapshot) and attempts."""
    return f"{PREFIX}webhook:{message_id}"


def worker(name: str) -> str:
    """Heartbeat of one worker: JSON info, expires when the worker stops renewing it."""
    return f"{PREFIX}worker:{name}"


def blob(name: str) -> str:
    return f"{PREFIX}blob:{name}"


def claims(variant: str) -> str:
    """Sorted set: job id -> unix time a worker claimed it, over the last `drain_window_seconds` (the drain rate)."""
    return f"{PREFIX}stats:claims:{variant}"


def stage_histogram(stage: str) -> str:
    return f"{PREFIX}stats:stage:{stage}"


def queue_name(variant: str) -> str:
    """RQ queue of one variant (workers of a variant listen only to it)."""
    return f"mmaudio-{variant}"
