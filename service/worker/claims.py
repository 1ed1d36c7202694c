"""How a worker takes jobs off its variant's queue: whole batches, atomically, oldest first.

A batch is the oldest job the worker may take and the next queued jobs with the same duration (as sized at
submit) and step count (the pipeline splits it further when a video turns out shorter than asked), as many as
are queued now within the claim window, up to a limit; a job longer than `batch_max_duration` (a long video) is
a batch of its own. One Lua script picks the batch, takes its entries off the list and moves every job to
`running` under this worker, so two workers never take the same job and a worker that dies right after leaves
running jobs, which the API's reaper fails or retries.

The scripts look only at the window (`claim_window` entries at the head of the queue), so a claim costs the
same however long the queue. The stale entries they meet (canceled, expired, re-queued as a later attempt)
are removed there and then, a window's worth at most per script run; a claim that only cleaned runs again.

While its GPU is busy a worker *reserves* the batch it will take next and decodes its inputs ahead. Reserved
jobs stay queued (clients see their queue position, a cancel withdraws them); a reservation only steers
choices: a worker claims its own reserved jobs first, and other busy workers reserve past them. An idle
worker ignores other workers' reservations (it starts the oldest job at once), and a reservation of a worker
whose heartbeat expired counts for nothing.
"""

from __future__ import annotations

import math
import time
from typing import Any

from service import keys, queue
from service.jobs import CHANGE_JOB_LUA, JobRecord, JobStore, encode_fields
from service.schemas import ModelInfo
from service.worker.outages import persist

# Lua functions of both scripts.
#   queued_jobs: the valid entries of the window (the first `window` of the queue) in order, each {entry, id,
#     attempt, duration, steps, samples, holder} with holder 'own', 'other' (reserved by another live worker)
#     or 'free'. An entry is stale when its job is no longer queued at that attempt (canceled, expired,
#     re-queued as a later attempt); stale entries are removed when `drop_stale` and returned (their RQ hashes
#     are the caller's: see keys.py). Also returned: the queued jobs of the window whose record does not parse,
#     and those whose Cancel-After deadline is at or before `now` (never started: canceled instead).
#   next_batch: the group (duration, steps) of the worker's oldest own reservation, else of the oldest job it
#     may take; then the oldest jobs of that group it may take, as long as their samples (rows of the pass)
#     add up to at most `limit` (the first job is taken whatever its size); a first job longer than `alone_above`
#     seconds (a long video: many windows) is taken alone. Jobs reserved by others are taken only by a worker
#     without reservations of its own that is allowed to (`takes_reserved`).
SELECTION_LUA = """
local function queued_jobs(queue_key, window, job_prefix, reserved_prefix, worker_prefix, worker, drop_stale, now)
  local found, unreadable, stale, expired = {}, {}, {}, {}
  for _, entry in ipairs(redis.call('LRANGE', queue_key, 0, window - 1)) do
    local id, attempt = string.match(entry, '^(.+)_(%d+)$')
    local job = id and redis.call('HMGET', job_prefix .. id, 'status', 'attempts', 'params', 'deadline')
    local current = job and job[1] == 'queued' and tonumber(job[2]) == tonumber(attempt) - 1
    local readable, params = false, nil
    if current then readable, params = pcall(cjson.decode, job[3]) end
    readable = readable and type(params) == 'table' and type(params.duration) == 'number'
               and type(params.num_steps) == 'number' and type(params.num_samples or 1) == 'number'
    local deadline = current and tonumber(job[4] or '')
    if readable and deadline and deadline <= now then
      expired[#expired + 1] = {entry = entry, id = id, attempt = tonumber(attempt)}
    elseif current and not readable then
      unreadable[#unreadable + 1] = {entry = entry, id = id, attempt = tonumber(attempt)}
    elseif readable then
      local holder = redis.call('GET', reserved_prefix .. id)
      local mark = 'free'
      if holder == worker then
        mark = 'own'
      elseif holder and redis.call('EXISTS', worker_prefix .. holder) == 1 then
        mark = 'other'
      end
      found[#found + 1] = {entry = entry, id = id, attempt = tonumber(attempt), duration = params.duration,
                           steps = params.num_steps, samples = params.num_samples or 1, holder = mark}
    elseif drop_stale then
      redis.call('LREM', queue_key, 1, entry)  -- met within the window: at most `window` entries scanned
      if id then redis.call('DEL', reserved_prefix .. id) end
      stale[#stale + 1] = entry
    end
  end
  return found, unreadable, stale, expired
end

local function next_batch(found, limit, takes_reserved, alone_above)
  local first = nil
  for _, job in ipairs(found) do
    if job.holder == 'own' then first = job; break end
  end
  local may_take_reserved = first == nil and takes_reserved
  if first == nil then
    for _, job in ipairs(found) do
      if may_take_reserved or job.holder ~= 'other' then first = job; break end
    end
  end
  local batch, rows = {}, 0
  if first == nil or limit < 1 then return batch end
  if first.duration > alone_above then return {first} end
  for _, job in ipairs(found) do
    if job.duration == first.duration and job.steps == first.steps
        and (may_take_reserved or job.holder ~= 'other') and (#batch == 0 or rows + job.samples <= limit) then
      batch[#batch + 1] = job
      rows = rows + job.samples
    end
  end
  return batch
end
"""

# KEYS: running set, status counts, queue list.
# ARGV: worker, limit, window, job key prefix, job channel prefix, reservation key prefix, worker heartbeat key
#       prefix, longest duration batched with others, now (unix time), then field/value pairs set on every
#       claimed job.
# Returns the claimed queue entries, oldest first; the entries of queued jobs whose parameters do not parse,
# which are taken too (the worker fails them) so that one bad record can never block the queue; the stale
# entries removed; and the entries of queued jobs past their deadline, taken off the queue but left queued (the
# worker cancels them).
CLAIM_SCRIPT = (
    CHANGE_JOB_LUA
    + SELECTION_LUA
    + """
local found, unreadable, stale, expired = queued_jobs(KEYS[3], tonumber(ARGV[3]), ARGV[4], ARGV[6], ARGV[7],
                                                      ARGV[1], true, tonumber(ARGV[9]))
local function take(jobs, start)
  local entries = {}
  for _, job in ipairs(jobs) do
    redis.call('LREM', KEYS[3], 1, job.entry)
    redis.call('DEL', ARGV[6] .. job.id)
    if start then
      local fields = {'attempts', tostring(job.attempt)}
      for i = 10, #ARGV do fields[#fields + 1] = ARGV[i] end
      change_job(ARGV[4] .. job.id, KEYS[1], KEYS[2], ARGV[5] .. job.id, job.id, 'queued', '',
                 tostring(job.attempt - 1), 'running', 0, 'running', fields)
    end
    entries[#entries + 1] = job.entry
  end
  return entries
end
return {take(next_batch(found, tonumber(ARGV[2]), true, tonumber(ARGV[8])), true), take(unreadable, true),
        stale, take(expired, false)}
"""
)

# KEYS: queue list.
# ARGV: worker, limit, window, job key prefix, reservation key prefix, worker heartbeat key prefix, reservation
#       TTL (s), longest duration batched with others, now (unix time).
# Returns the reserved queue entries, oldest first; the worker's reservations within the window outside them are
# dropped (one pushed out of it by jobs re-queued at the front expires by itself).
RESERVE_SCRIPT = (
    SELECTION_LUA
    + """
local found = queued_jobs(KEYS[1], tonumber(ARGV[3]), ARGV[4], ARGV[5], ARGV[6], ARGV[1], false, tonumber(ARGV[9]))
local chosen, entries = {}, {}
for _, job in ipairs(next_batch(found, tonumber(ARGV[2]), false, tonumber(ARGV[8]))) do
  redis.call('SET', ARGV[5] .. job.id, ARGV[1], 'EX', ARGV[7])
  chosen[job.id] = true
  entries[#entries + 1] = job.entry
end
for _, job in ipairs(found) do
  if job.holder == 'own' and not chosen[job.id] then redis.call('DEL', ARGV[5] .. job.id) end
end
return entries
"""
)


def running_fields(worker_name: str, model: ModelInfo) -> dict[str, Any]:
    """What taking a job records on it (besides its attempt): who runs it, since when, with which model."""
    return {
        "worker": worker_name,
        "started_at": time.time(),
        "model": model,
        "progress": {"stage": "starting", "fraction": 0.0},
    }


class QueueClaims:
    """One worker's view of its variant's queue: claim a batch, reserve the next one, wait for work."""

    def __init__(self, jobs: JobStore, variant: str, worker_name: str, reservation_seconds: float) -> None:
        self.jobs = jobs
        self.redis = redis = jobs.redis
        self.claims_key = keys.claims(variant)
        self.worker_name = worker_name
        self.queue_key = queue.list_key(variant)
        self.window = jobs.settings.claim_window
        self.reservation_seconds = max(1, math.ceil(reservation_seconds))  # renewed at every reserve
        self._claim = redis.register_script(CLAIM_SCRIPT)
        self._reserve = redis.register_script(RESERVE_SCRIPT)

    def claim(self, limit: int, model: ModelInfo) -> list[JobRecord]:
        """Take the next batch (at most ``limit`` samples): each job becomes ``running`` under this worker, its
        attempt counted, its start time and the loaded ``model`` recorded. Taken jobs whose record does not
        parse are failed here, so that one bad record fails alone instead of stopping every worker. A window
        holding only stale entries is cleaned and the next one looked at, so an empty answer means an empty
        queue (or one whose head moved meanwhile)."""
        fields = running_fields(self.worker_name, model)
        pairs = [item for pair in encode_fields(fields).items() for item in pair]
        args = [
            self.worker_name,
            limit,
            self.window,
            keys.job(""),
            keys.job_events(""),
            queue.RESERVATION_PREFIX,
            keys.worker(""),
            self.jobs.settings.batch_max_duration,
            time.time(),
            *pairs,
        ]
        while True:
            claim_keys = [keys.RUNNING_JOBS, keys.STATUS_COUNTS, self.queue_key]
            batch, unreadable, stale, expired = self._claim(keys=claim_keys, args=args)
            if batch or unreadable or expired or len(stale) < self.window:
                break
            queue.forget_entries(self.redis, [entry.decode() for entry in stale])
        taken = [entry.decode() for entry in (*batch, *unreadable, *stale, *expired)]
        owned = [queue.parse_rq_job_id(entry.decode()) for entry in batch]
        now = time.time()

        def read_claimed() -> list:
            with self.redis.pipeline(transaction=False) as pipe:
                for job_id, _ in owned:
                    pipe.hgetall(keys.job(job_id))
                if owned:  # the recent claims are the queue's measured drain rate (Retry-After of a full queue)
                    pipe.zadd(self.claims_key, {job_id: now for job_id, _ in owned})
                    pipe.zremrangebyscore(self.claims_key, "-inf", now - self.jobs.settings.drain_window_seconds)
                return pipe.execute()[: len(owned)]

        # the jobs are ours now: an outage must not lose them between the claim and this read
        raws = persist(read_claimed, "reading claimed jobs", self.jobs.settings.redis_reconnect_max_seconds)
        queue.forget_entries(self.redis, taken)
        records: list[JobRecord] = []
        broken = [queue.parse_rq_job_id(entry.decode()) for entry in unreadable]
        for (job_id, attempt), raw in zip(owned, raws, strict=True):
            record = JobRecord.readable(job_id, raw)
            if record is None:
                broken.append((job_id, attempt))
            else:
                records.append(record)
        for job_id, attempt in broken:
            self.jobs.fail_unreadable(job_id, attempt, self.worker_name)
        for job_id, _ in (queue.parse_rq_job_id(entry.decode()) for entry in expired):
            overdue = self.jobs.get(job_id)
            if overdue is not None:
                self.jobs.cancel_overdue(overdue)
        return records

    def reserve(self, limit: int) -> list[str]:
        """Reserve the batch this worker would claim next; returns its queue entries (``<job id>_<attempt>``)."""
        entries = self._reserve(
            keys=[self.queue_key],
            args=[
                self.worker_name,
                limit,
                self.window,
                keys.job(""),
                queue.RESERVATION_PREFIX,
                keys.worker(""),
                self.reservation_seconds,
                self.jobs.settings.batch_max_duration,
                time.time(),
            ],
        )
        return [entry.decode() for entry in entries]

    def release(self) -> None:
        """Drop every reservation of this worker (when it stops)."""
        self.reserve(0)

    def wait_for_work(self, timeout_seconds: float) -> None:
        """Block until the queue holds an entry, or at most ``timeout_seconds``."""
        # Moving the head to the head of the same list changes nothing, but blocks while the list is empty.
        self.redis.blmove(self.queue_key, self.queue_key, timeout_seconds, src="LEFT", dest="LEFT")
