"""Fuzz every route of the server's OpenAPI schema (GET /openapi.json) with schemathesis: no 5xx, ever.

Runs against the session's real server, with a small chat model running so that the inference routes
reach a runner too (every other request names it instead of a generated model name). Routes that launch
or stop models, drop registrations, or manage API keys are left out: they would slow the suite down or
change what the other tests see. A model the fuzzer manages to register is unregistered right away.

Each operation gets MAX_EXAMPLES schema-valid requests and fewer schema-violating ones, without
shrinking. Every 5xx (and every request that got no answer) is collected; the test fails at the end
with, for each distinct answer, the shortest request that got it (as curl) and the response body.

The cases come from `operation.as_strategy()` under a plain `@given`, not from
`schemathesis.pytest.from_fixture(...).parametrize()`: with pytest 9.2 the latter fails on
`request.node._nodeid` (schemathesis 4.32.5).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.result import Ok

from conftest import CHAT_MODEL, ShoalServer, wait_until_ready

FUZZ_UID = "fuzz-chat"
# n_ctx is small so that no generated max_tokens asks for a long generation (on 2 cores).
FUZZ_LAUNCH = {"model_name": CHAT_MODEL, "model_uid": FUZZ_UID, "n_ctx": 128, "n_parallel": 1}
# max_tokens of an aimed request that names none (else it would generate up to the whole context)
DEFAULT_MAX_TOKENS = 8
MAX_EXAMPLES = {GenerationMode.POSITIVE: 20, GenerationMode.NEGATIVE: 10}
REQUEST_TIMEOUT_S = 60

# Operations never fuzzed, as (method, path regex).
EXCLUDED = [
    ("POST", r"^/v1/models$"),  # launches a model
    ("DELETE", r"^/v1/models/\{model_uid\}$"),  # terminates one
    ("DELETE", r"^/v1/model_registrations/"),  # would drop builtin families
    (None, r"^/v1/keys"),  # API keys would lock the other tests out
    ("DELETE", r"^/api/delete$"),  # the Ollama API's terminate
]

# Failures of one operation: (status or exception, response body) -> the requests (curl) that got it.
Found = dict[tuple[str, str], list[str]]


@pytest.fixture(scope="module")
def fuzz_schema(server: ShoalServer) -> Iterator[schemathesis.BaseSchema]:
    response = server.http.post("/v1/models", json=FUZZ_LAUNCH)
    assert response.status_code == 200, response.text
    wait_until_ready(server, FUZZ_UID)
    # no sanitization: it would print "max_tokens": "[Filtered]" in the curl commands
    config = schemathesis.Config.from_dict({"output": {"sanitization": {"enabled": False}}})
    schema: schemathesis.BaseSchema = schemathesis.openapi.from_url(
        server.url + "/openapi.json", config=config
    )
    for method, path_regex in EXCLUDED:
        schema = schema.exclude(method=method, path_regex=path_regex)
    yield schema
    server.http.delete(f"/v1/models/{FUZZ_UID}")


def aim_at_running_model(case: schemathesis.Case) -> None:
    """Name the running model, so that the request gets past the model lookup to a runner."""
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = FUZZ_UID
        if case.operation.path in ("/v1/chat/completions", "/v1/completions"):
            case.body.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
    if case.query is not None and "model" in case.query:
        case.query["model"] = FUZZ_UID


def drop_registration(server: ShoalServer, case: schemathesis.Case, status_code: int, content: bytes) -> None:
    """A model the fuzzer registered is unregistered again, so the catalog stays as the other tests expect."""
    op = case.operation
    if op.method.upper() == "POST" and op.path.startswith("/v1/model_registrations/") and status_code == 200:
        registered = json.loads(content)
        server.http.delete(f"/v1/model_registrations/{registered['model_type']}/{registered['model_name']}")


def fuzz_operation(
    server: ShoalServer, operation: schemathesis.APIOperation, mode: GenerationMode, found: Found
) -> int:
    """Send up to MAX_EXAMPLES[mode] generated requests to one operation; return how many were sent."""
    aim = itertools.cycle([True, False])
    sent = 0

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES[mode],
        deadline=None,
        phases=[Phase.generate],  # no shrinking; the shortest failing request is reported instead
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(case: schemathesis.Case) -> None:
        nonlocal sent
        if next(aim):
            aim_at_running_model(case)
        sent += 1
        try:
            response = case.call(timeout=REQUEST_TIMEOUT_S)
        except Exception as exc:  # a reset connection or a timeout is as bad as a 5xx
            found.setdefault((type(exc).__name__, str(exc)), []).append(case.as_curl_command())
            return
        drop_registration(server, case, response.status_code, response.content)
        if response.status_code >= 500:
            body = response.content.decode("utf-8", "replace")[:2000]
            found.setdefault((str(response.status_code), body), []).append(case.as_curl_command())

    try:
        fuzz()
    except Unsatisfiable:
        # nothing in the operation's schema can be violated (e.g. no parameters): no negative case
        assert mode is GenerationMode.NEGATIVE, f"{operation.label}: no request could be generated"
    return sent


def test_no_server_error(fuzz_schema: schemathesis.BaseSchema, server: ShoalServer) -> None:
    failures: list[str] = []
    counts: dict[str, str] = {}
    started = time.monotonic()
    for result in fuzz_schema.get_all_operations():
        if not isinstance(result, Ok):
            raise result.err()  # an operation whose schema cannot be read
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"
        found: Found = {}
        op_started = time.monotonic()
        sent = sum(fuzz_operation(server, operation, mode, found) for mode in MAX_EXAMPLES)
        counts[label] = f"{sent} requests in {time.monotonic() - op_started:.1f} s"
        for (status, body), requests in found.items():
            failures.append(
                f"{label} answered {status} to {len(requests)} request(s); the shortest:\n"
                f"{min(requests, key=len)}\nresponse body:\n{body}"
            )

    print(f"fuzzed in {time.monotonic() - started:.1f} s: {json.dumps(counts, indent=1)}")
    assert counts, "no operation to fuzz"
    assert not failures, f"{len(failures)} kinds of server error:\n\n" + "\n\n".join(failures)
