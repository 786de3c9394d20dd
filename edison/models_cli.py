"""`edison models [list|load NAME|unload NAME]`: the models of a running service, over its HTTP API.

A thin client of `GET /models` and `POST /models/load|unload` (http/models.py), with the
standard library only, so it works from any shell on the box.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from typing import Any


def call(url: str, method: str, path: str, key: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url.rstrip("/") + path, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=900) as response:  # a load can take minutes
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read())
        except ValueError:
            return exc.code, {"error": exc.reason}


def table(listing: dict[str, Any]) -> str:
    rows = [("MODEL", "STATE", "REQUESTS", "RSS MIB", "ESTIMATE MIB", "KEEP ALIVE", "FILE")]
    for m in listing["models"]:
        keep = "never" if m["keep_alive_s"] < 0 else f"{m['keep_alive_s']:g} s"
        name = m["name"] + (" (default)" if m["default"] else "")
        rows.append((name, m["state"], str(m["requests"]), str(m["rss_bytes"] >> 20), str(m["estimate_mib"]), keep, m["file"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    limit = listing["limit"]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.append(f"limit: {limit['models'] or 'no limit on'} loaded models, {limit['mib'] or 'no limit on'} MiB")
    return "\n".join(lines)


def run(action: str, name: str | None, url: str, key: str) -> int:
    if action != "list" and not name:
        print(f"edison models {action}: name the model", file=sys.stderr)
        return 2
    try:
        if action == "list":
            status, body = call(url, "GET", "/models", key)
        else:
            status, body = call(url, "POST", f"/models/{action}", key, {"model": name})
    except OSError as exc:
        print(f"edison models: cannot reach {url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"edison models {action}: HTTP {status}: {body.get('error', body)}", file=sys.stderr)
        return 1
    if action == "list":
        print(table(body))
    else:
        time = f" in {body['load_time_s']:.2f} s" if action == "load" and body.get("load_time_s") else ""
        print(f"{body['name']}: {body['state']}{time}")
    return 0
