"""The grammar inside the worker's engine, in this process with the real model: the reply matches
the schema, and the grammar runs over the whole vocabulary only for the tokens it rejects
(llama.cpp's `common_sampler_sample`), which is what keeps constrained decoding fast.

The engine is the one a worker runs (`edison.worker.engine.Engine`), driven step by step the
way `worker.main.serve` drives it; no pool, no HTTP.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from collections.abc import Iterator
from typing import Any

import pytest

from edison.http.schema import MAX_COUNT, MAX_TOTAL_COUNT, check_schema
from edison.model import resolve_model_path
from edison.protocol import Done, Failed, FailureKind, Format, Job, Token
from edison.settings import ModelSettings, Sampling, load_settings
from edison.worker.grammar import Constraint, grammar_text
from tests.support import TEST_MODEL

pytestmark = pytest.mark.timeout(300)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer"},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    from edison.worker.engine import Engine

    path = str(resolve_model_path(ModelSettings(path=TEST_MODEL)))
    settings = load_settings(**{"model.path": path, "model.n_ctx": 2048, "pool.workers": 1, "pool.slots": 2,
                                "kv_cache.ram_mib": 0, "kv_cache.disk_mib": 0})
    engine = Engine(path, settings, multiprocessing.RawArray("q", 2), 0)
    yield engine
    engine.ctx.close()
    engine.model.close()


def run(engine: Any, *jobs: Job) -> tuple[dict[int, object], dict[int, Constraint | None]]:
    """Every job to its end in one batch; their final messages and their constraints."""
    finals: dict[int, object] = {}
    constraints: dict[int, Constraint | None] = {}

    def emit(message: object) -> None:
        if not isinstance(message, Token):
            finals[message.job_id] = message  # type: ignore[attr-defined]

    for job in jobs:
        engine.add(job, emit)
    for seq in engine.active.values():
        constraints[seq.job.job_id] = seq.constraint
    while not engine.idle:
        engine.step(emit)
    return finals, constraints


def job(job_id: int, prompt: str, fmt: Format | None, slot: int = 0, max_tokens: int = 160) -> Job:
    sampling = Sampling(temperature=0.0, repeat_penalty=1.0, max_tokens=max_tokens, seed=1)
    return Job(job_id, f"test-{job_id}", sampling, prompt=prompt, slot=slot, format=fmt)


def test_constrained_reply_matches_and_the_full_grammar_pass_runs_only_on_rejections(engine: Any) -> None:
    fmt = Format(schema=json.dumps(PERSON))
    finals, constraints = run(engine, job(1, "User: Make up a user of a content system, as JSON.\nAssistant:", fmt))
    done, constraint = finals[1], constraints[1]
    assert isinstance(done, Done) and done.finish_reason == "stop", done
    reply = json.loads(done.text)
    assert set(reply) == set(PERSON["required"]) and reply["role"] in ("admin", "editor", "viewer")
    assert isinstance(reply["age"], int) and len(reply["name"]) <= 20 and len(reply["tags"]) <= 3
    assert constraint is not None and constraint.sampled == done.usage.completion_tokens + 1  # + the end token
    # Most tokens pass the one-token check; running the grammar over all 262,144 tokens on every
    # token (llama-cpp-python's way) is what made constrained decoding 4x slower.
    assert constraint.full_passes < constraint.sampled / 2, (constraint.full_passes, constraint.sampled)


def test_two_sequences_of_one_batch_keep_their_own_grammars(engine: Any) -> None:
    numbers = Format(schema=json.dumps({"type": "array", "items": {"type": "integer"}, "maxItems": 6}))
    words = Format(schema=json.dumps({"type": "array", "items": {"enum": ["yes", "no"]}, "maxItems": 4}))
    finals, _ = run(
        engine,
        job(2, "User: Count to five, as a JSON list.\nAssistant:", numbers, slot=0),
        job(3, "User: Answer yes or no a few times, as a JSON list.\nAssistant:", words, slot=1),
    )
    counted, answered = json.loads(finals[2].text), json.loads(finals[3].text)  # type: ignore[attr-defined]
    assert all(isinstance(n, int) for n in counted) and len(counted) <= 6
    assert all(w in ("yes", "no") for w in answered) and len(answered) <= 4


def test_a_tool_call_grammar_writes_a_call_of_a_listed_tool(engine: Any) -> None:
    from edison.protocol import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, Tool

    city = json.dumps({"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]})
    fmt = Format(tools=(Tool("get_weather", "Weather", city), Tool("get_time", "Time", city)), tool_choice="required")
    finals, _ = run(engine, job(4, "User: What is the weather in Paris?\nAssistant:", fmt))
    text = finals[4].text.strip()  # type: ignore[attr-defined]
    assert text.startswith(TOOL_CALL_OPEN) and text.endswith(TOOL_CALL_CLOSE), text
    call = json.loads(text[len(TOOL_CALL_OPEN) : -len(TOOL_CALL_CLOSE)])
    assert call["name"] in ("get_weather", "get_time") and set(call["arguments"]) == {"city"}


def test_a_grammar_that_cannot_be_built_fails_its_job_and_the_engine_goes_on(engine: Any) -> None:
    broken = Format(schema=json.dumps({"$ref": "#/$defs/missing"}))  # what the HTTP check would refuse
    finals, _ = run(engine, job(5, "User: hi\nAssistant:", broken), job(6, "User: hi\nAssistant:", None, slot=1, max_tokens=4))
    assert isinstance(finals[5], Failed) and finals[5].kind is FailureKind.BAD_FORMAT, finals[5]
    assert isinstance(finals[6], Done) and finals[6].usage.completion_tokens == 4


def test_the_largest_schema_the_http_layer_admits_compiles_in_a_blink(engine: Any) -> None:
    """Compilation runs between two steps and no cancel flag reaches it: it must stay short."""
    fields = MAX_TOTAL_COUNT // MAX_COUNT
    schema = {"type": "object", "properties": {
        f"f{i}": {"type": "array", "items": {"type": "string"}, "maxItems": MAX_COUNT} for i in range(fields)
    }, "required": [f"f{i}" for i in range(fields)]}
    text = grammar_text(Format(schema=check_schema(schema, "schema")))
    started = time.monotonic()
    constraint = Constraint(engine.vocab, engine.n_vocab, text)
    elapsed = time.monotonic() - started
    constraint.free()
    assert elapsed < 0.5, f"{len(text)} grammar characters took {elapsed:.3f} s to compile"
