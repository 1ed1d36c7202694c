"""Webhooks: job events POSTed to the client's URL, signed the Standard Webhooks way, retried with backoff.

Headers: ``webhook-id`` (the same on every retry, so receivers can drop duplicates), ``webhook-timestamp``
(unix seconds) and ``webhook-signature: v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">``. The body is
``{"type": "job.<status>", "timestamp": ..., "data": <job object>}`` for the `completed` event (the job as it
is at delivery, its state kept in the job's `webhook`), and ``job.started`` / ``job.progress`` with a snapshot
of the job when the worker announced the event (each message kept in its own hash until delivered or given up).

Deliveries are scheduled in a Redis sorted set (job id or message id -> due time). Any API process claims due
ones for a lease, so several replicas never deliver the same webhook at once, and one that dies mid-delivery
only delays the retry until its lease ends.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
from redis import Redis

from service import keys, views
from service.jobs import JobRecord, JobStore, schedule_webhook
from service.outbound import ForbiddenURL, UnresolvableURL, send_pinned
from service.schemas import JobStatus, WebhookEvent
from service.settings import Settings

log = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"
CLAIM_LEASE_SECONDS = 120.0
CLAIM_BATCH = 16

# KEYS: due set. ARGV: now, lease end, batch size. Moves each due member to the lease end and returns it.
CLAIM_SCRIPT = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, member in ipairs(due) do redis.call('ZADD', KEYS[1], ARGV[2], member) end
return due
"""


def signing_key(secret: str) -> bytes:
    """A ``whsec_`` secret carries base64 key bytes; any other string is used as it is."""
    if secret.startswith(SECRET_PREFIX):
        return base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    return secret.encode()


def signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(signing_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def message_body(event_type: str, job: dict[str, Any]) -> bytes:
    return json.dumps({"type": event_type, "timestamp": datetime.now(UTC).isoformat(), "data": job}).encode()


def announce(redis: Redis, record: JobRecord, event: WebhookEvent, job: dict[str, Any], ttl_seconds: int) -> bool:
    """Queue a ``started`` or ``progress`` webhook of ``record`` carrying ``job`` (its job object now), if the
    job asked for that event; returns whether it did."""
    if record.webhook is None or event not in record.webhook.events:
        return False
    message_id = f"{keys.WEBHOOK_EVENT_PREFIX}{record.id}_{uuid.uuid4().hex[:12]}"
    body = message_body(f"job.{event}", job)
    with redis.pipeline() as pipe:
        pipe.hset(keys.webhook_event(message_id), mapping={"job": record.id, "url": record.webhook.url, "body": body})
        pipe.expire(keys.webhook_event(message_id), ttl_seconds)
        pipe.zadd(keys.WEBHOOKS_DUE, {message_id: time.time()})
        pipe.execute()
    return True


class WebhookSender:
    def __init__(self, redis: Redis, settings: Settings, jobs: JobStore) -> None:
        self.redis = redis
        self.settings = settings
        self.jobs = jobs
        self._claim = redis.register_script(CLAIM_SCRIPT)
        self.client = httpx.Client(timeout=settings.webhook_timeout_seconds, follow_redirects=False)

    def close(self) -> None:
        self.client.close()

    def deliver_due(self) -> int:
        """Try every due delivery once; returns how many were tried."""
        now = time.time()
        due = self._claim(keys=[keys.WEBHOOKS_DUE], args=[now, now + CLAIM_LEASE_SECONDS, CLAIM_BATCH])
        for member in due:
            name = member.decode()
            if name.startswith(keys.WEBHOOK_EVENT_PREFIX):
                self._attempt_event(name)
            else:
                self._attempt(name)
        return len(due)

    def _retry_delay(self, attempts: int) -> float:
        return self.settings.webhook_backoff_seconds * 2 ** (attempts - 1)

    def _attempt(self, job_id: str) -> None:
        record = self.jobs.get(job_id)
        if record is None or record.webhook is None or not record.status.terminal:
            self.redis.zrem(keys.WEBHOOKS_DUE, job_id)
            return
        webhook = record.webhook.model_copy()
        body = message_body(f"job.{record.status.value}", views.job_view(record, webhook.base_url, None))
        error = self._post(webhook.url, f"msg_{job_id}", body)
        webhook.attempts += 1
        webhook.last_error = error
        if error is None:
            webhook.status = "delivered"
        elif webhook.attempts >= self.settings.webhook_max_attempts:
            webhook.status = "failed"
        else:
            schedule_webhook(self.redis, job_id, time.time() + self._retry_delay(webhook.attempts))
        if webhook.status != "pending":
            self.redis.zrem(keys.WEBHOOKS_DUE, job_id)
        terminal = tuple(status for status in JobStatus if status.terminal)
        self.jobs.update(job_id, terminal, event="webhook", webhook=webhook)

    def _attempt_event(self, message_id: str) -> None:
        """One delivery of a started/progress message; dropped once delivered, given up, or its job is gone."""
        key = keys.webhook_event(message_id)
        message = self.redis.hgetall(key)
        job_id = message.get(b"job", b"").decode()
        if not message or self.jobs.get(job_id) is None:
            self.redis.zrem(keys.WEBHOOKS_DUE, message_id)
            self.redis.delete(key)
            return
        error = self._post(message[b"url"].decode(), message_id, message[b"body"])
        attempts = self.redis.hincrby(key, "attempts", 1)
        if error is None or attempts >= self.settings.webhook_max_attempts:
            if error is not None:
                log.warning("webhook %s of job %s given up after %d attempts: %s", message_id, job_id, attempts, error)
            self.redis.zrem(keys.WEBHOOKS_DUE, message_id)
            self.redis.delete(key)
        else:
            schedule_webhook(self.redis, message_id, time.time() + self._retry_delay(attempts))

    def _post(self, url: str, message_id: str, body: bytes) -> str | None:
        """One delivery; returns None on success, else why it failed."""
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature(self.settings.webhook_secret or "", message_id, timestamp, body),
        }
        try:
            response = send_pinned(self.client, "POST", url, self.settings.webhook_allow_private, headers, body)
            response.close()  # only the status matters
        except (ForbiddenURL, UnresolvableURL) as err:
            return f"webhook_url: {err}"
        except (httpx.HTTPError, httpx.InvalidURL) as err:
            return f"{type(err).__name__}: {err}"
        if response.is_success:
            return None
        return f"HTTP {response.status_code}"
