"""`python -m service.api [uvicorn options]`: the API under uvicorn with our connection handling
(service.api.http), listening on `host`:`port` of the settings unless the options say otherwise."""

import sys

import uvicorn

from service.settings import get_settings

settings = get_settings()
defaults = ["--host", settings.host, "--port", str(settings.port), "--http", "service.api.http:GuardedHttpProtocol"]
uvicorn.main.main(["service.api.main:app", *defaults, *sys.argv[1:]], prog_name="python -m service.api")
