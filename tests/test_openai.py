"""The OpenAI-compatible API, driven by the real `openai` client against the real service.

The cancellation invariants of `/chat/stream` hold here too: a client that closes its stream
or times out on a whole (non-streaming) request stops the worker's computation, and the same
worker serves the next request; a cancel by the chunk id ends the stream with
`finish_reason: "cancelled"` and `[DONE]`.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.support import COUNTING, TEST_MODEL, Service, consecutive, long_prompt, wait_busy, wait_idle, write_config

pytestmark = pytest.mark.timeout(120)

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
COUNT = [{"role": "user", "content": COUNTING}]
CHAT_SYSTEM_PROMPT = "You are a helpful assistant."  # modes.chat in tests/support.py BASE_CONFIG


def client(service: Service, **kw: Any) -> openai.OpenAI:
    # No retries: a retried request would hide what the first one did to the worker.
    return openai.OpenAI(base_url=f"{service.url}/v1", api_key="unused", max_retries=0, **{"timeout": 60, **kw})


@pytest.fixture(scope="module")
def solo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One worker and no queue: the next request can only run on the worker a test watched."""
    root = tmp_path_factory.mktemp("solo")
    svc = Service(write_config(root / "config.toml", {"pool": {"workers": 1, "slots": 1, "queue_size": 0}}), root / "service.log")
    try:
        svc.start()
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """The served model's own tokenizer (vocabulary only), to check the usage counts."""
    import llama_cpp

    from edison.model import resolve_model_path
    from edison.settings import ModelSettings

    llm = llama_cpp.Llama(str(resolve_model_path(ModelSettings(path=TEST_MODEL))), vocab_only=True, verbose=False)
    return lambda text, bos=False: llm.tokenize(text.encode(), add_bos=bos)


def wait_until_free(service: Service, timeout: float = 10.0) -> None:
    """Until the pool has settled the last request (no busy worker, nothing active)."""
    deadline = time.monotonic() + timeout
    while (h := service.health())["workers"]["busy"] or h["active_requests"]:
        assert time.monotonic() < deadline, f"pool still busy: {h}"
        time.sleep(0.02)


# Models and mode aliases.


def test_models_list_the_loaded_model_and_one_alias_per_mode(service: Service) -> None:
    ids = [m.id for m in client(service).models.list()]
    # The model by its name (the bundled one's; a file's name without .gguf), then the mode aliases.
    assert ids == ["gemma3-270m", "edison", "edison-chat", "edison-brief", "edison-long", "edison-count"]
    assert client(service).models.retrieve("edison-brief").id == "edison-brief"
    assert client(service).models.list().data[0].model_extra["loaded"] is True


def test_mode_alias_prepends_its_system_prompt_unless_the_messages_have_one(service: Service) -> None:
    def prompt_tokens(model: str, messages: list[dict[str, Any]]) -> int:
        reply = client(service).chat.completions.create(model=model, messages=messages, max_tokens=1)
        return reply.usage.prompt_tokens

    with_mode_prompt = prompt_tokens("edison-chat", QUESTION)
    # "brief" has no system prompt: spelled out, chat's must give the very same prompt.
    assert with_mode_prompt == prompt_tokens("edison-brief", [{"role": "system", "content": CHAT_SYSTEM_PROMPT}, *QUESTION])
    assert with_mode_prompt == prompt_tokens("edison", QUESTION)  # chat is the default mode
    assert with_mode_prompt == prompt_tokens("gemma-3-270m-q4_k_m.gguf", QUESTION)  # its file's name, as before
    assert with_mode_prompt == prompt_tokens("gemma3-270m", QUESTION) == prompt_tokens("gemma3-270m/chat", QUESTION)
    assert prompt_tokens("gemma3-270m/brief", own := [{"role": "user", "content": "Hi"}]) == prompt_tokens("edison-brief", own)
    own = [{"role": "developer", "content": "Be terse."}, *QUESTION]
    assert prompt_tokens("edison-chat", own) == prompt_tokens("edison-brief", own) != with_mode_prompt
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": "the capital?"}]}]
    assert prompt_tokens("edison-brief", parts) == prompt_tokens("edison-brief", [{"role": "user", "content": "What is\nthe capital?"}])


def test_request_fields_override_the_mode_defaults(service: Service) -> None:
    chat = client(service).chat.completions
    brief = chat.create(model="edison-brief", messages=COUNT)  # the mode's max_tokens: 4
    assert (brief.choices[0].finish_reason, brief.usage.completion_tokens) == ("length", 4)
    longer = chat.create(model="edison-brief", messages=COUNT, max_completion_tokens=6, temperature=0, seed=7)
    assert (longer.choices[0].finish_reason, longer.usage.completion_tokens) == ("length", 6)
    # The count goes on with a "," after every number: the stop string ends the reply at the first
    # one, long before its budget, and is not part of the text (no comparison with another run:
    # the second would read its prompt from the first one's cache, a batch of another shape).
    stopped = chat.create(model="edison-long", messages=COUNT, max_tokens=20, stop=[","])
    assert stopped.choices[0].finish_reason == "stop", stopped
    assert "," not in stopped.choices[0].message.content and stopped.usage.completion_tokens < 20, stopped


# Chat completions, whole and streamed.


def test_chat_completion_carries_the_request_id_and_usage(service: Service) -> None:
    raw = client(service).chat.completions.with_raw_response.create(
        model="edison", messages=QUESTION, user="someone", presence_penalty=0, frequency_penalty=0, logprobs=False, n=1
    )
    reply = raw.parse()
    assert raw.headers["x-request-id"] == reply.id and uuid.UUID(reply.id).version == 4
    assert reply.object == "chat.completion" and reply.model == "edison"
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens >= 1
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_chat_completion_ends_with_a_finish_chunk_then_usage(service: Service) -> None:
    stream = client(service).chat.completions.create(
        model="edison", messages=QUESTION, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert stream.response.headers["x-request-id"] == chunks[0].id
    assert {c.id for c in chunks} == {chunks[0].id}
    assert chunks[0].choices[0].delta.role == "assistant"
    *body, finish, last = chunks
    assert all(c.choices[0].finish_reason is None and c.usage is None for c in body)
    assert finish.choices[0].finish_reason in ("stop", "length") and finish.usage is None
    assert last.choices == [] and last.usage.completion_tokens >= 1
    text = "".join(c.choices[0].delta.content or "" for c in body)
    assert text.strip()
    assert len([c for c in body if c.choices[0].delta.content]) <= last.usage.completion_tokens + 1


# Text completions.


def test_completions_whole_and_streamed_agree_with_the_tokenizer(service: Service, tokenizer: Any) -> None:
    completions = client(service).completions
    whole = completions.create(model="edison-long", prompt=COUNTING, max_tokens=12)
    choice = whole.choices[0]
    assert whole.object == "text_completion" and choice.finish_reason == "length"
    assert whole.usage.prompt_tokens == len(tokenizer(COUNTING, bos=True))
    assert whole.usage.completion_tokens == 12 == len(tokenizer(choice.text))
    assert consecutive(COUNTING + choice.text) and choice.text.startswith(" 4"), choice.text  # " 41, 42, ..."

    chunks = list(completions.create(
        model="edison-long", prompt=COUNTING, max_tokens=12, stream=True, stream_options={"include_usage": True}
    ))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    counts = lambda u: (u.prompt_tokens, u.completion_tokens, u.total_tokens)  # noqa: E731
    assert counts(chunks[-1].usage) == counts(whole.usage)  # (how much of the prompt was cached may differ)


# Cancellation.


def test_cancel_by_chunk_id_ends_the_stream_with_cancelled_then_done(service: Service) -> None:
    body = {"model": "edison-long", "messages": COUNT, "stream": True}
    payloads: list[str] = []
    with httpx.stream("POST", f"{service.url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            payloads.append(line[6:])
            if len(payloads) == 4:  # the role chunk and three pieces of text
                chunk_id = json.loads(payloads[0])["id"]
                assert response.headers["x-request-id"] == chunk_id
                cancel = httpx.post(f"{service.url}/chat/cancel", json={"request_id": chunk_id}, timeout=5).json()
                assert cancel == {"status": "cancelled", "request_id": chunk_id}
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    reasons = [c["choices"][0]["finish_reason"] for c in chunks]
    assert reasons[-1] == "cancelled" and reasons.count("cancelled") == 1 and set(reasons[:-1]) == {None}


def test_closing_a_stream_stops_the_worker_and_it_serves_the_next_request(solo: Service) -> None:
    (pid,) = solo.worker_pids()
    stream = client(solo).chat.completions.create(model="edison-long", messages=COUNT, stream=True)
    for n, _ in enumerate(stream, 1):
        if n == 4:
            break
    stream.close()  # drops the connection: the client is gone
    wait_idle(pid, within=3.0)  # the counting would otherwise go on for 3,000 tokens
    assert_same_worker_serves_next(solo, pid)


def test_timed_out_whole_request_stops_the_worker_in_prefill(solo: Service) -> None:
    (pid,) = solo.worker_pids()
    outcome: list[BaseException] = []

    def ask() -> None:
        try:  # ~6,000 prompt tokens: a prefill of most of a minute here
            client(solo, timeout=8).chat.completions.create(
                model="edison-brief", messages=[{"role": "user", "content": long_prompt(6000)}]
            )
        except BaseException as exc:  # noqa: BLE001 - asserted below
            outcome.append(exc)

    asker = threading.Thread(target=ask, daemon=True)
    asker.start()
    wait_busy(pid, within=8.0, cpu=0.3)  # prefilling, before the client gives up
    asker.join(timeout=30)
    assert outcome and isinstance(outcome[0], openai.APITimeoutError), outcome
    wait_idle(pid, within=3.0)
    assert_same_worker_serves_next(solo, pid)


def assert_same_worker_serves_next(service: Service, pid: int) -> None:
    wait_until_free(service)
    reply = client(service).chat.completions.create(model="edison-brief", messages=COUNT)
    assert reply.choices[0].finish_reason == "length"
    assert service.worker_pids() == [pid]  # the only worker, not killed and replaced


def test_full_queue_is_a_503_in_the_openai_shape(solo: Service) -> None:
    wait_until_free(solo)
    stream = client(solo).chat.completions.create(model="edison-long", messages=COUNT, stream=True)
    next(iter(stream))  # the worker is taken and there is no queue
    with pytest.raises(openai.APIStatusError) as caught:
        client(solo).chat.completions.create(model="edison-brief", messages=COUNT)
    stream.close()
    assert caught.value.status_code == 503
    assert caught.value.response.json()["error"]["code"] == "queue_full"
    assert caught.value.response.json()["error"]["type"] == "server_error"


# Errors.


@pytest.mark.parametrize(
    ("change", "status", "param", "code"),
    [
        ({"model": "gpt-4o"}, 404, "model", "model_not_found"),
        ({"messages": "hello"}, 400, "messages", None),
        ({"messages": []}, 400, "messages", None),
        ({"messages": [{"role": "user"}]}, 400, "messages[0].content", None),
        ({"messages": [{"role": "function", "content": "4", "name": "f"}]}, 400, "messages[0]", None),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         400, "messages[0].content[0]", None),
        ({"n": 2}, 400, "n", None),
        ({"logprobs": True}, 400, "logprobs", None),
        ({"functions": [{"name": "f"}]}, 400, "functions", None),
        ({"temperature": 3}, 400, "temperature", None),
        ({"extra_body": {"mirostat": 2}}, 400, "mirostat", None),
        ({"messages": [{"role": "user", "content": "x" * 250_000}]}, 413, None, "request_too_large"),
    ],
    ids=["unknown-model", "messages-string", "no-messages", "no-content", "function-role", "image", "n=2",
         "logprobs", "functions", "temperature", "unknown-field", "oversize"],
)
def test_bad_chat_request_gets_the_openai_error_shape(
    service: Service, change: dict[str, Any], status: int, param: str | None, code: str | None
) -> None:
    request = {"model": "edison", "messages": QUESTION, **change}
    with pytest.raises(openai.APIStatusError) as caught:
        client(service).chat.completions.create(**request)
    response = caught.value.response
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    assert uuid.UUID(response.headers["x-request-id"]).version == 4


@pytest.mark.parametrize(
    ("change", "param"),
    [({"prompt": [1, 2, 3]}, "prompt"), ({"echo": True}, "echo"), ({"best_of": 2}, "best_of")],
    ids=["token-prompt", "echo", "best_of"],
)
def test_bad_completion_request_gets_the_openai_error_shape(service: Service, change: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client(service).completions.create(**{"model": "edison", "prompt": "Hello", **change})
    assert caught.value.response.json()["error"]["param"] == param


def test_a_body_that_is_not_json_gets_the_openai_error_shape(service: Service) -> None:
    response = httpx.post(
        f"{service.url}/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"



def test_prompt_longer_than_the_context_is_a_400_not_a_retried_500(service: Service) -> None:
    with pytest.raises(openai.BadRequestError) as caught:  # ~9,000 tokens; the context holds 8,192
        client(service).completions.create(model="edison", prompt=long_prompt(9000), max_tokens=1)
    error = caught.value.response.json()["error"]
    assert (error["param"], error["code"]) == ("prompt", "context_length_exceeded")
