"""What every system is asked to do: the same prompts, the same sampling, the same stops.

Every prompt starts with a random nonce so that no system can reuse a cached prompt prefix
from the previous trial (Edison and llama-cpp-python both keep one).
"""

from __future__ import annotations

import random

from edison.worker.prompt import TRANSCRIPT_STOPS, render_transcript

# Greedy, so every system computes the same tokens; the other knobs are Edison's defaults.
SAMPLING = {"temperature": 0.0, "top_p": 0.95, "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.0, "seed": 1}
STOPS = list(TRANSCRIPT_STOPS)

# Reply lengths a benchmark may ask for; Edison gets one mode per length (it takes no max_tokens).
REPLY_LENGTHS = (2048, 128, 32, 16, 1)  # 1: a prefill timed to the end of its reply
LONG_REPLY = 2048

# The bundled base model counts for as long as it is allowed: a reliable long decode.
COUNTING = "Count from 1 to 1000, separated by commas: 1, 2, 3, 4,"

PREFILL_TOKENS = 6000


def long_text(tokens: int = PREFILL_TOKENS) -> str:
    """About `tokens` tokens of varied text (~1.38 tokens per word with the bundled model)."""
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()
    n = int(tokens / 1.38)
    return " ".join(f"{words[i % len(words)]}{i % 97}" if i % 5 == 0 else words[i % len(words)] for i in range(n))


def nonce(rng: random.Random) -> str:
    return f"[{rng.getrandbits(32):08x}]"


def counting(rng: random.Random) -> str:
    return f"{nonce(rng)} {COUNTING}"


def long_message(rng: random.Random, tokens: int = PREFILL_TOKENS) -> str:
    return f"{nonce(rng)} Summarise this text.\n\n{long_text(tokens)}"


def conversation_opening(rng: random.Random, tokens: int) -> str:
    """A chat's first message: about `tokens` tokens of text, distinct per chat (its nonce comes
    first), ending in a counting request so that the base model's reply runs to its budget."""
    return f"{nonce(rng)} Here is a text.\n\n{long_text(tokens)}\n\n{COUNTING}"


def follow_up(turn: int) -> str:
    """A returning turn's short new message (~25 tokens): counting on, for the same reason."""
    start = 100 * turn
    return f"Now count on from {start}, separated by commas: {start}, {start + 1}, {start + 2},"


def transcript(message: str) -> str:
    """The exact prompt text Edison renders for this message with the bundled model (no chat
    template, no system prompt in the benchmark modes); the baselines get the same text."""
    return render_transcript([{"role": "user", "content": message}])
