"""Webhooks: the finished job POSTed to the client's URL, signed the Standard Webhooks way, retried with backoff.

Headers: ``webhook-id`` (the same on every retry, so receivers can drop duplicates), ``webhook-timestamp``
(unix seconds) and ``webhook-signature: v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">``. The body is
``{"type": "job.<status>", "timestamp": ..., "data": <job object>}``.

Deliveries are scheduled in a Redis sorted set (job id -> due time). Any API process claims due ones for a
lease, so several replicas never deliver the same webhook at once, and one that dies mid-delivery only delays
the retry until its lease ends.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit

import httpx
from redis import Redis

from service import keys, views
from service.jobs import JobStore, schedule_webhook
from service.schemas import JobStatus
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


def check_url(url: str, allow_private: bool) -> str:
    """Refuse URLs a webhook must not reach (raises ValueError): other schemes, and unless allowed, hosts that
    resolve to loopback, private, link-local or otherwise internal addresses. Returns the checked address
    the delivery connects to."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("webhook_url must be an absolute http or https URL")
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 443, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as err:
        raise ValueError(f"webhook host {parts.hostname!r} does not resolve") from err
    addresses = [info[4][0] for info in infos]
    if not allow_private:
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%")[0])
            if not ip.is_global:
                raise ValueError(f"webhook host {parts.hostname!r} resolves to a non-public address ({ip})")
    return addresses[0]


def pinned_request(url: str, address: str) -> tuple[str, str, dict[str, str]]:
    """(URL, Host header, request extensions) that reach ``url``'s server at the checked ``address``: the
    connection cannot be steered elsewhere by a second DNS answer, while the Host header and, for https,
    the TLS server name and certificate check stay those of the URL's host."""
    parts = urlsplit(url)
    credentials, _, host_and_port = parts.netloc.rpartition("@")
    ip = f"[{address}]" if ":" in address else address
    netloc = (f"{credentials}@" if credentials else "") + ip + (f":{parts.port}" if parts.port else "")
    extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
    return urlunsplit(parts._replace(netloc=netloc)), host_and_port, extensions


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
        for job_id in due:
            self._attempt(job_id.decode())
        return len(due)

    def _attempt(self, job_id: str) -> None:
        record = self.jobs.get(job_id)
        if record is None or record.webhook is None or not record.status.terminal:
            self.redis.zrem(keys.WEBHOOKS_DUE, job_id)
            return
        webhook = record.webhook.model_copy()
        error = self._post(webhook.url, job_id, record.status, views.job_view(record, webhook.base_url, None))
        webhook.attempts += 1
        webhook.last_error = error
        if error is None:
            webhook.status = "delivered"
        elif webhook.attempts >= self.settings.webhook_max_attempts:
            webhook.status = "failed"
        else:
            delay = self.settings.webhook_backoff_seconds * 2 ** (webhook.attempts - 1)
            schedule_webhook(self.redis, job_id, time.time() + delay)
        if webhook.status != "pending":
            self.redis.zrem(keys.WEBHOOKS_DUE, job_id)
        terminal = tuple(status for status in JobStatus if status.terminal)
        self.jobs.update(job_id, terminal, event="webhook", webhook=webhook)

    def _post(self, url: str, job_id: str, status: JobStatus, job: dict) -> str | None:
        """One delivery; returns None on success, else why it failed."""
        try:
            address = check_url(url, self.settings.webhook_allow_private)
        except ValueError as err:
            return str(err)
        target, host, extensions = pinned_request(url, address)
        body = json.dumps(
            {"type": f"job.{status.value}", "timestamp": datetime.now(UTC).isoformat(), "data": job}
        ).encode()
        message_id = f"msg_{job_id}"
        timestamp = int(time.time())
        headers = {
            "host": host,
            "content-type": "application/json",
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature(self.settings.webhook_secret or "", message_id, timestamp, body),
        }
        try:
            response = self.client.post(target, content=body, headers=headers, extensions=extensions)
        except httpx.HTTPError as err:
            return f"{type(err).__name__}: {err}"
        if response.is_success:
            return None
        return f"HTTP {response.status_code}"
