"""Every malformed request gets a 4xx with a JSON message: no traceback, no hung stream, and
no harm to a request that is streaming at the same time."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.support import COUNTING, REPO, Service, Stream, chat, consecutive, long_prompt

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
    (b'{"message": "hi", "mode": "poetry"}', JSON, 400, "unknown mode 'poetry'; valid modes: chat, brief, long, count"),
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


# Malformed at the JSON level: every endpoint that reads a body refuses each with a 400.
BODY_ENDPOINTS = ("/chat/stream", "/chat/cancel", "/v1/chat/completions", "/v1/completions")
BAD_JSON = [
    (b"[" * 100_000, "nested"),
    (b'{"a": ' * 200 + b"1" + b"}" * 200, "nested"),
    (b'{"message": NaN}', "NaN"),
    (b'{"message": Infinity}', "Infinity"),
    (b'{"message": -Infinity}', "Infinity"),
    (b'{"message": 1e999}', "too large"),
    (b'{"message": "a", "message": "b"}', "more than once"),
    (b'{"message": "\xff\xfe"}', "not valid JSON"),
    (b'{"message": "\\ud800"}', "lone surrogate"),
    (b'{"message": ' + b"9" * 5000 + b"}", "not valid JSON"),
    (b"", "not valid JSON"),
    (b'{"message": "hi"} trailing', "not valid JSON"),
    (b'{"message": "hi",}', "not valid JSON"),
    (b'{"\\udfff": 1}', "lone surrogate"),
]

# Wrong at some level of a valid JSON body, per endpoint: (path, body, status, words in the message).
BAD_FIELDS = [
    ("/chat/stream", {"message": None}, 400, "'message'"),
    ("/chat/stream", {"message": ["hi"]}, 400, "'message'"),
    ("/chat/stream", {"message": "hi", "mode": None}, 400, "'mode'"),
    ("/chat/stream", {"message": "hi", "history": None}, 400, "'history'"),
    ("/chat/stream", {"message": "hi", "history": [["user", "x"]]}, 400, "history[0]"),
    ("/chat/stream", {"message": "hi", "history": [{"role": "user", "content": "x", "name": "y"}]}, 400, "history[0]"),
    ("/chat/stream", {"message": "hi", "history": [{"role": None, "content": "x"}]}, 400, "history[0].role"),
    ("/chat/stream", {"message": "hi", "history": [{"role": "user", "content": {"t": 1}}]}, 400, "history[0].content"),
    ("/chat/stream", {"message": "hi", "history": [{"role": "user", "content": "ok"}, 5]}, 400, "history[1]"),
    ("/chat/stream", {"message": "hi", "history": [{"role": "user", "content": "\ud800"}]}, 400, "history[0].content"),
    ("/chat/cancel", {"request_id": None}, 400, "'request_id'"),
    ("/chat/cancel", {"request_id": ["x"]}, 400, "'request_id'"),
    ("/chat/cancel", {"request_id": "x", "other": 1}, 400, "unknown field(s): other"),
    ("/v1/chat/completions", {"model": "edison"}, 400, "'messages' is required"),
    ("/v1/chat/completions", {"model": "edison", "messages": []}, 400, "'messages' is required"),
    ("/v1/chat/completions", {"model": "edison", "messages": "hi"}, 400, "'messages' is required"),
    ("/v1/chat/completions", {"model": "edison", "messages": ["hi"]}, 400, "messages[0]"),
    ("/v1/chat/completions", {"model": "edison", "messages": [{"role": 3, "content": "x"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"model": "edison", "messages": [{"role": "user", "content": 3}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", {"model": "edison", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, "messages[0].content[0]"),
    ("/v1/chat/completions", {"model": "edison", "messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
     400, "messages[0].content[0]"),
    ("/v1/chat/completions", {"model": "edison", "messages": [{"role": "user", "content": "x", "x": 1}]},
     400, "unsupported field"),
    ("/v1/chat/completions", {"model": "edison", "messages": [{"role": "user", "content": "\ud800"}]},
     400, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, 400, "'model'"),
    ("/v1/chat/completions", {"model": 5, "messages": [{"role": "user", "content": "x"}]}, 400, "'model'"),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "does not exist"),
    ("/v1/chat/completions", {"model": "edison", "messages": [{"role": "user", "content": "x"}], "max_tokens": "9"},
     400, "'max_tokens'"),
    ("/v1/chat/completions", {"model": "edison", "messages": [{"role": "user", "content": "x"}], "max_tokens": True},
     400, "'max_tokens'"),
    ("/v1/chat/completions", {"model": "edison", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
     400, "'temperature'"),
    ("/v1/chat/completions", {"model": "edison", "messages": [{"role": "user", "content": "x"}], "temperature": 9},
     400, "'temperature'"),
    ("/v1/chat/completions", {"model": "edison", "messages": [{"role": "user", "content": "x"}], "top_p": -1},
     400, "'top_p'"),
    ("/v1/chat/completions", {"model": "edison", "messages": [{"role": "user", "content": "x"}], "stop": 5},
     400, "'stop'"),
    ("/v1/chat/completions", {"model": "edison", "messages": [{"role": "user", "content": "x"}], "stop": list("abcde")},
     400, "'stop'"),
    ("/v1/chat/completions", {"model": "edison", "messages": [{"role": "user", "content": "x"}], "stream": "yes"},
     400, "'stream'"),
    ("/v1/chat/completions", {"model": "edison", "messages": [{"role": "user", "content": "x"}], "seed": -5},
     400, "'seed'"),
    ("/v1/chat/completions", {"model": "edison", "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "'n'"),
    ("/v1/chat/completions", {"model": "edison", "messages": [{"role": "user", "content": "x"}],
                              "stream_options": {"include_usage": "x"}}, 400, "include_usage"),
    ("/v1/chat/completions", {"model": "edison", "messages": [{"role": "user", "content": "x"}], "bogus": 1},
     400, "bogus"),
    ("/v1/completions", {"model": "edison"}, 400, "'prompt'"),
    ("/v1/completions", {"model": "edison", "prompt": 5}, 400, "'prompt'"),
    ("/v1/completions", {"model": "edison", "prompt": [1, 2, 3]}, 400, "token-id"),
    ("/v1/completions", {"model": "edison", "prompt": ["a", "b"]}, 400, "'prompt'"),
    ("/v1/completions", {"model": "edison", "prompt": "x", "echo": True}, 400, "'echo'"),
    ("/v1/completions", {"model": "edison", "prompt": "x", "suffix": "y"}, 400, "'suffix'"),
    ("/v1/completions", {"model": "edison", "prompt": "x", "best_of": 2}, 400, "'best_of'"),
    ("/v1/completions", {"model": "edison", "prompt": "x", "max_tokens": 0}, 400, "'max_tokens'"),
    ("/v1/completions", {"model": "edison", "prompt": "\ud800"}, 400, "'prompt'"),
]


def error_message(response: httpx.Response, path: str) -> str:
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    return error["message"] if path.startswith("/v1/") else error


@pytest.mark.parametrize("path", BODY_ENDPOINTS)
@pytest.mark.parametrize(("body", "words"), BAD_JSON, ids=range(len(BAD_JSON)))
def test_malformed_json_is_a_400_on_every_endpoint(service: Service, path: str, body: bytes, words: str) -> None:
    response = httpx.post(f"{service.url}{path}", content=body, headers=JSON, timeout=30)
    assert response.status_code == 400, response.text
    assert words in error_message(response, path)


@pytest.mark.parametrize(("path", "body", "status", "words"), BAD_FIELDS, ids=range(len(BAD_FIELDS)))
def test_wrong_field_at_any_level_is_a_clear_4xx(service: Service, path: str, body: dict, status: int, words: str) -> None:
    raw = json.dumps(body).encode()  # json.dumps keeps a lone surrogate as its \ud800 escape
    response = httpx.post(f"{service.url}{path}", content=raw, headers=JSON, timeout=30)
    assert response.status_code == status, response.text
    assert words in error_message(response, path)


def test_bad_requests_do_not_harm_a_running_stream(service: Service) -> None:
    stream = Stream(service.url, {"message": COUNTING, "mode": "count"})
    for body, headers, _, _ in BAD_STREAM_BODIES:
        httpx.post(f"{service.url}/chat/stream", content=body, headers=headers)
    for path in BODY_ENDPOINTS:
        for body, _ in BAD_JSON:
            httpx.post(f"{service.url}{path}", content=body, headers=JSON, timeout=30)
    for path, fields, _, _ in BAD_FIELDS:
        httpx.post(f"{service.url}{path}", content=json.dumps(fields).encode(), headers=JSON, timeout=30)
    done = stream.done.data
    assert done["ok"] is True and done["usage"]["completion_tokens"] == 64, done  # its whole budget
    assert done["response"] == stream.text() and consecutive(done["response"]), done["response"]
    assert "Traceback" not in service.log()


def test_the_shipped_config_refuses_the_debug_wedge(tmp_path) -> None:
    """Fault injection stays out of the request path unless a test turns it on: with config.toml
    as shipped, a body carrying `debug_wedge_s` is a 400 like any unknown field."""
    svc = Service(REPO / "config.toml", tmp_path / "service.log")
    try:
        svc.start()
        response = httpx.post(f"{svc.url}/chat/stream", json={"message": "hi", "debug_wedge_s": 5}, timeout=30)
        assert response.status_code == 400
        assert "unknown field(s): debug_wedge_s" in response.json()["error"]
    finally:
        svc.stop()
