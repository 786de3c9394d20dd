"""`edison haproxy-config`: the HAProxy configuration for several Edison instances.

Renders deploy/haproxy/haproxy.cfg.template with the proxy's address and the instances'.
What the configuration does, line by line, is in the template's comments; how to run it is
docs/multi-box.md. Standard library only: this runs on the proxy box, which needs no model
and no web framework.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent.parent / "deploy" / "haproxy" / "haproxy.cfg.template"
PLACEHOLDER = re.compile(r"\{\{ (\w+) \}\}")


class BadOption(ValueError):
    """A command-line value that would make a broken haproxy.cfg; the message names it."""


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str, what: str, any_host: bool = False) -> Address:
    """HOST:PORT, or [IPV6]:PORT; with `any_host`, :PORT too (every address, for --bind).
    HAProxy would accept more; a typo should fail here, not there."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not (host or any_host) or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadOption(f"{what} {text!r} is not HOST:PORT (port 1-65535)")
    if re.search(r"[\s#'\"\\{}]", host):
        raise BadOption(f"{what} {text!r} has a character that has no place in a host name")
    return Address(host, int(port))


@dataclass(frozen=True)
class ProxyConfig:
    bind: Address
    backends: tuple[Address, ...]
    stats: Address = Address("127.0.0.1", 8404)
    socket: str = "/run/haproxy/admin.sock"  # where Debian's package keeps its runtime API
    user: str = "haproxy"  # the unprivileged user it drops to after binding; "" keeps the caller's


def render(config: ProxyConfig, template: Path = TEMPLATE) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]*", config.user):
        raise BadOption(f"--user {config.user!r} is not a user name")
    if not config.socket.startswith("/") or re.search(r"\s", config.socket):
        raise BadOption(f"--socket {config.socket!r} is not an absolute path without spaces")
    if not config.backends:
        raise BadOption("at least one Edison instance is needed")
    if len(set(config.backends)) != len(config.backends):
        raise BadOption("an Edison instance is listed twice")
    servers = "\n".join(
        f"    server edison{i} {backend}" for i, backend in enumerate(config.backends, start=1)
    )
    user = f"    user {config.user}\n    group {config.user}\n" if config.user else ""
    values = {
        "count": str(len(config.backends)),
        "bind": str(config.bind),
        "stats": str(config.stats),
        "socket": config.socket,
        "user_lines": user,
        "server_lines": servers,
    }
    text = template.read_text()
    missing = set(PLACEHOLDER.findall(text)) - values.keys()
    if missing:  # a template edited out of step with this module
        raise KeyError(f"the template has no value for {sorted(missing)}")
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


DESCRIPTION = (
    "Prints a complete, commented haproxy.cfg that balances over the given Edison instances "
    "and routes each POST /chat/cancel to the instance that runs the request."
)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--bind", required=True, metavar="HOST:PORT", help="where the proxy listens for clients")
    parser.add_argument("backends", nargs="+", metavar="BACKEND_HOST:PORT", help="the Edison instances")
    parser.add_argument("--stats", default="127.0.0.1:8404", metavar="HOST:PORT", help="the stats page (default: %(default)s)")
    parser.add_argument("--socket", default="/run/haproxy/admin.sock", help="the runtime API socket (default: %(default)s)")
    parser.add_argument("--user", default="haproxy", help="user and group to drop to after binding; '' to stay (default: %(default)s)")
    return parser


def main(args: argparse.Namespace) -> int:
    try:
        config = ProxyConfig(
            bind=parse_address(args.bind, "--bind", any_host=True),
            backends=tuple(parse_address(b, "backend") for b in args.backends),
            stats=parse_address(args.stats, "--stats"),
            socket=args.socket,
            user=args.user,
        )
        sys.stdout.write(render(config))
    except BadOption as exc:
        print(f"edison haproxy-config: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # `python3 -m edison.haproxy ...` on a proxy box with no venv
    sys.exit(main(add_arguments(argparse.ArgumentParser(prog="edison haproxy-config", description=DESCRIPTION)).parse_args()))
