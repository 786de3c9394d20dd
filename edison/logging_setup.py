"""Log output of the service process: human-readable text, or one JSON object per line.

JSON (`--log-format json`, `[server] log_format = "json"`) is for journald and Loki: each line
has `ts`, `level`, `pid`, `logger` and `msg`, plus `request_id` when the line is about a request
and `exc` with the traceback when there is one. The house style already passes a request id
as an argument of every log call about a request ("Request %s ..."); the formatter lifts the
first UUID-shaped argument into `request_id`, and a call can also pass
`extra={"request_id": ...}`. Nothing parses message text.

Worker processes keep their own plain-text lines (model load errors, faulthandler stack dumps
before a kill, llama.cpp's native output): those are not Python log records of this process.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from datetime import datetime, timezone

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "pid": record.process,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or request_id_arg(record)
        if request_id:
            line["request_id"] = request_id
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def request_id_arg(record: logging.LogRecord) -> str | None:
    args = record.args if isinstance(record.args, tuple) else ()
    return next((a for a in args if isinstance(a, str) and len(a) == 36 and UUID.fullmatch(a)), None)


def configure_logging(level: str, log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [edison pid {os.getpid()}] %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
