"""The HTTP side of the client: /v1 calls, problem+json errors, and the event stream followed across
dropped connections (it reconnects with `Last-Event-ID`, so only newer job states come)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

TERMINAL = ("succeeded", "failed", "canceled")
RECONNECT_SECONDS = 2.0  # until the stream's own `retry:` field says otherwise
RECONNECT_ATTEMPTS = 30  # failed reconnects in a row before giving up
STREAM_READ_TIMEOUT = 60.0  # the API sends a keep-alive every 15 s: silence this long is a dead connection
REQUEST_TIMEOUT = 120.0


class ProblemReport(Exception):
    """An error answer of the API (RFC 9457 problem details), or a transport failure shaped like one."""

    def __init__(self, title: str, detail: str | None = None, status: int | None = None) -> None:
        self.title, self.detail, self.status = title, detail, status
        super().__init__(f"{title}: {detail}" if detail else title)

    @classmethod
    def of(cls, response: httpx.Response) -> ProblemReport:
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and "title" in body:
            return cls(str(body["title"]), body.get("detail"), response.status_code)
        title = f"HTTP {response.status_code} {response.reason_phrase}"
        return cls(title, response.text[:200] or None, response.status_code)


def checked(response: httpx.Response) -> httpx.Response:
    if response.is_error:
        response.read()
        raise ProblemReport.of(response)
    return response


def sse_events(lines: Iterator[str]) -> Iterator[dict[str, str]]:
    """Server-sent events as {field: value} (data lines joined); comments and keep-alives skipped."""
    event: dict[str, str] = {}
    for line in lines:
        if not line:
            if event:
                yield event
            event = {}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        event[name] = f"{event[name]}\n{value}" if name == "data" and "data" in event else value
    if event:
        yield event


class Connection:
    def __init__(self, url: str, api_key: str | None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=REQUEST_TIMEOUT)

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **options: Any) -> httpx.Response:
        try:
            return checked(self.http.request(method, path, **options))
        except httpx.TransportError as err:
            raise ProblemReport(f"Cannot reach {self.http.base_url}", str(err) or type(err).__name__) from err

    def submit(self, params: dict[str, Any], file_field: str | None = None, path: Path | None = None) -> dict:
        """A job from ``params``: JSON for text only, multipart with the file otherwise."""
        if path is None:
            return self._call("POST", "/v1/jobs", json=params).json()
        with path.open("rb") as handle:
            fields = {name: str(value) for name, value in params.items()}
            files = {file_field: (path.name, handle, "application/octet-stream")}
            return self._call("POST", "/v1/jobs", data=fields, files=files).json()

    def job(self, job_id: str) -> dict:
        return self._call("GET", f"/v1/jobs/{job_id}").json()

    def jobs(self, limit: int, statuses: list[str]) -> Iterator[dict]:
        """The caller's jobs, newest first, page after page."""
        params: list[tuple[str, str | int]] = [("limit", limit), *(("status", s) for s in statuses)]
        page = self._call("GET", "/v1/jobs", params=params).json()
        while True:
            yield from page["jobs"]
            if not page["next"]:
                return
            page = self._call("GET", page["next"]).json()

    def cancel(self, job_id: str) -> dict:
        return self._call("POST", f"/v1/jobs/{job_id}/cancel").json()

    def delete(self, job_id: str) -> None:
        self._call("DELETE", f"/v1/jobs/{job_id}")

    def download(self, href: str, out: Path) -> int:
        """The file at ``href`` written to ``out`` (through a temporary name); its size."""
        partial = out.with_name(out.name + ".part")
        try:
            with self.http.stream("GET", href) as response, partial.open("wb") as sink:
                checked(response)
                for chunk in response.iter_bytes():
                    sink.write(chunk)
        except httpx.TransportError as err:
            partial.unlink(missing_ok=True)
            raise ProblemReport(f"Download of {href} failed", str(err) or type(err).__name__) from err
        partial.replace(out)
        return out.stat().st_size

    def follow(self, job_id: str) -> Iterator[dict]:
        """The job's states from its event stream until it ends. A dropped or silent connection is opened
        again with the last event's id; RECONNECT_ATTEMPTS failures in a row give up."""
        seen, wait, failures = "", RECONNECT_SECONDS, 0
        timeout = httpx.Timeout(REQUEST_TIMEOUT, read=STREAM_READ_TIMEOUT)
        while True:
            headers = {"Last-Event-ID": seen} if seen else {}
            try:
                with self.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=timeout) as response:
                    if response.status_code == 204:  # the final state was seen already
                        return
                    checked(response)
                    for event in sse_events(response.iter_lines()):
                        if event.get("retry", "").isdigit():
                            wait = int(event["retry"]) / 1000
                        if "data" not in event:
                            continue
                        seen, failures = event.get("id", seen), 0
                        job = json.loads(event["data"])
                        yield job
                        if job["status"] in TERMINAL:
                            return
            except (httpx.TransportError, ProblemReport) as err:
                if isinstance(err, ProblemReport) and (err.status or 0) < 500:
                    raise  # the job is gone or not ours: reconnecting will not help
                failures += 1
                if failures > RECONNECT_ATTEMPTS:
                    raise ProblemReport("The event stream keeps failing", str(err) or type(err).__name__) from err
            time.sleep(wait)
