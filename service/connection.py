"""The one place Redis clients are made, for the API, the workers and `serve`: the `redis_url` (``redis://``
or ``rediss://`` for TLS; redis-py reads further connection options from its query string), the password from
`redis_password_file` and the TLS files of the settings, so a managed Redis is configured the same way for
every process."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from service.settings import Settings


def client_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments of ``from_url`` beyond the URL."""
    options: dict[str, Any] = {}
    if settings.redis_password_file is not None:
        # secret files usually end with a newline that is no part of the password
        options["password"] = settings.redis_password_file.read_text().rstrip("\r\n")
    tls = {
        "ssl_ca_certs": settings.redis_tls_ca_file,
        "ssl_certfile": settings.redis_tls_cert_file,
        "ssl_keyfile": settings.redis_tls_key_file,
    }
    tls = {name: str(path) for name, path in tls.items() if path is not None}
    if tls and urlsplit(settings.redis_address).scheme != "rediss":
        raise ValueError("MMAUDIO_REDIS_TLS_* files need a rediss:// MMAUDIO_REDIS_URL")
    return options | tls


def connect(settings: Settings, **overrides: Any) -> Redis:
    """A client for the settings' Redis; ``overrides``: further ``from_url`` options (timeouts)."""
    return Redis.from_url(settings.redis_address, **client_options(settings) | overrides)


def connect_async(settings: Settings) -> AsyncRedis:
    return AsyncRedis.from_url(settings.redis_address, **client_options(settings))
