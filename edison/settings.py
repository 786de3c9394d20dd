"""Typed settings: one frozen dataclass tree, built from TOML by `load_settings`.

Everything the service can be told lives here, with the reason for each default. Nothing
here does I/O at import; `load_settings` is the only function that reads a file.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
# A checkout's config.toml; an installed wheel has none and runs on the defaults below.
DEFAULT_CONFIG = REPO_ROOT / "config.toml"


class ConfigError(ValueError):
    """A bad config value; the message names the key."""


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"  # loopback unless the owner decides otherwise
    port: int = 8811
    max_body_bytes: int = 1_000_000  # a chat body larger than this is a mistake or an attack
    log_level: str = "info"
    log_format: str = "text"  # text for a terminal; json (one object per line) for journald/Loki
    # Empty: no key (fine on loopback). Set, every route but /health and the page needs
    # "Authorization: Bearer <key>". EDISON_API_KEY in the environment wins. Never in a repr.
    api_key: str = field(default="", repr=False)


@dataclass(frozen=True)
class ModelSettings:
    # A GGUF file, or a bundled model by name (smollm2-135m, gemma3-270m), assembled into
    # cache_dir; empty: the bundled default, smollm2-135m (edison/model.py).
    path: str = ""
    cache_dir: str = ""  # empty: ~/.cache/edison
    n_ctx: int = 8192
    # The same as config.toml's, which says what each buys (benchmarks/RESULTS.md, "Issue #8").
    n_batch: int = 512
    n_ubatch: int = 128
    flash_attn: bool = True
    # Sliding-window layers (Gemma's) keep only their window, as llama-server does: half a Gemma
    # worker's memory, at the same decode speed. True keeps every position, so that a turn that goes
    # back further than the window (an edited message, a regenerated long reply) still reuses
    # its prefix instead of reading it again (the saved states cover the common cases).
    swa_full: bool = False
    n_gpu_layers: int = 0
    threads: int = 0  # per worker; 0 = cores / workers, at least 1
    threads_batch: int = 0  # per worker for prefill; 0 = same as threads
    prompt_format: str = "auto"  # auto: the GGUF's chat template if it has one, else a transcript

    def resolved_threads(self, workers: int) -> int:
        return self.threads or max(1, (os.cpu_count() or 1) // workers)


@dataclass(frozen=True)
class PoolSettings:
    workers: int = 1
    slots: int = 4  # sequences one worker decodes together, from one copy of the model
    queue_size: int = 16  # requests that wait for a free slot; one more gets a 503
    cancel_deadline_s: float = 1.0  # a worker that has not acknowledged a cancel by then is killed
    kill_grace_s: float = 0.2  # at shutdown, beyond cancel_deadline_s, before a lingering worker is SIGKILLed
    prefill_chunk: int = 512  # prompt tokens per step between cancel checks and progress events
    # A busy worker silent this long is killed and its requests resumed; far above one step
    # (a 512-token chunk takes ~1.2 s on one slow core), far below a client's patience.
    stall_timeout_s: float = 30.0
    restart_budget: int = 5  # failed starts (or crashes within crash_window_s) before a worker gives up
    restart_backoff_s: float = 0.5  # first respawn delay after a failure; doubles, capped at 30 s
    crash_window_s: float = 60.0  # crashes of a ready worker counted over this sliding window
    # Several models ([models.NAME]): how many may be loaded at once, and their estimated memory
    # (GGUF size plus KV cache, edison/gguf.py). 0 = no limit. The least recently used idle model
    # is unloaded to make room; a model with requests in flight never is.
    max_loaded_models: int = 0
    max_loaded_mib: int = 0


@dataclass(frozen=True)
class KVCacheSettings:
    """Saved KV caches outside the workers (edison/kvstore.py): a conversation whose slot was
    taken, whose worker was killed, or whose service restarted restores its history instead of
    reading it again. A budget of 0 turns its tier off."""

    ram_mib: int = 4096  # tmpfs: survives a killed worker and a restarted service
    disk_mib: int = 8192  # under model.cache_dir/kv: survives a reboot too
    ram_dir: str = ""  # empty: /dev/shm
    disk_dir: str = ""  # empty: <model.cache_dir>/kv
    min_tokens: int = 64  # shorter states are read again instead: not worth a file


@dataclass(frozen=True)
class DebugSettings:
    # Lets a request ask its worker to sleep inside a C call that ignores the cancel flag
    # (`debug_wedge_s` in the body): the only way to exercise the kill tier on demand.
    allow_wedge: bool = False
    # > 0: the pool supervisor hangs this many seconds after start, so a test can watch the
    # systemd watchdog pings stop while the event loop still serves. Never set it in production.
    stall_supervisor_after_s: float = 0.0
    # > 0: every worker sleeps this long in C before it loads its model, deaf to every flag: a
    # slow load on demand, so a test can stop one. Never set it in production.
    load_wedge_s: float = 0.0


@dataclass(frozen=True)
class Sampling:
    """How a reply is sampled: a mode's settings, as they travel to the worker with each job.
    The one place their defaults live."""

    # The bundled default model's card recommends 0.2 / 0.9 (config.toml says what was measured).
    temperature: float = 0.2
    top_p: float = 0.9
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    max_tokens: int = 512
    seed: int = -1  # -1: a fresh seed per request
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModeSettings:
    """A `[modes.NAME]` table: its sampling keys sit beside these two in the TOML."""

    description: str = "Friendly conversation"
    system_prompt: str = (
        "You are Edison, a helpful assistant running on the user's own machine. Answer clearly and briefly."
    )
    sampling: Sampling = field(default_factory=Sampling)


# The keys of a [models.NAME] table that override [model], and those that override [pool].
MODEL_KEYS = ("path", "cache_dir", "n_ctx", "n_batch", "n_ubatch", "flash_attn", "swa_full", "n_gpu_layers",
              "threads", "threads_batch", "prompt_format")
POOL_KEYS = ("workers", "slots", "queue_size")
NEVER = -1.0  # keep_alive_s: never unloaded for being idle


@dataclass(frozen=True)
class ModelEntry:
    """One servable model: its own [model] and [pool] settings, and how long it stays loaded idle."""

    name: str
    model: ModelSettings
    pool: PoolSettings
    keep_alive_s: float = 300.0  # Ollama's default; 0 = unload as soon as idle; -1 = never


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    pool: PoolSettings = field(default_factory=PoolSettings)
    kv_cache: KVCacheSettings = field(default_factory=KVCacheSettings)
    debug: DebugSettings = field(default_factory=DebugSettings)
    modes: dict[str, ModeSettings] = field(default_factory=lambda: {"chat": ModeSettings()})
    default_mode: str = "chat"
    # Empty: the [model] table is the one model (named by model_name()), never unloaded.
    models: dict[str, ModelEntry] = field(default_factory=dict)
    default_model: str = ""

    @property
    def threads(self) -> int:
        return self.model.resolved_threads(self.pool.workers)

    def entries(self) -> dict[str, ModelEntry]:
        """Every servable model by name; the default first."""
        if not self.models:
            name = model_name(self.model)
            return {name: ModelEntry(name, self.model, self.pool, NEVER)}
        first = self.default_model or next(iter(self.models))
        return {first: self.models[first], **{k: v for k, v in self.models.items() if k != first}}

    def for_model(self, entry: ModelEntry) -> Settings:
        """These settings as one model's pool sees them: its [model] and [pool] in place."""
        return dataclasses.replace(self, model=entry.model, pool=entry.pool)


def model_name(model: ModelSettings) -> str:
    """A bundled model's name, else the GGUF file's name without its extension."""
    if not model.path:
        return "smollm2-135m"  # edison.model.DEFAULT_BUNDLED (not imported: this module does no I/O)
    if "/" not in model.path and not model.path.endswith(".gguf"):
        return model.path  # a bundled name (checked when the model is resolved)
    return Path(model.path).stem


# Range checks: dotted key (bare key for modes) -> (predicate, what a valid value is).
_CHECKS: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "server.port": (lambda v: 0 <= v <= 65535, "a port number 0-65535"),
    "server.max_body_bytes": (lambda v: v >= 1024, "at least 1024"),
    "server.log_level": (
        lambda v: v in ("critical", "error", "warning", "info", "debug"),
        "one of critical, error, warning, info, debug",
    ),
    "server.log_format": (lambda v: v in ("text", "json"), "text or json"),
    "server.api_key": (lambda v: v == v.strip(), "a key without leading or trailing spaces"),
    "model.n_ctx": (lambda v: v >= 128, "at least 128"),
    "model.n_batch": (lambda v: v >= 1, "at least 1"),
    "model.n_ubatch": (lambda v: v >= 1, "at least 1"),
    "model.n_gpu_layers": (lambda v: v >= -1, "-1 (all) or more"),
    "model.threads": (lambda v: v >= 0, "0 (auto) or more"),
    "model.threads_batch": (lambda v: v >= 0, "0 (auto) or more"),
    "model.prompt_format": (lambda v: v in ("auto", "template", "transcript"), "auto, template or transcript"),
    "pool.workers": (lambda v: 1 <= v <= 64, "1-64"),
    "pool.slots": (lambda v: 1 <= v <= 64, "1-64"),
    "pool.stall_timeout_s": (lambda v: v > 0, "more than 0"),
    "pool.crash_window_s": (lambda v: v > 0, "more than 0"),
    "pool.queue_size": (lambda v: v >= 0, "0 or more"),
    "pool.cancel_deadline_s": (lambda v: 0 < v <= 60, "more than 0 and at most 60"),
    "pool.kill_grace_s": (lambda v: 0 <= v <= 10, "0-10"),
    "pool.prefill_chunk": (lambda v: v >= 1, "at least 1"),
    "pool.restart_budget": (lambda v: v >= 1, "at least 1"),
    "pool.restart_backoff_s": (lambda v: v >= 0, "0 or more"),
    "pool.max_loaded_models": (lambda v: v >= 0, "0 (no limit) or more"),
    "pool.max_loaded_mib": (lambda v: v >= 0, "0 (no limit) or more"),
    "kv_cache.ram_mib": (lambda v: v >= 0, "0 (off) or more"),
    "kv_cache.disk_mib": (lambda v: v >= 0, "0 (off) or more"),
    "kv_cache.min_tokens": (lambda v: v >= 1, "at least 1"),
    "debug.stall_supervisor_after_s": (lambda v: v >= 0, "0 (off) or more"),
    "debug.load_wedge_s": (lambda v: 0 <= v <= 600, "0 (off) to 600"),
    "temperature": (lambda v: v >= 0, "0 or more"),
    "top_p": (lambda v: 0 < v <= 1, "more than 0 and at most 1"),
    "top_k": (lambda v: v >= 0, "0 or more"),
    "min_p": (lambda v: 0 <= v <= 1, "0-1"),
    "repeat_penalty": (lambda v: v > 0, "more than 0"),
    "max_tokens": (lambda v: v >= 1, "at least 1"),
    "seed": (lambda v: v >= -1, "-1 (random) or more"),
}


def _build(cls: type, table: Any, prefix: str, shown: str = "") -> Any:
    """One dataclass from one TOML table, with every key and type checked. `prefix` names the
    range checks (model.n_ctx); `shown`, if given, names the key in errors (models.NAME.n_ctx)."""
    if not isinstance(table, dict):
        raise ConfigError(f"{shown or prefix}: expected a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    secret = {f.name for f in dataclasses.fields(cls) if not f.repr}  # never echoed in an error
    values: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{shown or prefix}.{key}"
        if key not in names:
            raise ConfigError(f"{name}: unknown key (known: {', '.join(sorted(names))})")
        values[key] = _coerce(name, hints[key], value)
        check = _CHECKS.get(key if cls is Sampling else f"{prefix}.{key}")
        if check and not check[0](values[key]):
            shown = "the value" if key in secret else repr(value)
            raise ConfigError(f"{name}: {shown} is not valid; expected {check[1]}")
    return cls(**values)


def _coerce(name: str, hint: Any, value: Any) -> Any:
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    else:  # tuple[str, ...]
        ok = isinstance(value, list) and all(isinstance(v, str) and v for v in value)
        value = tuple(value) if ok else value
    if not ok:
        expected = getattr(hint, "__name__", "a list of non-empty strings")
        raise ConfigError(f"{name}: {value!r} is not valid; expected {expected}")
    return value


def _mode(table: Any, prefix: str) -> ModeSettings:
    """A mode's own keys and its sampling keys come flat in one table."""
    if not isinstance(table, dict):
        raise ConfigError(f"{prefix}: expected a table")
    own = {k: v for k, v in table.items() if k in ("description", "system_prompt")}
    sampling = _build(Sampling, {k: v for k, v in table.items() if k not in own}, prefix)
    return dataclasses.replace(_build(ModeSettings, own, prefix), sampling=sampling)


def _models(data: dict[str, Any]) -> dict[str, ModelEntry]:
    """[models.NAME] tables: each is [model] and [pool] with its own keys on top, checked with
    the same rules and named in errors as models.NAME.key."""
    tables = data.get("models", {})
    if not isinstance(tables, dict):
        raise ConfigError("models: expected [models.NAME] tables")
    entries = {}
    for name, table in tables.items():
        prefix = f"models.{name}"
        if not isinstance(table, dict):
            raise ConfigError(f"{prefix}: expected a table")
        if not name or not all(c.isalnum() or c in "._-" for c in name):
            raise ConfigError(f"{prefix}: a model name is letters, digits, '.', '_' and '-'")
        known = {*MODEL_KEYS, *POOL_KEYS, "keep_alive_s"}
        for key in table:
            if key not in known:
                raise ConfigError(f"{prefix}.{key}: unknown key (known: {', '.join(sorted(known))})")
        if not table.get("path"):
            raise ConfigError(f"{prefix}.path: required: a GGUF file or a bundled model (smollm2-135m, gemma3-270m)")
        model = _build(ModelSettings, {**data.get("model", {}), **{k: v for k, v in table.items() if k in MODEL_KEYS}},
                       "model", prefix)
        pool = _build(PoolSettings, {**data.get("pool", {}), **{k: v for k, v in table.items() if k in POOL_KEYS}},
                      "pool", prefix)
        keep_alive = _coerce(f"{prefix}.keep_alive_s", float, table.get("keep_alive_s", 300.0))
        if keep_alive < 0 and keep_alive != NEVER:
            raise ConfigError(f"{prefix}.keep_alive_s: {keep_alive!r} is not valid; expected -1 (never), 0 or more seconds")
        entries[name] = ModelEntry(name, model, pool, keep_alive)
    return entries


def settings_from_dict(data: dict[str, Any]) -> Settings:
    sections = {"server": ServerSettings, "model": ModelSettings, "pool": PoolSettings, "kv_cache": KVCacheSettings,
                "debug": DebugSettings}
    known = set(sections) | {"modes", "default_mode", "models", "default_model"}
    for key in data:
        if key not in known:
            raise ConfigError(f"{key}: unknown section (known: {', '.join(sorted(known))})")
    built = {key: _build(cls, data.get(key, {}), key) for key, cls in sections.items()}
    modes_table = data.get("modes", {"chat": {}})
    if not isinstance(modes_table, dict) or not modes_table:
        raise ConfigError("modes: define at least one [modes.NAME] table")
    modes = {name: _mode(table, f"modes.{name}") for name, table in modes_table.items()}
    default_mode = data.get("default_mode", "chat")
    if default_mode not in modes:
        raise ConfigError(f"default_mode: {default_mode!r} is not a configured mode ({', '.join(modes)})")
    models = _models(data)
    default_model = data.get("default_model", "")
    if default_model and default_model not in models:
        configured = ", ".join(models) or "none: add [models.NAME] tables"
        raise ConfigError(f"default_model: {default_model!r} is not a configured model ({configured})")
    return Settings(modes=modes, default_mode=default_mode, models=models, default_model=default_model, **built)


def load_settings(path: str | Path = DEFAULT_CONFIG, **overrides: Any) -> Settings:
    """Read a TOML file; `overrides` are dotted keys ("pool.workers") from the command line."""
    path = Path(path)
    if path == DEFAULT_CONFIG and not path.exists():
        data: dict[str, Any] = {}  # an installed wheel: no checkout, so the built-in defaults
        return settings_from_dict(_apply(data, overrides))
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return settings_from_dict(_apply(data, overrides))


def _apply(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, key = dotted.split(".", 1)
        data.setdefault(section, {})[key] = value
    return data
