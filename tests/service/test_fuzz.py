"""The API fuzzed from its own OpenAPI schema over real HTTP: whatever a client sends, no answer is a 5xx, and
every refusal is problem+json."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from service_harness import MAIN_SETTINGS, Stack, make_stack

EXAMPLES_PER_OPERATION = 25  # bounded: the whole run stays near a minute on a 2-core machine


@pytest.fixture(scope="module")
def fuzz_stack(redis_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # no worker: accepted jobs only queue (and fill the queue, so 429s are fuzzed too)
    config = {**MAIN_SETTINGS, "MMAUDIO_API_KEYS": ""}
    with make_stack(redis_server, Path(tmp_path_factory.mktemp("fuzz")), "fuzz", 8, config).running() as stack:
        yield stack


def test_no_request_makes_the_api_fail(fuzz_stack: Stack) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_stack.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8  # every route of the API is fuzzed

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck))
        def fuzz(case: schemathesis.Case) -> None:
            response = case.call(timeout=30)
            status = response.status_code
            # the one 5xx by design: no worker runs here, so the deployment is not ready
            assert status < 500 or (status == 503 and case.path == "/readyz"), case.as_curl_command()
            if status >= 400 and case.method != "HEAD":
                assert response.headers["content-type"] == ["application/problem+json"], case.as_curl_command()

        fuzz()
