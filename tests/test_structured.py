"""Structured output and tool calls, driven by the real `openai` client against the real service
and the bundled model: a grammar holds every reply to its schema, each sequence of a batch to
its own, and a constrained generation stops like any other.

Schemas here bound every string and array (`maxLength`, `maxItems`): a reply cut by
`max_tokens` cannot parse, and a bounded schema lets the grammar close the JSON in time.
Replies are checked with pydantic models, never with the code under test.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any, Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from tests.support import COUNTING, Service, Stream, consecutive, wait_idle, write_config
from tests.test_openai import client, wait_until_free

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One worker with two slots: a cancel test watches the only worker, a batch test fills both."""
    root = tmp_path_factory.mktemp("structured")
    service = Service(write_config(root / "config.toml", {"pool": {"workers": 1, "slots": 2, "queue_size": 4}}),
                      root / "service.log")
    try:
        service.start()
        yield service
    finally:
        service.stop()


class City(BaseModel):
    name: str = Field(max_length=24)
    country: str = Field(max_length=24)
    population: int


class Address(BaseModel):
    street: str = Field(max_length=30)
    zip: str = Field(pattern=r"^[0-9]{5}$")


class Person(BaseModel):
    name: str = Field(max_length=20)
    role: Literal["admin", "editor", "viewer"]
    address: Address
    tags: list[Literal["red", "green", "blue"]] = Field(max_length=3)
    active: bool


WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 24}},
        "required": ["timezone"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time in a timezone", "parameters": TIME}},
]


class WeatherArgs(BaseModel, extra="forbid"):
    city: str = Field(max_length=24)
    unit: Literal["celsius", "fahrenheit"]


class TimeArgs(BaseModel, extra="forbid"):
    timezone: str = Field(max_length=24)


ARGUMENTS = {"get_weather": WeatherArgs, "get_time": TimeArgs}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris right now?"}]


def json_schema(model: type[BaseModel]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": model.__name__, "schema": model.model_json_schema()}}


# Structured output.


def test_parse_with_a_pydantic_model_returns_the_parsed_object(svc: Service) -> None:
    reply = client(svc, timeout=240).chat.completions.parse(
        model="edison", messages=[{"role": "user", "content": "Describe the city of Paris."}],
        response_format=City, max_tokens=120,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice
    assert isinstance(choice.message.parsed, City), choice.message


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_nested_schema_with_enums_gives_valid_output_over_seeds(svc: Service, seed: int) -> None:
    reply = client(svc, timeout=240).chat.completions.create(
        model="edison", messages=[{"role": "user", "content": "Make up a user of a content system."}],
        response_format=json_schema(Person), max_tokens=200, temperature=1.0, seed=seed,
    )
    assert reply.choices[0].finish_reason == "stop", reply.choices[0]
    Person.model_validate_json(reply.choices[0].message.content, strict=True)  # raises if it does not match


def test_json_object_mode_and_text_completions_give_json(svc: Service) -> None:
    chat = client(svc, timeout=240).chat.completions.create(
        model="edison", messages=[{"role": "user", "content": "Give me a JSON object about a cat."}],
        response_format={"type": "json_object"}, max_tokens=40,
    )
    content = chat.choices[0].message.content  # any object: unbounded, so it may be cut by max_tokens
    assert content.startswith("{"), content
    if chat.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)
    text = client(svc, timeout=240).completions.create(
        model="edison", prompt="A city as JSON:", max_tokens=120, extra_body={"response_format": json_schema(City)},
    )
    assert text.choices[0].finish_reason == "stop"
    City.model_validate_json(text.choices[0].text, strict=True)


# Tool calls.


def test_required_tool_choice_with_two_tools_gives_a_valid_call_of_one(svc: Service) -> None:
    reply = client(svc, timeout=240).chat.completions.create(
        model="edison", messages=ASK_WEATHER, tools=TOOLS, tool_choice="required", max_tokens=120,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    ARGUMENTS[call.function.name].model_validate_json(call.function.arguments, strict=True)


def test_a_whole_tool_round_trip_call_result_answer(svc: Service) -> None:
    api = client(svc, timeout=240).chat.completions
    first = api.create(model="edison", messages=ASK_WEATHER, tools=TOOLS,
                       tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=120)
    (call,) = first.choices[0].message.tool_calls
    assert first.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    arguments = WeatherArgs.model_validate_json(call.function.arguments, strict=True)
    result = {"city": arguments.city, "temperature": 18, "sky": "sunny"}
    history = [
        *ASK_WEATHER,
        first.choices[0].message.model_dump(exclude_none=True),  # the assistant message as the SDK returned it
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)},
    ]
    answer = api.create(model="edison", messages=history, tools=TOOLS, tool_choice="none", max_tokens=40)
    choice = answer.choices[0]
    assert choice.finish_reason in ("stop", "length") and not choice.message.tool_calls
    assert choice.message.content and choice.message.content.strip()
    # The call and its result reached the prompt: it is longer than the question alone by both.
    alone = api.create(model="edison", messages=ASK_WEATHER, max_tokens=1)
    assert answer.usage.prompt_tokens > alone.usage.prompt_tokens + len(json.dumps(result)) // 4


def test_streamed_tool_call_deltas_reassemble_into_valid_arguments(svc: Service) -> None:
    stream = client(svc, timeout=240).chat.completions.create(
        model="edison", messages=ASK_WEATHER, tools=TOOLS, tool_choice="required", max_tokens=120, stream=True,
    )
    calls: dict[int, dict[str, str]] = {}
    reasons, pieces = [], 0
    for chunk in stream:
        choice = chunk.choices[0]
        reasons.append(choice.finish_reason)
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += delta.id or ""
            call["name"] += (delta.function.name or "") if delta.function else ""
            call["arguments"] += (delta.function.arguments or "") if delta.function else ""
            pieces += 1
        assert not choice.delta.content
    assert reasons[-1] == "tool_calls" and set(reasons[:-1]) == {None}
    assert list(calls) == [0] and pieces > 3  # streamed in pieces, not in one lump at the end
    ARGUMENTS[calls[0]["name"]].model_validate_json(calls[0]["arguments"], strict=True)


# Batching: each sequence has its own grammar.


def test_each_sequence_in_a_batch_keeps_its_own_grammar(svc: Service) -> None:
    wait_until_free(svc)
    results: dict[str, Any] = {}

    def free_text() -> None:
        results["text"] = client(svc, timeout=240).completions.create(model="edison-long", prompt=COUNTING, max_tokens=40)

    other = threading.Thread(target=free_text, daemon=True)
    other.start()
    city = client(svc, timeout=280).chat.completions.create(
        model="edison", messages=[{"role": "user", "content": "Describe the city of Lyon."}],
        response_format=json_schema(City), max_tokens=120,
    )
    other.join(timeout=280)
    City.model_validate_json(city.choices[0].message.content, strict=True)
    counting = results["text"].choices[0].text
    assert consecutive(COUNTING + counting), counting  # unconstrained, beside a constrained sequence: it counts on


# Stop still stops.


# At least 300 numbers (600 tokens or more): the generation goes on until it is stopped, whatever
# the model would rather write.
ENDLESS = {"type": "array", "items": {"type": "integer"}, "minItems": 300}


def test_cancel_during_a_constrained_generation_idles_the_same_worker(svc: Service) -> None:
    wait_until_free(svc)
    (pid,) = svc.worker_pids()
    stream = Stream(svc.url, {"message": COUNTING, "mode": "long", "format": ENDLESS})
    stream.wait_for("token", count=5)
    assert stream.text().lstrip().startswith("[")
    cancelled_at = time.monotonic()
    assert svc.cancel(stream.request_id)["status"] == "cancelled"
    done = stream.done
    # Between two tokens, or inside the llama_decode of the next one (the abort callback).
    assert done.data["stopped"] is True and done.data["stopped_by"] in ("token", "native")
    assert done.at - cancelled_at < 1.0
    wait_idle(pid, within=3.0)
    assert_same_worker_answers_in_json(svc, pid)


def test_disconnect_during_a_constrained_generation_idles_the_same_worker(svc: Service) -> None:
    wait_until_free(svc)
    (pid,) = svc.worker_pids()
    stream = client(svc).chat.completions.create(
        model="edison-long", messages=[{"role": "user", "content": COUNTING}], stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "numbers", "schema": ENDLESS}},
    )
    for n, _ in enumerate(stream, 1):
        if n == 6:
            break
    stream.close()
    wait_idle(pid, within=3.0)  # the array would otherwise go on for 600 tokens or more
    assert_same_worker_answers_in_json(svc, pid)


def assert_same_worker_answers_in_json(svc: Service, pid: int) -> None:
    wait_until_free(svc)
    reply = client(svc, timeout=240).chat.completions.create(
        model="edison", messages=[{"role": "user", "content": "Describe Rome."}], response_format=json_schema(City),
        max_tokens=120,
    )
    City.model_validate_json(reply.choices[0].message.content, strict=True)
    assert svc.worker_pids() == [pid]


# Refused before the stream starts.


def schema_format(schema: Any) -> dict[str, Any]:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}


BIG = {"type": "object", "properties": {f"field{i}": {"type": "string", "description": "x" * 200} for i in range(100)}}


@pytest.mark.parametrize(
    ("change", "param", "says"),
    [
        (schema_format({"type": "integer", "minimum": 1}), "response_format.json_schema.schema", "'minimum'"),
        (schema_format({"type": "array", "items": {"type": "string"}, "uniqueItems": True}), "response_format.json_schema.schema", "'uniqueItems'"),
        (schema_format({"type": "string", "format": "email"}), "response_format.json_schema.schema", "'email'"),
        (schema_format({"type": "string", "pattern": "^\\d+$"}), "response_format.json_schema.schema", "\\d"),
        (schema_format({"type": "string", "maxLength": 100_000}), "response_format.json_schema.schema", "maxLength"),
        (schema_format({"$ref": "https://example.com/schema.json"}), "response_format.json_schema.schema", "$ref"),
        (schema_format({"type": "object", "properties": {}, "required": ["a"]}), "response_format.json_schema.schema", "'a'"),
        (schema_format("not a schema"), "response_format.json_schema.schema", "JSON schema"),
        (schema_format(BIG), "response_format.json_schema.schema", "limit"),
        ({"response_format": {"type": "xml"}}, "response_format", "json_schema"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name", "letters"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "one of the tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}]},
         "tools[0].function.parameters", "'not'"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format", "tools"),
    ],
    ids=["minimum", "uniqueItems", "format-email", "pattern-escape", "huge-maxLength", "remote-ref", "required-unknown",
         "not-an-object", "huge-schema", "unknown-type", "tool-name", "tool-choice-unknown", "tool-parameters-not",
         "format-and-tools"],
)
def test_an_unsupported_or_bad_schema_is_a_400_naming_it(svc: Service, change: dict[str, Any], param: str, says: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client(svc).chat.completions.create(model="edison", messages=ASK_WEATHER, max_tokens=5, **change)
    error = caught.value.response.json()["error"]
    assert error["param"] == param and says in error["message"], error


def test_a_bad_format_on_chat_stream_is_a_400_before_the_stream_starts(svc: Service) -> None:
    for bad in ({"type": "number", "multipleOf": 2}, "yaml", {"type": "string", "pattern": "no-anchors"}):
        response = httpx.post(f"{svc.url}/chat/stream", json={"message": "hi", "format": bad}, timeout=30)
        assert response.status_code == 400, response.text
        assert response.headers["content-type"].startswith("application/json")
        assert "format" in response.json()["error"]
    assert svc.health()["active_requests"] == 0  # nothing reached the pool
