"""Every malformed request gets a 4xx with a JSON message: no traceback, no hung stream, and
no harm to a request that is streaming at the same time."""

from __future__ import annotations

import httpx
import pytest

from tests.support import COUNTING, Service, Stream, chat, long_prompt

pytestmark = pytest.mark.timeout(120)

JSON = {"Content-Type": "application/json"}

BAD_STREAM_BODIES = [
    (b"{not json", JSON, 400, "not valid JSON"),
    (b'["a list"]', JSON, 400, "JSON object"),
    (b'{"message": "hi"}', {"Content-Type": "text/plain"}, 415, "application/json"),
    (b'{"message": "hi"}', {}, 415, "application/json"),
    (b"{}", JSON, 400, "'message' is required"),
    (b'{"message": 42}', JSON, 400, "'message' is required and must be a string"),
    (b'{"message": "   "}', JSON, 400, "must not be empty"),
    (b'{"message": "hi", "mode": 7}', JSON, 400, "'mode' must be a string"),
    (b'{"message": "hi", "mode": "poetry"}', JSON, 400, "unknown mode 'poetry'; valid modes: chat, brief, long"),
    (b'{"message": "hi", "history": "nope"}', JSON, 400, "'history' must be a list"),
    (b'{"message": "hi", "history": [{"role": "user"}]}', JSON, 400, "history[0]"),
    (b'{"message": "hi", "history": [{"role": "robot", "content": "x"}]}', JSON, 400, "history[0].role"),
    (b'{"message": "hi", "history": [{"role": "user", "content": 5}]}', JSON, 400, "history[0].content"),
    (b'{"message": "hi", "temperature": 2}', JSON, 400, "unknown field(s): temperature"),
    (b'{"message": "hi", "debug_wedge_s": "x"}', JSON, 400, "debug_wedge_s"),
]


@pytest.mark.parametrize(("body", "headers", "status", "message"), BAD_STREAM_BODIES)
def test_bad_stream_request_gets_a_clear_4xx(service: Service, body: bytes, headers: dict, status: int, message: str) -> None:
    response = httpx.post(f"{service.url}/chat/stream", content=body, headers=headers)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert message in response.json()["error"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{}", "'request_id' is required"),
        (b'{"request_id": 12}', "'request_id' is required and must be a non-empty string"),
        (b'{"request_id": ""}', "non-empty string"),
        (b"nope", "not valid JSON"),
    ],
)
def test_bad_cancel_request_gets_a_clear_400(service: Service, body: bytes, message: str) -> None:
    response = httpx.post(f"{service.url}/chat/cancel", content=body, headers=JSON)
    assert response.status_code == 400
    assert message in response.json()["error"]


def test_oversized_body_is_413_declared_or_chunked(service: Service) -> None:
    big = b'{"message": "' + b"a" * 300_000 + b'"}'
    declared = httpx.post(f"{service.url}/chat/stream", content=big, headers=JSON)
    assert declared.status_code == 413 and "limit" in declared.json()["error"]

    def chunks():
        for i in range(0, len(big), 10_000):
            yield big[i : i + 10_000]

    chunked = httpx.post(f"{service.url}/chat/stream", content=chunks(), headers=JSON)
    assert chunked.status_code == 413 and "limit" in chunked.json()["error"]


def test_unknown_route_and_method_are_json_errors(service: Service) -> None:
    assert httpx.get(f"{service.url}/chat/nowhere").json() == {"error": "Not Found"}
    wrong = httpx.get(f"{service.url}/chat/stream")
    assert wrong.status_code in (404, 405) and "error" in wrong.json()


def test_prompt_longer_than_the_context_is_a_done_error_with_both_counts(service: Service) -> None:
    events = chat(service.url, long_prompt(9000))
    done = events[-1].data
    assert done["ok"] is False
    assert "context holds 8192" in done["error"] and "tokens long" in done["error"]
    assert not any(e.name == "token" for e in events)
    assert chat(service.url, "Say hello.")[-1].data["ok"] is True  # the worker is fine


def test_bad_requests_do_not_harm_a_running_stream(service: Service) -> None:
    solo = chat(service.url, COUNTING, mode="brief")[-1].data["response"]
    stream = Stream(service.url, {"message": COUNTING, "mode": "brief"})
    for body, headers, _, _ in BAD_STREAM_BODIES:
        httpx.post(f"{service.url}/chat/stream", content=body, headers=headers)
    done = stream.done.data
    assert done["ok"] is True and done["response"] == solo
