"""The optional API key on a real service: every route but /health and the page's own files
needs `Authorization: Bearer <key>`; a refusal is 401 JSON (OpenAI's shape under /v1/);
EDISON_API_KEY wins over the config file. And the warning for a wide bind without a key."""

from __future__ import annotations

import socket
from collections.abc import Callable

import httpx
import pytest

from edison.http.auth import exposure_warning
from edison.settings import REPO_ROOT, ConfigError, settings_from_dict
from tests.support import Service, parse_sse

pytestmark = pytest.mark.timeout(120)

MakeService = Callable[..., Service]
KEY = "correct horse battery staple"
WEB = REPO_ROOT / "web"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat_with(svc: Service, headers: dict[str, str]) -> list:
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{svc.url}/chat/stream", json={"message": "Hi", "mode": "brief"}, headers=headers) as r:
            assert r.status_code == 200, r.read()
            return list(parse_sse(r.iter_lines()))


def raw_get(port: int, target: str) -> int:
    """The status of a GET sent byte for byte (httpx would normalise a `..` away)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        return int(sock.recv(100).split()[1])


def test_api_key_guards_every_route_but_health_and_the_page(make_service: MakeService) -> None:
    svc = make_service({"server": {"api_key": KEY}})
    url = svc.url
    assert httpx.get(f"{url}/health").status_code == 200

    missing = httpx.post(f"{url}/chat/stream", json={"message": "Hi"})
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.json() == {"error": "missing API key: send the header 'Authorization: Bearer <key>'"}
    wrong = httpx.post(f"{url}/chat/stream", json={"message": "Hi"}, headers=bearer(KEY + "x"))
    assert wrong.status_code == 401 and wrong.json() == {"error": "invalid API key"}
    basic = httpx.get(f"{url}/modes", auth=("user", KEY))
    assert basic.status_code == 401
    for method, path in (("POST", "/chat/cancel"), ("GET", "/modes"), ("GET", "/metrics"), ("GET", "/nope.js")):
        assert httpx.request(method, f"{url}{path}", json={}).status_code == 401, path
    v1 = httpx.get(f"{url}/v1/models")
    assert v1.status_code == 401
    assert v1.json() == {"error": {"message": "missing API key: send the header 'Authorization: Bearer <key>'",
                                   "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
    assert raw_get(svc.port, "/..%2fconfig.toml") == 401  # outside web/: not a public file

    assert chat_with(svc, bearer(KEY))[-1].data["ok"] is True
    assert chat_with(svc, {"Authorization": f"bearer {KEY}"})[-1].data["ok"] is True  # the scheme is case-insensitive
    assert httpx.get(f"{url}/modes", headers=bearer(KEY)).status_code == 200
    assert httpx.get(f"{url}/metrics", headers=bearer(KEY)).status_code == 200
    assert httpx.get(f"{url}/v1/models", headers=bearer(KEY)).status_code == 200
    cancel = httpx.post(f"{url}/chat/cancel", json={"request_id": "x"}, headers=bearer(KEY))
    assert cancel.json() == {"status": "not_found", "request_id": "x"}
    assert "Refused POST /chat/stream from 127.0.0.1: invalid API key" in svc.log()
    assert KEY not in svc.log()

    if not (WEB / "index.html").is_file():
        pytest.skip("no web/index.html in this checkout: the page's public files are not checked")
    assert httpx.get(f"{url}/").status_code == 200
    assert httpx.get(f"{url}/index.html").status_code == 200
    for asset in (p for p in WEB.rglob("*") if p.is_file()):
        assert httpx.get(f"{url}/{asset.relative_to(WEB).as_posix()}").status_code == 200, asset


def test_environment_key_wins_over_the_config_file(make_service: MakeService, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDISON_API_KEY", "from-the-environment")
    svc = make_service({"server": {"api_key": "from-the-file"}})
    assert httpx.get(f"{svc.url}/modes", headers=bearer("from-the-file")).status_code == 401
    assert httpx.get(f"{svc.url}/modes", headers=bearer("from-the-environment")).status_code == 200


def test_no_key_is_a_warning_only_beyond_loopback() -> None:
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert exposure_warning(host, "") is None, host
    for host in ("0.0.0.0", "::", "192.168.1.10", "edison.lan", ""):
        assert "without an API key" in (exposure_warning(host, "") or ""), host
    assert exposure_warning("0.0.0.0", KEY) is None


def test_api_key_and_log_format_settings_are_checked_and_the_key_never_printed() -> None:
    settings = settings_from_dict({"server": {"api_key": KEY, "log_format": "json"}})
    assert settings.server.api_key == KEY and KEY not in repr(settings)
    with pytest.raises(ConfigError, match=r"server.log_format: 'xml' is not valid; expected text or json"):
        settings_from_dict({"server": {"log_format": "xml"}})
    with pytest.raises(ConfigError, match=r"^server.api_key: the value is not valid; expected a key without leading"):
        settings_from_dict({"server": {"api_key": " padded "}})
