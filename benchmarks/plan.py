"""How much of each benchmark a run does: `FULL` (the default, about 45 minutes on 2 cores, and
an estimated 25 more for the conversations section, mostly prefill: Edison reads a returning
chat again once more chats than its 4 slots take turns, llama-cpp-python's server every time)
and `QUICK` (a small subset of everything, about 5 minutes)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    name: str
    decode_trials: int  # per system and per way of stopping (cancel, disconnect)
    decode_tokens: tuple[int, int]  # the stop comes after a uniform random number of streamed tokens in this range
    prefill_trials: int  # Edison, cancel
    prefill_disconnect_trials: int  # Edison, disconnect
    prefill_delay_s: tuple[float, float]  # the stop comes at a uniform random moment in this range after the send
    # The baselines cannot stop a prefill, so each trial lasts until it ends: a few trials only.
    # With `baseline_full_run`, the first one per baseline and way waits for the whole prefill
    # (up to `full_cap_s`); the others give up `baseline_cap_s` after the stop ("≥ cap") and
    # restart the server, which is what a user of such a server would have to do.
    baseline_prefill_trials: int
    baseline_full_run: bool
    baseline_cap_s: float
    full_cap_s: float
    # A disconnect during a prefill, then at once a short request: how long it waits. Baselines
    # that finish the abandoned prefill first make each trial last that long (up to the cap).
    recovery_trials: int  # Edison
    baseline_recovery_trials: int
    recovery_cap_s: float
    wedge_trials: int  # per kind (SIGSTOP, stuck in a native call)
    throughput_runs: int  # per system: one decode run (a reply of `throughput_tokens`) each
    throughput_tokens: int
    prefill_runs: int  # per system: a fresh prompt of `prefill_tokens` and a one-token reply
    prefill_tokens: int
    memory_workers: tuple[int, ...]  # Edison started afresh with each; 1 worker is the head-to-head one
    load_trials: int
    load_workers: int = 2
    load_queue: int = 4
    # Concurrency (benchmarks/concurrency.py): c clients at once, each a greedy reply of
    # `concurrency_tokens` through /v1/completions, every system once per level per round.
    concurrency_levels: tuple[int, ...] = (1, 2, 4, 8)
    concurrency_rounds: int = 3
    concurrency_tokens: int = 128
    # One sequence of a full worker stopped while the others decode: per phase (prefill, decode).
    slot_stop_trials: int = 20  # by POST /chat/cancel
    slot_disconnect_trials: int = 10
    slot_stop_prompt_tokens: int = 4000  # the prompt stopped in its prefill
    slot_stop_delay_s: tuple[float, float] = (0.5, 4.0)  # the prefill stop, after the send
    slot_stop_tokens: tuple[int, int] = (2, 24)  # the decode stop, after this many of its tokens
    memory_slots: tuple[int, ...] = (3, 4)  # one worker started with each; every slot made busy in turn
    # Conversations (benchmarks/conversations.py): N chats of `conversation_turns` turns each through
    # /v1/chat/completions, interleaved across chats, at most `conversation_in_flight` at once.
    conversation_counts: tuple[int, ...] = (4, 8, 16)  # N; one run per N per system
    conversation_turns: int = 3
    conversation_opening_tokens: int = 2000  # each chat's first message, distinct per chat
    conversation_in_flight: int = 4  # the shipped worker's slots (and llama-server -np 4's)
    conversation_reply_tokens: int = 64
    conversation_decode_tokens: int = 128  # the last chats' extra turn, sent together: the decode phase
    conversation_long_tokens: int = 6000  # the first message of the kill and restart trials (Edison only)
    conversation_fault_trials: int = 3  # per kind: worker SIGKILL, service restart


FULL = Plan(
    name="full",
    decode_trials=30,
    decode_tokens=(2, 24),
    prefill_trials=30,
    prefill_disconnect_trials=20,
    prefill_delay_s=(0.3, 10.0),
    baseline_prefill_trials=3,
    baseline_full_run=True,
    baseline_cap_s=15.0,
    full_cap_s=300.0,
    recovery_trials=10,
    baseline_recovery_trials=3,
    recovery_cap_s=60.0,
    wedge_trials=10,
    throughput_runs=5,
    throughput_tokens=128,
    prefill_runs=3,
    prefill_tokens=6000,
    memory_workers=(2, 4),
    load_trials=15,
)

QUICK = Plan(
    name="quick",
    decode_trials=2,
    decode_tokens=(2, 6),
    prefill_trials=2,
    prefill_disconnect_trials=2,
    prefill_delay_s=(0.3, 1.5),
    baseline_prefill_trials=1,
    baseline_full_run=False,
    baseline_cap_s=2.0,
    full_cap_s=2.0,
    recovery_trials=1,
    baseline_recovery_trials=1,
    recovery_cap_s=3.0,
    wedge_trials=1,
    throughput_runs=1,
    throughput_tokens=16,
    prefill_runs=1,
    prefill_tokens=1000,
    memory_workers=(),
    load_trials=1,
    concurrency_rounds=1,
    concurrency_tokens=16,
    slot_stop_trials=1,
    slot_disconnect_trials=1,
    slot_stop_prompt_tokens=1500,
    slot_stop_delay_s=(0.3, 1.0),
    slot_stop_tokens=(2, 6),
    conversation_counts=(2,),
    conversation_turns=2,
    conversation_opening_tokens=300,
    conversation_reply_tokens=16,
    conversation_decode_tokens=16,
    conversation_long_tokens=800,
    conversation_fault_trials=1,
)
