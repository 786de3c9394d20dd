"""The bundled default model, SmolLM2 135M Instruct, end to end: its GGUF's chat template is
found and used (`prompt_format = "auto"`), a tool call goes through that template, and Stop
stops it like any other. The rest of the suite runs on Gemma 3 270M (tests/support.py says why);
nothing here depends on what the model chooses to say.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import llama_cpp
import pytest

from edison.model import DEFAULT_BUNDLED, BUNDLED, resolve_model_path
from edison.settings import DEFAULT_CONFIG, ModelSettings, load_settings
from tests.support import COUNTING, Service, Stream, chat, long_prompt, wait_busy, wait_idle, write_config
from tests.test_openai import client
from tests.test_structured import ARGUMENTS, ASK_WEATHER, TOOLS

pytestmark = pytest.mark.timeout(180)

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEM = "You are a helpful assistant."  # the "chat" mode's system prompt in tests/support.py


@pytest.fixture(scope="module")
def default(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The model the shipped config.toml names (an empty path), one worker with two slots."""
    root = tmp_path_factory.mktemp("default_model")
    shipped = load_settings(DEFAULT_CONFIG).model.path
    svc = Service(write_config(root / "config.toml", {"model": {"path": shipped}, "pool": {"workers": 1, "slots": 2}}),
                  root / "service.log")
    try:
        svc.start()
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def vocab() -> Iterator[llama_cpp.Llama]:
    llm = llama_cpp.Llama(str(resolve_model_path(ModelSettings())), vocab_only=True, verbose=False)
    yield llm
    llm.close()


def chatml(messages: list[tuple[str, str]]) -> str:
    """ChatML written out by hand, as SmolLM2's template renders it: an independent reference."""
    turns = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages)
    return turns + "<|im_start|>assistant\n"


def test_the_shipped_config_serves_smollm2_with_its_chat_template(default: Service) -> None:
    assert load_settings(DEFAULT_CONFIG).model.path == "" and DEFAULT_BUNDLED == "smollm2-135m"
    assert BUNDLED[DEFAULT_BUNDLED][0].filename == SMOLLM2_FILE
    assert default.health()["model"] == {"file": SMOLLM2_FILE, "prompt_format": "template"}
    models = [m.id for m in client(default).models.list().data]
    assert models[0] == "smollm2-135m" and "edison" in models  # the bundled name; its file's name answers too
    assert "prompt format: template" in default.log()


def test_a_chat_reaches_the_model_through_the_template(default: Service, vocab: llama_cpp.Llama) -> None:
    question = "What is the capital of France?"
    done = chat(default.url, question)[-1].data
    assert done["ok"] is True and done["response"].strip(), done
    assert "<|im_" not in done["response"]  # the template's markup ends the turn; it is never streamed
    # The prompt was the ChatML rendering, markup as special tokens, not a "User:" transcript.
    expected = vocab.tokenize(chatml([("system", SYSTEM), ("user", question)]).encode(), add_bos=False, special=True)
    assert done["usage"]["prompt_tokens"] == len(expected)
    history = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi! How can I help?"}]
    again = chat(default.url, question, history=history)[-1].data
    turns = [("system", SYSTEM), ("user", "Hello"), ("assistant", "Hi! How can I help?"), ("user", question)]
    assert again["usage"]["prompt_tokens"] == len(vocab.tokenize(chatml(turns).encode(), add_bos=False, special=True))


def test_a_tool_call_goes_through_the_template(default: Service) -> None:
    api = client(default, timeout=120).chat.completions
    reply = api.create(model="edison", messages=ASK_WEATHER, tools=TOOLS, tool_choice="required", max_tokens=120)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    ARGUMENTS[call.function.name].model_validate_json(call.function.arguments, strict=True)
    # The template has no `tools` variable, so the tools were listed in its system turn.
    alone = api.create(model="edison", messages=ASK_WEATHER, max_tokens=1)
    assert reply.usage.prompt_tokens > alone.usage.prompt_tokens + 40


def test_stop_stops_the_default_model_in_decode_and_in_prefill(default: Service) -> None:
    stream = Stream(default.url, {"message": COUNTING, "mode": "long"})
    stream.wait_for("token", count=5)
    pid = default.worker_for(stream.request_id)
    stopped_at = time.monotonic()
    assert default.cancel(stream.request_id)["status"] == "cancelled"
    done = stream.done
    assert done.data["stopped"] is True and done.data["stopped_by"] in ("token", "native")
    assert done.at - stopped_at < 0.5  # the flag, read between tokens or inside llama_decode
    wait_idle(pid, within=3.0)

    stream = Stream(default.url, {"message": long_prompt(6000)})
    wait_busy(pid, cpu=0.3)
    stopped_at = time.monotonic()
    assert default.cancel(stream.request_id)["status"] == "cancelled"
    done = stream.done
    assert done.data["stopped"] is True and done.data["stopped_by"] in ("native", "chunk"), done.data
    assert done.at - stopped_at < 0.5
    wait_idle(pid, within=3.0)
    assert default.worker_pids() == [pid]  # stopped by the flag, not by the kill tier
