"""`edison serve`: settings from TOML and flags, the bundled model, then uvicorn.

Under systemd (Type=notify) the server reports READY/STATUS/WATCHDOG/STOPPING (notify.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import uvicorn

from edison.haproxy import DESCRIPTION as HAPROXY_DESCRIPTION
from edison.haproxy import add_arguments as add_haproxy_arguments
from edison.haproxy import main as haproxy_config
from edison.logging_setup import configure_logging
from edison.notify import Notifier
from edison.settings import DEFAULT_CONFIG, ConfigError, Settings, load_settings

logger = logging.getLogger("edison")


class EdisonServer(uvicorn.Server):
    """uvicorn, plus: every open stream gets its `done` before connections are drained, and
    systemd hears about it all (uvicorn's main loop ticks every 0.1 s on the event loop)."""

    def __init__(self, config: uvicorn.Config, pool: object, notifier: Notifier) -> None:
        super().__init__(config)
        self.pool = pool
        self.notifier = notifier

    async def on_tick(self, counter: int) -> bool:
        self.notifier.tick(self.pool)  # type: ignore[arg-type]
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list | None = None) -> None:
        self.notifier.stopping()
        self.pool.end_all("server shutting down")  # type: ignore[attr-defined]
        await super().shutdown(sockets)
        # A shutdown that got this far is clean: exit 0 instead of uvicorn re-raising the
        # signal (which would end the process with -SIGTERM).
        self._captured_signals.clear()


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="edison",
        description="Edison: a self-hosted LLM chat service where Stop means stop.",
    )
    commands = root.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP service and its model workers")
    serve.add_argument("--config", default=str(DEFAULT_CONFIG), help="TOML settings file (default: %(default)s)")
    serve.add_argument("--host", help="address to bind (default from config: 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default from config: 8811; 0 picks a free one)")
    serve.add_argument("--workers", type=int, help="model worker processes (default from config: 2)")
    serve.add_argument("--model", help="a GGUF file, or a bundled model: smollm2-135m (the default) or gemma3-270m")
    serve.add_argument("--log-format", choices=("text", "json"), help="log lines as text or JSON (default from config: text)")
    models = commands.add_parser("models", help="list, load or unload the models of a running service")
    models.add_argument("action", nargs="?", choices=("list", "load", "unload"), default="list")
    models.add_argument("name", nargs="?", help="the model to load or unload")
    models.add_argument("--url", default="http://127.0.0.1:8811", help="the service (default: %(default)s); "
                        "EDISON_API_KEY is sent as its key")
    fetch = commands.add_parser("fetch-models", help="assemble the bundled models into the cache directory now")
    fetch.add_argument("--config", default=str(DEFAULT_CONFIG), help="TOML settings file, for model.cache_dir")
    add_haproxy_arguments(commands.add_parser("haproxy-config", help="print an haproxy.cfg for several instances", description=HAPROXY_DESCRIPTION))
    return root


def serve(settings: Settings, notifier: Notifier) -> int:
    from edison.http.app import create_app
    from edison.http.auth import exposure_warning
    from edison.http.metrics import Metrics
    from edison.model import resolve_model_path
    from edison.pool import Models

    paths = {}
    for name, entry in settings.entries().items():
        try:
            paths[name] = str(resolve_model_path(entry.model))
        except (OSError, ValueError) as exc:
            logger.error("Cannot use the model %s: %s", name, exc)
            return 2
        logger.info(
            "Model %s: %s; %d workers x %d threads x %d slots; keep_alive %s",
            name, paths[name], entry.pool.workers, entry.model.resolved_threads(entry.pool.workers), entry.pool.slots,
            "never" if entry.keep_alive_s < 0 else f"{entry.keep_alive_s:g} s",
        )
    warning = exposure_warning(settings.server.host, settings.server.api_key)
    if warning:
        logger.warning(warning)
    pool = Models(settings, paths, Metrics())
    config = uvicorn.Config(
        create_app(settings, pool),
        host=settings.server.host,
        port=settings.server.port,
        log_config=None,
        log_level=settings.server.log_level,
        timeout_graceful_shutdown=settings.pool.cancel_deadline_s + 5,
    )
    server = EdisonServer(config, pool, notifier)
    server.run()
    notifier.close()
    return 0 if server.started else 1


def fetch_models(config: str) -> int:
    """`make setup` runs this, so the first `edison serve` (and a machine that goes offline
    afterwards) finds both bundled models in place."""
    from edison.model import BUNDLED, bundled_path, cache_dir

    try:
        directory = cache_dir(load_settings(config).model)
    except ConfigError as exc:
        print(f"edison: bad configuration: {exc}", file=sys.stderr)
        return 2
    for name in BUNDLED:
        print(f"{name}: {bundled_path(name, directory)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "haproxy-config":
        return haproxy_config(args)
    if args.command == "fetch-models":
        return fetch_models(args.config)
    if args.command == "models":
        from edison.models_cli import run as models_command

        return models_command(args.action, args.name, args.url, os.environ.get("EDISON_API_KEY", ""))
    overrides = {
        "server.host": args.host,
        "server.port": args.port,
        "server.log_format": args.log_format,
        "server.api_key": os.environ.get("EDISON_API_KEY") or None,  # the environment wins over the file
        "pool.workers": args.workers,
        "model.path": args.model,
    }
    try:
        settings = load_settings(args.config, **overrides)
    except ConfigError as exc:
        print(f"edison: bad configuration: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.server.log_level, settings.server.log_format)
    notifier = Notifier.from_environ()  # before any worker is spawned: they must not inherit it
    return serve(settings, notifier)
