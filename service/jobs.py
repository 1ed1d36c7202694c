"""Job records in Redis and their state machine.

A job is one Redis hash. Every change goes through one Lua script that checks the current status (and,
for a worker, that it still owns the attempt) before writing, keeps the set of running jobs, counts
status entries for /metrics, sets the expiry of finished jobs and announces the change on the job's
pub/sub channel, all atomically. So a cancel racing a worker's start, or a worker finishing a job that
the reaper already declared lost, always resolves to exactly one outcome.

    queued -> running -> succeeded | failed | canceled
    queued -> canceled
    running -> queued            (an abandoned job retried once)

A deleted job's hash is removed outright: every later change of it is refused (the script finds no status), so
a worker still running it stops at its next report and removes whatever it stored meanwhile.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, get_args

from pydantic import BaseModel
from redis import Redis
from redis.client import Pipeline

from service import capacity, keys, queue
from service.capacity import QueuePlace
from service.problems import problem_body
from service.schemas import (
    EffectiveParams,
    InputInfo,
    JobStatus,
    ModelInfo,
    Progress,
    ResultFormat,
    StoredResult,
    WebhookState,
)
from service.settings import Settings
from service.storage import BlobStore, result_name

log = logging.getLogger(__name__)

JSON_FIELDS = ("params", "input", "model", "progress", "timings", "result", "error", "webhook")
# the JSON fields stored as a schema model: decoded into it, encoded from it
MODEL_FIELDS: dict[str, type[BaseModel]] = {
    "params": EffectiveParams,
    "input": InputInfo,
    "model": ModelInfo,
    "progress": Progress,
    "result": StoredResult,
    "webhook": WebhookState,
}

# A Lua function applying one guarded change to a job, shared by every script that changes jobs (this
# module's update, the workers' batch claim). Arguments: job hash, running set, status counts, pub/sub channel,
# job id, allowed statuses (space separated), owning worker ('' = any), attempt ('' = any), new status
# ('' = keep), expiry seconds (0 = none), event, a Lua array of field/value pairs.
# Returns {1, status, cancel flag} when applied, {0, current status, cancel flag} when refused, nil when absent.
CHANGE_JOB_LUA = """
local function change_job(job_key, running_key, counts_key, channel, job_id, allowed, by_worker, at_attempt,
                          new_status, expire_seconds, event, fields)
  local current = redis.call('HGET', job_key, 'status')
  if not current then return nil end
  local cancel = redis.call('HGET', job_key, 'cancel') or ''
  if not string.find(' ' .. allowed .. ' ', ' ' .. current .. ' ', 1, true) then return {0, current, cancel} end
  if by_worker ~= '' and redis.call('HGET', job_key, 'worker') ~= by_worker then return {0, current, cancel} end
  if at_attempt ~= '' and redis.call('HGET', job_key, 'attempts') ~= at_attempt then return {0, current, cancel} end
  for i = 1, #fields, 2 do redis.call('HSET', job_key, fields[i], fields[i + 1]) end
  local status = current
  if new_status ~= '' then
    status = new_status
    redis.call('HSET', job_key, 'status', status)
    if status == 'running' then redis.call('SADD', running_key, job_id) else redis.call('SREM', running_key, job_id) end
    redis.call('HINCRBY', counts_key, status, 1)
  end
  if tonumber(expire_seconds) > 0 then redis.call('EXPIRE', job_key, expire_seconds) end
  redis.call('HINCRBY', job_key, 'revision', 1)
  redis.call('PUBLISH', channel, event)
  return {1, status, redis.call('HGET', job_key, 'cancel') or ''}
end
"""

# KEYS: job hash, running set, status counts.
# ARGV: job id, allowed statuses, owning worker, attempt, new status, expiry seconds, channel, event, then
#       field/value pairs (see CHANGE_JOB_LUA).
UPDATE_SCRIPT = (
    CHANGE_JOB_LUA
    + """
local fields = {}
for i = 9, #ARGV do fields[#fields + 1] = ARGV[i] end
return change_job(KEYS[1], KEYS[2], KEYS[3], ARGV[7], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[8],
                  fields)
"""
)


# KEYS: the variant's queued-job counter, the job hash. Numbers the job in arrival order (queue.position); run in
# the transaction that queues the job, so the numbers follow the order of the queue.
NUMBER_SCRIPT = "redis.call('HSET', KEYS[2], 'queue_seq', redis.call('INCR', KEYS[1]))"


def schedule_webhook(redis: Redis, job_id: str, due: float | None = None) -> None:
    """Make the webhook of a finished job (or a webhook message: its id) due at ``due`` (now by default)."""
    redis.zadd(keys.WEBHOOKS_DUE, {job_id: time.time() if due is None else due})


def deadline_problem(record: JobRecord) -> dict[str, Any]:
    assert record.deadline is not None
    when = datetime.fromtimestamp(record.deadline, UTC).isoformat(timespec="seconds")
    return problem_body("deadline-exceeded", f"Cancel-After: the job had to finish by {when}.")


def result_names(job_id: str, num_samples: int) -> list[str]:
    """Every result file a job can have (most exist only once asked for)."""
    return [result_name(job_id, sample, fmt) for sample in range(num_samples) for fmt in get_args(ResultFormat)]


@dataclass
class JobRecord:
    id: str
    owner: str
    status: JobStatus
    created_at: float
    params: EffectiveParams
    input: InputInfo
    model: ModelInfo
    upload: str | None = None  # blob name of the uploaded file
    started_at: float | None = None
    finished_at: float | None = None
    progress: Progress | None = None
    timings: dict[str, Any] = field(default_factory=dict)
    result: StoredResult | None = None
    error: dict[str, Any] | None = None  # problem details (problems.problem_body)
    webhook: WebhookState | None = None
    attempts: int = 0
    worker: str | None = None
    cancel_requested: bool = False
    revision: int = 1  # counts the job's applied changes: the id of its server-sent events
    deadline: float | None = None  # unix time of its Cancel-After: canceled if not finished by then

    @property
    def overdue(self) -> bool:
        return self.deadline is not None and time.time() >= self.deadline

    @property
    def variant(self) -> str:
        return self.params.variant

    def timeout_seconds(self, settings: Settings) -> float:
        """How long the job may run: the base timeout, grown with the audio it generates."""
        return settings.job_timeout(self.params.duration, self.params.num_samples)

    def to_hash(self) -> dict[str, str]:
        values: dict[str, Any] = {
            "id": self.id,
            "owner": self.owner,
            "status": self.status.value,
            "created_at": repr(self.created_at),
            "upload": self.upload or "",
            "attempts": str(self.attempts),
            "worker": self.worker or "",
            "cancel": "1" if self.cancel_requested else "",
            "revision": str(self.revision),
        }
        for name in ("started_at", "finished_at", "deadline"):
            value = getattr(self, name)
            if value is not None:
                values[name] = repr(value)
        present = {name: getattr(self, name) for name in JSON_FIELDS if getattr(self, name) is not None}
        return values | encode_fields(present)

    @classmethod
    def readable(cls, job_id: str, raw: dict[bytes, bytes]) -> JobRecord | None:
        """The record, or None (logged) when the stored hash does not parse: a corrupted record is skipped by
        listings instead of failing them for its owner."""
        try:
            return cls.from_hash(raw)
        except (KeyError, ValueError) as err:  # ValueError covers bad JSON, bad UTF-8 and failed validation
            log.error("job %s: its stored record does not parse (%s)", job_id, err)
            return None

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> JobRecord:
        data = {key.decode(): value.decode() for key, value in raw.items()}

        def number(name: str) -> float | None:
            return float(data[name]) if data.get(name) else None

        def decoded(name: str) -> Any:
            if not data.get(name) or data[name] == "null":
                return None
            schema = MODEL_FIELDS.get(name)
            return schema.model_validate_json(data[name]) if schema else json.loads(data[name])

        return cls(
            id=data["id"],
            owner=data["owner"],
            status=JobStatus(data["status"]),
            created_at=float(data["created_at"]),
            params=decoded("params"),
            input=decoded("input"),
            model=decoded("model"),
            upload=data.get("upload") or None,
            started_at=number("started_at"),
            finished_at=number("finished_at"),
            progress=decoded("progress"),
            timings=decoded("timings") or {},
            result=decoded("result"),
            error=decoded("error"),
            webhook=decoded("webhook"),
            attempts=int(data.get("attempts") or 0),
            worker=data.get("worker") or None,
            cancel_requested=bool(data.get("cancel")),
            revision=int(data.get("revision") or 1),
            deadline=number("deadline"),
        )


@dataclass(frozen=True)
class UpdateOutcome:
    applied: bool
    status: JobStatus | None  # None: the job does not exist (any more)
    cancel_requested: bool = False


def _outcome(reply: list | None) -> UpdateOutcome:
    if reply is None:
        return UpdateOutcome(False, None)
    applied, status, cancel = reply
    return UpdateOutcome(bool(applied), JobStatus(status.decode()), bool(cancel))


def encode_fields(fields: dict[str, Any]) -> dict[str, str]:
    """Field values as the hash stores them: JSON for structured ones (schema models or plain values), repr
    for times. The one place a record's fields are encoded for Redis; JobRecord.from_hash decodes them."""
    encoded = {}
    for name, value in fields.items():
        if isinstance(value, BaseModel):
            encoded[name] = value.model_dump_json()
        elif name in JSON_FIELDS:
            encoded[name] = json.dumps(value)
        elif isinstance(value, float):
            encoded[name] = repr(value)
        else:
            encoded[name] = "" if value is None else str(value)
    return encoded


class JobStore:
    def __init__(self, redis: Redis, settings: Settings, store: BlobStore) -> None:
        self.redis = redis
        self.settings = settings
        self.store = store
        self._update = redis.register_script(UPDATE_SCRIPT)

    def create(self, *records: JobRecord) -> None:
        """Save new queued jobs and put their first attempts on their variants' queues, in one transaction (the
        API creates one job at a time; more at once save round trips, as for the queue benchmark)."""
        lifetime = self.settings.upload_ttl_seconds + self.settings.result_ttl_seconds
        with self.redis.pipeline() as pipe:
            pipe.multi()  # explicit, as RQ expects of a pipeline it enqueues on
            for record in records:
                job_key = keys.job(record.id)
                pipe.hset(job_key, mapping=record.to_hash())
                pipe.expire(job_key, self.settings.upload_ttl_seconds)
                pipe.hincrby(keys.STATUS_COUNTS, JobStatus.queued.value, 1)
                # the owner's index outlives none of its jobs: a job lives at most this long after its creation
                index = keys.owner_jobs(record.owner)
                pipe.zadd(index, {record.id: record.created_at})
                pipe.zremrangebyscore(index, "-inf", f"({record.created_at - lifetime!r}")
                pipe.expire(index, lifetime)
                if record.deadline is not None:
                    pipe.zadd(keys.DEADLINES, {record.id: record.deadline})
                pipe.eval(NUMBER_SCRIPT, 2, keys.queued_count(record.variant), job_key)  # short: no SHA round trip
                queue.enqueue(
                    self.redis,
                    record.variant,
                    record.id,
                    record.attempts + 1,
                    record.timeout_seconds(self.settings),
                    self.settings.upload_ttl_seconds,
                    pipeline=pipe,
                )
            pipe.execute()

    def get(self, job_id: str) -> JobRecord | None:
        raw = self.redis.hgetall(keys.job(job_id))
        return JobRecord.from_hash(raw) if raw else None

    def update(
        self,
        job_id: str,
        allowed: tuple[JobStatus, ...],
        new_status: JobStatus | None = None,
        *,
        by_worker: str | None = None,
        at_attempt: int | None = None,
        expire_seconds: int = 0,
        event: str = "update",
        **fields: Any,
    ) -> UpdateOutcome:
        """Apply ``fields`` (and ``new_status``) if the job is in an ``allowed`` status and, when given, is
        owned by worker ``by_worker`` at attempt ``at_attempt``."""
        reply = self._update(
            **self._script_call(job_id, allowed, new_status, by_worker, at_attempt, expire_seconds, event, fields)
        )
        return _outcome(reply)

    def update_owned(
        self,
        owned: Sequence[tuple[str, int]],
        allowed: tuple[JobStatus, ...],
        by_worker: str,
        event: str = "update",
        **fields: Any,
    ) -> list[UpdateOutcome]:
        """``update`` of several jobs, each (job id, attempt) owned by ``by_worker``, in one round trip."""
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id, attempt in owned:
                call = self._script_call(job_id, allowed, None, by_worker, attempt, 0, event, fields)
                self._update(**call, client=pipe)
            return [_outcome(reply) for reply in pipe.execute()]

    def update_in(
        self,
        pipeline: Pipeline,
        job_id: str,
        allowed: tuple[JobStatus, ...],
        new_status: JobStatus | None = None,
        *,
        by_worker: str | None = None,
        at_attempt: int | None = None,
        **fields: Any,
    ) -> None:
        """``update`` queued on ``pipeline`` (to commit together with other writes); its outcome is not read."""
        call = self._script_call(job_id, allowed, new_status, by_worker, at_attempt, 0, "update", fields)
        self._update(**call, client=pipeline)

    @staticmethod
    def _script_call(
        job_id: str,
        allowed: tuple[JobStatus, ...],
        new_status: JobStatus | None,
        by_worker: str | None,
        at_attempt: int | None,
        expire_seconds: int,
        event: str,
        fields: dict[str, Any],
    ) -> dict[str, list]:
        pairs = [item for pair in encode_fields(fields).items() for item in pair]
        return {
            "keys": [keys.job(job_id), keys.RUNNING_JOBS, keys.STATUS_COUNTS],
            "args": [
                job_id,
                " ".join(status.value for status in allowed),
                by_worker or "",
                "" if at_attempt is None else str(at_attempt),
                new_status.value if new_status else "",
                expire_seconds,
                keys.job_events(job_id),
                new_status.value if new_status else event,
                *pairs,
            ],
        }

    def finish(
        self,
        record: JobRecord,
        allowed: tuple[JobStatus, ...],
        new_status: JobStatus,
        *,
        by_worker: str | None = None,
        at_attempt: int | None = None,
        **fields: Any,
    ) -> UpdateOutcome:
        """Move a job into a terminal status. Once applied the record lives for ``result_ttl_seconds``, its
        upload is deleted and its webhook (if any) becomes due."""
        outcome = self.end(record.id, allowed, new_status, by_worker=by_worker, at_attempt=at_attempt, **fields)
        if outcome.applied:
            self.settle(record)
        return outcome

    def settle(self, record: JobRecord) -> None:
        """What follows a job's end (``finish``'s second part): its upload deleted, its `completed` webhook due,
        its deadline dropped. Repeatable."""
        if record.upload:
            self.store.delete(record.upload)
        if record.webhook and "completed" in record.webhook.events:
            schedule_webhook(self.redis, record.id)
        if record.deadline is not None:
            self.redis.zrem(keys.DEADLINES, record.id)

    def end(
        self,
        job_id: str,
        allowed: tuple[JobStatus, ...],
        new_status: JobStatus,
        *,
        by_worker: str | None = None,
        at_attempt: int | None = None,
        **fields: Any,
    ) -> UpdateOutcome:
        """The record's part of ``finish``: the terminal status, finish time and result lifetime, nothing else."""
        assert new_status.terminal
        return self.update(
            job_id,
            allowed,
            new_status,
            by_worker=by_worker,
            at_attempt=at_attempt,
            expire_seconds=self.settings.result_ttl_seconds,
            finished_at=time.time(),
            progress=None,
            **fields,
        )

    def fail_unreadable(self, job_id: str, attempt: int, by_worker: str) -> None:
        """End a job that ``by_worker`` took at ``attempt`` but whose record does not parse: failed with a typed
        error, its upload and webhook handled as far as the record can still be read."""
        error = problem_body("unreadable-job", "The job's stored parameters cannot be read; submit it again.")
        running = (JobStatus.running,)
        record = JobRecord.readable(job_id, self.redis.hgetall(keys.job(job_id)))
        if record is None:
            self.end(job_id, running, JobStatus.failed, by_worker=by_worker, at_attempt=attempt, error=error)
        else:
            self.finish(record, running, JobStatus.failed, by_worker=by_worker, at_attempt=attempt, error=error)

    def cancel(self, record: JobRecord) -> JobRecord | None:
        """Cancel a queued job at once; ask a running one to stop at its next progress report."""
        outcome = self.finish(record, (JobStatus.queued,), JobStatus.canceled)
        if outcome.applied:
            queue.withdraw(self.redis, record.variant, record.id, record.attempts + 1)
        elif outcome.status is JobStatus.running:
            self.update(record.id, (JobStatus.running,), event="cancel", cancel="1")
        return self.get(record.id)

    def cancel_overdue(self, record: JobRecord) -> bool:
        """Cancel a queued job whose deadline has passed (it never starts); returns whether it was."""
        outcome = self.finish(record, (JobStatus.queued,), JobStatus.canceled, error=deadline_problem(record))
        if outcome.applied:
            queue.withdraw(self.redis, record.variant, record.id, record.attempts + 1)
        return outcome.applied

    def delete(self, record: JobRecord) -> None:
        """Cancel the job if it has not ended, then remove its record, upload, results and pending webhooks:
        from now on it does not exist for anyone."""
        if not record.status.terminal:
            self.update(record.id, (JobStatus.queued, JobStatus.running), JobStatus.canceled, event="deleted")
            queue.withdraw(self.redis, record.variant, record.id, record.attempts + 1)
        pattern = f"{keys.WEBHOOK_EVENT_PREFIX}{record.id}_*"
        messages = [member.decode() for member, _ in self.redis.zscan_iter(keys.WEBHOOKS_DUE, match=pattern)]
        with self.redis.pipeline() as pipe:
            pipe.delete(keys.job(record.id), *(keys.webhook_event(message) for message in messages))
            pipe.zrem(keys.owner_jobs(record.owner), record.id)
            pipe.zrem(keys.WEBHOOKS_DUE, record.id, *messages)
            pipe.zrem(keys.DEADLINES, record.id)
            pipe.srem(keys.RUNNING_JOBS, record.id)
            pipe.publish(keys.job_events(record.id), "deleted")  # followers see the job gone
            pipe.execute()
        uploaded = [record.upload] if record.upload else []
        self.store.delete(*uploaded, *result_names(record.id, record.params.num_samples))

    def owned(
        self, owner: str, limit: int, before: float | None = None, statuses: set[JobStatus] | None = None
    ) -> tuple[list[JobRecord], float | None]:
        """The owner's jobs created before ``before`` (all when None), newest first, at most ``limit``, only
        those in ``statuses`` when given; and the cursor of the next page (None on the last page)."""
        index = keys.owner_jobs(owner)
        top = "+inf" if before is None else f"({before!r}"
        found: list[JobRecord] = []
        while True:
            chunk = self.redis.zrevrangebyscore(index, top, "-inf", start=0, num=limit + 1, withscores=True)
            with self.redis.pipeline(transaction=False) as pipe:
                for job_id, _ in chunk:
                    pipe.hgetall(keys.job(job_id.decode()))
                raws = pipe.execute()
            expired = [job_id for (job_id, _), raw in zip(chunk, raws, strict=True) if not raw]
            if expired:
                self.redis.zrem(index, *expired)
            for (job_id, created), raw in zip(chunk, raws, strict=True):
                if not raw:
                    continue
                record = JobRecord.readable(job_id.decode(), raw)
                if record is not None and (statuses is None or record.status in statuses):
                    if len(found) == limit:
                        return found, found[-1].created_at
                    found.append(record)
                top = f"({created!r}"
            if len(chunk) <= limit:
                return found, None

    def queue_place(self, record: JobRecord) -> QueuePlace | None:
        """A queued job's position and estimated start (capacity.drain); None unless it is queued."""
        if record.status is not JobStatus.queued:
            return None
        scan = self.settings.queue_position_scan
        position = queue.position(self.redis, record.variant, record.id, record.attempts + 1, scan)
        if position is None:
            return None
        wait = capacity.drain(self.redis, self.settings, record.variant).wait_seconds(position)
        return QueuePlace(position, None if wait is None else time.time() + wait)

    def running_ids(self) -> list[str]:
        return [job_id.decode() for job_id in self.redis.smembers(keys.RUNNING_JOBS)]
