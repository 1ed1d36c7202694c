"""Inputs by URL: a submit's `video_url` or `image_url` fetched by the API before it answers, into the same
temporary file an upload would have been streamed to; it is then probed exactly like an upload.

Fetching at submit makes every problem with the URL a 4xx of the submit itself, and nothing is stored for a
URL that does not yield a usable file. Each hop (the URL and every redirect, at most `fetch_max_redirects`)
goes through the public-address check and connects to the address it checked (service.outbound); the size
limit of uploads is enforced on the declared length and again while the body streams in; the whole fetch has
`fetch_timeout_seconds`.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urljoin, urlsplit

import httpx

from service.api.uploads import UploadedFile, safe_filename
from service.outbound import ForbiddenURL, UnresolvableURL, send_pinned
from service.problems import ProblemError
from service.settings import Settings

CHUNK_BYTES = 1 << 16


def fetch_input(url: str, kind: str, folder: Path, settings: Settings) -> UploadedFile:
    """Download ``url`` (the input of a ``kind`` job) into ``folder``; raises the ``url-*`` ProblemErrors."""
    field = f"{kind}_url"
    deadline = time.monotonic() + settings.fetch_timeout_seconds
    current = url
    with httpx.Client(headers={"accept-encoding": "identity"}) as client:
        for hop in range(settings.fetch_max_redirects + 1):
            where = field if hop == 0 else f"{field} (redirected to {current})"
            try:
                response = send_pinned(
                    client, "GET", current, settings.fetch_allow_private, timeout=_remaining(deadline, settings)
                )
            except ForbiddenURL as err:
                raise ProblemError("url-forbidden", f"{where}: {err}") from err
            except UnresolvableURL as err:
                raise ProblemError("url-unreachable", f"{where}: {err}") from err
            except httpx.TimeoutException as err:
                raise _timeout(settings) from err
            except (httpx.HTTPError, httpx.InvalidURL) as err:
                raise ProblemError("url-unreachable", f"{where}: {type(err).__name__}: {err}") from err
            try:
                if response.is_redirect:
                    current = urljoin(current, response.headers["location"])
                    continue
                if not response.is_success:
                    raise ProblemError("url-unreachable", f"{where} answered HTTP {response.status_code}.")
                return _download(response, kind, folder / "fetched", current, deadline, settings)
            finally:
                response.close()
    raise ProblemError("url-redirects", f"{field} redirects more than {settings.fetch_max_redirects} times.")


def _remaining(deadline: float, settings: Settings) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _timeout(settings)
    return left


def _timeout(settings: Settings) -> ProblemError:
    return ProblemError("url-timeout", f"The input URL was not fetched within {settings.fetch_timeout_seconds:g} s.")


def _too_large(limit: int) -> ProblemError:
    return ProblemError("url-too-large", f"The limit is {limit} bytes.", limit_bytes=limit)


def _download(
    response: httpx.Response, kind: str, path: Path, final_url: str, deadline: float, settings: Settings
) -> UploadedFile:
    limit = settings.max_upload_bytes
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    name = safe_filename(PurePosixPath(unquote(urlsplit(final_url).path)).name)
    fetched = UploadedFile(kind, name, path)
    digest = hashlib.sha256()
    with path.open("wb") as out:
        try:
            for chunk in response.iter_bytes(CHUNK_BYTES):
                fetched.size += len(chunk)
                if fetched.size > limit:
                    raise _too_large(limit)
                digest.update(chunk)
                out.write(chunk)
                _remaining(deadline, settings)  # a trickling server cannot hold the submit forever
        except httpx.TimeoutException as err:
            raise _timeout(settings) from err
        except httpx.HTTPError as err:
            raise ProblemError("url-unreachable", f"The download broke off: {type(err).__name__}: {err}") from err
    fetched.sha256 = digest.hexdigest()
    return fetched
