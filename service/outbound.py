"""Requests to URLs that clients name (webhook receivers, `video_url`/`image_url` inputs).

Such a URL must not make the service reach what only it can reach: unless a setting allows it, its host has to
resolve to public addresses only (no loopback, private, link-local or cloud-metadata address). The request then
connects to the very address that was checked, so a second DNS answer cannot steer it elsewhere (DNS
rebinding), while the Host header and, for https, the TLS server name and certificate check stay those of the
URL's host.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit, urlunsplit

import httpx


class ForbiddenURL(ValueError):
    """Not an http(s) URL, or its host resolves to an address the service must not reach."""


class UnresolvableURL(ValueError):
    """The URL's host does not resolve."""


def checked_address(url: str, allow_private: bool) -> str:
    """The address a request to ``url`` connects to, once checked: raises ForbiddenURL for other schemes and,
    unless ``allow_private``, for hosts that resolve to any non-public address; UnresolvableURL when the host
    does not resolve."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:  # a malformed IPv6 host, a port that is no number or out of range
        raise ForbiddenURL(str(err)) from err
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ForbiddenURL("must be an absolute http or https URL")
    try:
        infos = socket.getaddrinfo(parts.hostname, port or 443, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as err:
        raise UnresolvableURL(f"host {parts.hostname!r} does not resolve") from err
    addresses = [info[4][0] for info in infos]
    if not allow_private:
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%")[0])
            if not ip.is_global:
                raise ForbiddenURL(f"host {parts.hostname!r} resolves to a non-public address ({ip})")
    return addresses[0]


def pinned_request(url: str, address: str) -> tuple[str, str, dict[str, str]]:
    """(URL, Host header, request extensions) that reach ``url``'s server at the checked ``address``."""
    parts = urlsplit(url)
    credentials, _, host_and_port = parts.netloc.rpartition("@")
    ip = f"[{address}]" if ":" in address else address
    netloc = (f"{credentials}@" if credentials else "") + ip + (f":{parts.port}" if parts.port else "")
    extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
    return urlunsplit(parts._replace(netloc=netloc)), host_and_port, extensions


def send_pinned(
    client: httpx.Client,
    method: str,
    url: str,
    allow_private: bool,
    headers: dict[str, str] | None = None,
    content: bytes | None = None,
    timeout: float | None = None,
) -> httpx.Response:
    """Send one request to ``url`` at its checked address, without following redirects; the response is
    streamed (the caller reads and closes it). Raises ForbiddenURL, UnresolvableURL or httpx.HTTPError."""
    target, host, extensions = pinned_request(url, checked_address(url, allow_private))
    request = client.build_request(
        method,
        target,
        headers={**(headers or {}), "host": host},
        content=content,
        extensions=extensions,
        timeout=httpx.USE_CLIENT_DEFAULT if timeout is None else timeout,
    )
    return client.send(request, stream=True, follow_redirects=False)
