"""`--log-format json`: every line the service process writes is one JSON object with ts, level,
pid and msg, and every line about a request carries its request id as `request_id`."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from tests.support import COUNTING, Service, Stream, chat

pytestmark = pytest.mark.timeout(120)


def test_json_log_lines_carry_the_request_id(make_service: Callable[..., Service]) -> None:
    svc = make_service({"pool": {"workers": 1}}, extra_args=("--log-format", "json"))
    completed = chat(svc.url, "What is the capital of France?")[0].data["request_id"]
    stream = Stream(svc.url, {"message": COUNTING, "mode": "long"})
    stream.wait_for("token", count=2)
    svc.cancel(stream.request_id)
    assert stream.done.data["stopped"] is True
    main_pid = svc.proc.pid

    lines = [json.loads(line) for line in svc.log().splitlines() if line.startswith("{")]
    assert f"[edison pid {main_pid}]" not in svc.log()  # no text-format line from the service process
    assert lines and all({"ts", "level", "pid", "logger", "msg"} <= line.keys() for line in lines)
    assert {line["pid"] for line in lines} == {main_pid}
    assert any(line["logger"] == "uvicorn.access" for line in lines)
    for request_id in (completed, stream.request_id):
        about = [line for line in lines if request_id in line["msg"]]
        assert len(about) >= 2, about  # "Streaming request ..." and "Request ... runs on worker ..."
        assert all(line.get("request_id") == request_id for line in about), about
    stopped = [line for line in lines if line["msg"].startswith(f"Request {stream.request_id} stopped by worker")]
    assert stopped and stopped[0]["level"] == "info"
    assert not [line for line in lines if "request_id" in line and line["request_id"] not in line["msg"]]
