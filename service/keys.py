"""Every Redis key and channel the service uses, named in one place.

Hash tag: every key of ours starts with ``{mmaudio}:``, so Redis Cluster puts all of them in one slot. The
Lua scripts read and write many keys at once (a claim: the job hashes of its window, the running set, the
status counts, reservations and worker heartbeats; a job change: the job hash, the running set, the status
counts), and Cluster runs a script only when its keys share a slot; the job keys are named by job id alone
(the API looks a job up by id), so a per-variant tag could not cover them. One slot also keeps the pipelines
that read several jobs (MGET of heartbeats, listings) single-node.

The boundary is RQ's keys, which cannot carry a tag: RQ names a queue's list ``rq:queue:<queue name>`` and a
queued job's hash ``rq:job:<RQ job id>``, and it refuses braces in job ids. We keep RQ's format (a stock
``rq worker`` serves our queues), so:
  - the queue list ``rq:queue:mmaudio-<variant>`` is the one foreign key of the claim and reserve scripts
    (taking entries off it atomically with the jobs' status change is the point of a claim) and of the
    transactions that queue a job (``JobStore.create``, the reaper's retry), together with RQ's job hash;
  - the claim script never touches RQ's job hashes: the worker deletes those of the entries it took or
    dropped right after, and each expires with its job anyway (``queue.enqueue``).
RQ itself runs MULTI transactions over ``rq:job:*``, ``rq:queue:*`` and ``rq:queues``, so it does not run on
Redis Cluster; neither, therefore, does the service: it needs one Redis endpoint (standalone, or a managed
primary with replicas and failover). Everything else already fits a single Cluster slot.
"""

PREFIX = "{mmaudio}:"

RUNNING_JOBS = PREFIX + "running"  # set of job ids in status running (scanned for abandoned jobs)
WORKERS = PREFIX + "workers"  # set of worker names ever seen; the live ones also have a heartbeat key
WEBHOOKS_DUE = PREFIX + "webhooks"  # sorted set: job id -> unix time the next delivery is due
FILE_EXPIRY = PREFIX + "files"  # sorted set: filesystem-store blob name -> unix time it expires
S3_EXPIRY = PREFIX + "s3:expiry"  # sorted set: S3-store blob name -> unix time it expires
S3_WRITES = PREFIX + "s3:writes"  # sorted set: S3-store blob name being written -> unix time of its last progress
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


def queued_count(variant: str) -> str:
    """Counter of the jobs ever queued for a variant: each job keeps its number (`queue_seq`), which places it
    in a long queue without scanning the list (queue.position)."""
    return f"{PREFIX}queued:{variant}"


def stage_histogram(stage: str) -> str:
    return f"{PREFIX}stats:stage:{stage}"


def queue_name(variant: str) -> str:
    """RQ queue of one variant (workers of a variant listen only to it); its list is RQ's, untagged (see above)."""
    return f"mmaudio-{variant}"
