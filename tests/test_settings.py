"""A bad config value is a clear start-up error naming the key."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edison.settings import DEFAULT_CONFIG, ConfigError, Settings, load_settings
from tests.support import REPO


def test_shipped_config_loads_with_chat_and_code_modes() -> None:
    settings = load_settings(DEFAULT_CONFIG)
    assert settings.server.host == "127.0.0.1" and settings.server.port == 8811
    assert {"chat", "code"} <= set(settings.modes) and settings.default_mode == "chat"
    assert settings.pool.workers * settings.pool.slots >= 4 and settings.threads >= 1  # 4 chats, no queue


def test_shipped_config_and_the_code_defaults_agree() -> None:
    """config.toml is what `make run` uses, the dataclass defaults what a config without the key
    gets: the two drifted once (flash attention was on in the code, off in the file)."""
    shipped, built_in = load_settings(DEFAULT_CONFIG), Settings()
    for section in ("server", "model", "pool", "debug"):
        assert getattr(shipped, section) == getattr(built_in, section), section
    assert shipped.modes["chat"] == built_in.modes["chat"]  # what an installed wheel (no config.toml) runs


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[pool]\nworkers = 0", "pool.workers"),
        ("[pool]\nworkers = 'two'", "pool.workers"),
        ("[pool]\ncancel_deadline_s = -1", "pool.cancel_deadline_s"),
        ("[server]\nport = 70000", "server.port"),
        ("[server]\nprot = 1", "server.prot: unknown key"),
        ("[model]\nn_ctx = 1.5", "model.n_ctx"),
        ("[modes.chat]\ntemperature = -0.5", "modes.chat.temperature"),
        ("[modes.chat]\nstop = [1]", "modes.chat.stop"),
        ("default_mode = 'nope'\n[modes.chat]", "default_mode"),
        ("[sever]\nport = 1", "sever: unknown section"),
        ("[pool\nworkers = 1", "not valid TOML"),
    ],
)
def test_bad_value_names_its_key(tmp_path, toml: str, key: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("[", r"\[")):
        load_settings(path)


def test_flags_override_the_file() -> None:
    settings = load_settings(DEFAULT_CONFIG, **{"server.port": 9999, "pool.workers": 3, "server.host": None})
    assert settings.server.port == 9999 and settings.pool.workers == 3 and settings.server.host == "127.0.0.1"


def test_cli_refuses_a_bad_config_with_the_key_and_exit_code_2(tmp_path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[pool]\nqueue_size = -3\n")
    result = subprocess.run(
        [sys.executable, "-m", "edison", "serve", "--config", str(path)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "pool.queue_size" in result.stderr and "Traceback" not in result.stderr


def test_models_tables_inherit_model_and_pool_and_name_their_keys_in_errors() -> None:
    from edison.settings import ConfigError, settings_from_dict

    base = {"model": {"n_ctx": 4096, "threads": 2}, "pool": {"slots": 3},
            "models": {"a": {"path": "gemma3-270m", "slots": 1, "keep_alive_s": 0}, "b": {"path": "/m/x.gguf", "n_ctx": 2048}}}
    settings = settings_from_dict(base)
    entries = settings.entries()
    assert list(entries) == ["a", "b"]  # no default_model: the first table
    assert (entries["a"].model.n_ctx, entries["a"].model.threads, entries["a"].pool.slots, entries["a"].keep_alive_s) == (4096, 2, 1, 0.0)
    assert (entries["b"].model.n_ctx, entries["b"].pool.slots, entries["b"].keep_alive_s) == (2048, 3, 300.0)
    assert list(settings_from_dict({**base, "default_model": "b"}).entries()) == ["b", "a"]
    # Without [models] tables, [model] is the one model, named after its bundled name or file, never unloaded.
    single = settings_from_dict({"model": {"path": "/models/qwen2.5-7b.Q4.gguf"}}).entries()
    assert list(single) == ["qwen2.5-7b.Q4"] and single["qwen2.5-7b.Q4"].keep_alive_s == -1
    assert list(settings_from_dict({}).entries()) == ["smollm2-135m"]

    bad = [
        ({"models": {"a": {"path": "x.gguf", "colour": 1}}}, "models.a.colour: unknown key"),
        ({"models": {"a": {"n_ctx": 4096}}}, "models.a.path: required"),
        ({"models": {"a": {"path": "x.gguf", "n_ctx": 10}}}, "models.a.n_ctx"),
        ({"models": {"a": {"path": "x.gguf", "slots": 0}}}, "models.a.slots"),
        ({"models": {"a": {"path": "x.gguf", "keep_alive_s": -5}}}, "models.a.keep_alive_s"),
        ({"models": {"a b": {"path": "x.gguf"}}}, "models.a b: a model name"),
        ({"models": {"a": {"path": "x.gguf"}}, "default_model": "c"}, "default_model: 'c' is not a configured model"),
        ({"pool": {"max_loaded_models": -1}}, "pool.max_loaded_models"),
    ]
    for data, message in bad:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            settings_from_dict(data)
