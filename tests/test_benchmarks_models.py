"""`python -m benchmarks.models` runs end to end on a tiny plan: Edison and llama-server's router
both load each bundled model on demand and switch between them under a limit of one, a cancel
during a load ends the request, every unload leaves no model process behind, and both models
answer at once under a limit of two. Not a performance test: nothing here asserts a latency
(the machine is shared)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import llama_server

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(900)
def test_models_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    if not llama_server.binary_path().exists():
        pytest.skip("llama-server is not built: python -m benchmarks.llama_server (10-15 min)")
    out = tmp_path / "models.json"
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.models", "--trials", "1", "--switches", "2", "--cancels", "2", "--together", "1",
         "--systems", "edison,llama-server", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=800,
    )
    assert run.returncode == 0, f"stdout:\n{run.stdout[-4000:]}\nstderr:\n{run.stderr[-4000:]}"
    results = json.loads(out.read_text())
    assert results["errors"] == []

    asked = results["cold"] + results["switch"]
    assert {(r["system"], r["model"]) for r in asked} == {
        (s, m) for s in ("edison", "llama-server router") for m in ("smollm2-135m", "gemma3-270m")}
    assert all(r["ok"] and r["first_token_s"] > 0 for r in asked), asked
    for row in results["switch"]:  # the limit of one loaded model holds after every switch
        assert [m for m, state in row["states"].items() if state != "unloaded"] == [row["model"]], row
        assert len(row["model_processes"]) == 1, row

    stops = [r for r in results["cancel"] if r["trial"] != "after"]
    assert all(r["ok"] for r in results["cancel"] if r["trial"] == "after")  # each service still answers
    assert {r["how"] for r in stops if r["system"] == "edison"} == {"cancel", "disconnect"}
    for row in stops:
        if row["how"] == "cancel":
            assert row["done"]["stopped"] is True, row
        if row["system"] == "edison":  # a load that no request waits for is abandoned
            assert row["state_after"] == "unloaded" or row["at_cancel"]["state"] == "ready", row

    together = results["together"]  # each model alone, then both at once, on both systems
    assert {(r["system"], r["model"], r["together"]) for r in together} == {
        (s, m, t) for s in ("edison", "llama-server router") for m in ("smollm2-135m", "gemma3-270m") for t in (False, True)}
    assert all(r["ok"] and r["tokens"] > 1 for r in together), together

    for row in results["memory"]:
        assert all(s.get("model_processes_gone", True) for s in row["samples"]), row
