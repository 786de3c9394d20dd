"""A sequence's grammar: built from its job's `Format`, compiled by llama.cpp, sampled cheaply.

The grammar text comes from llama-cpp-python's JSON-schema converter (the Python twin of the one
llama-server uses), with one change: a JSON string may not hold a raw control character (the
converter allows them, and `json.loads` refuses them). Tool calls wrap the union of the tools'
`{"name", "arguments"}` objects in `TOOL_CALL_OPEN ... TOOL_CALL_CLOSE`; with `tool_choice`
"auto" a reply may instead be text that does not start with "<".

Sampling follows llama.cpp's `common_sampler_sample`: the sequence's own chain draws a token
from the unconstrained candidates, the grammar checks only that one token, and only when it is
rejected does the grammar run over the whole vocabulary (262,144 tokens on the bundled model:
that full pass on every token is what made constrained decoding 4x slower, DESIGN.md). The
chain then accepts the token, as `llama_sampler_sample` would have done.

Compilation happens in `Engine.add`, between two steps: it is bounded by the HTTP layer's
schema limits and `MAX_GRAMMAR_CHARS` (measured: a 300 KB grammar compiles in ~80 ms here).
A grammar that does not compile, or that dead-ends, ends its job with `Failed(BAD_FORMAT)`:
llama.cpp throws a C++ exception (fatal through ctypes) when a grammar accepts a token it does
not allow, so every token is checked before it is accepted.
"""

from __future__ import annotations

import ctypes
import json
import re
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp.llama_grammar import json_schema_to_gbnf

from edison.protocol import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, Format

MAX_GRAMMAR_CHARS = 400_000  # ~100 ms to compile on one slow core; the HTTP limits keep far below
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
# The converter's string character, and the same without control characters (JSON's rule).
_CHAR = 'char ::= [^"\\\\] |'
_JSON_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'
_CALL, _TEXT = "edison-tool-call", "edison-free-text"  # rule names of the tool wrapper


class BadFormat(ValueError):
    """The job's format cannot become a grammar, or its grammar reached a dead end."""


def grammar_text(fmt: Format) -> str:
    """The GBNF grammar (root rule `root`) for one job's format."""
    if not fmt.tools:
        return _schema_gbnf(fmt.schema or '{"type": "object"}')
    tools = [t for t in fmt.tools if fmt.tool_choice in ("auto", "required") or t.name == fmt.tool_choice]
    if not tools:
        raise BadFormat(f"tool_choice names {fmt.tool_choice!r}, which is not among the tools")
    calls, defs = [], {}
    for i, tool in enumerate(tools):
        parameters = _hoist_defs(json.loads(tool.parameters), f"tool{i}-", defs)
        calls.append({
            "type": "object",
            "properties": {"name": {"const": tool.name}, "arguments": parameters},
            "required": ["name", "arguments"],
        })
    schema: dict[str, Any] = {"anyOf": calls} if len(calls) > 1 else calls[0]
    if defs:
        schema["$defs"] = defs
    rules = _schema_gbnf(json.dumps(schema))
    if re.search(rf"^({_CALL}|{_TEXT}) ::=", rules, re.MULTILINE):
        raise BadFormat("a property name collides with the tool-call grammar's own rules")
    rules = re.sub(r"^root ::=", f"{_CALL} ::=", rules, count=1, flags=re.MULTILINE)
    call = f'"{TOOL_CALL_OPEN}" {_CALL} "{TOOL_CALL_CLOSE}"'
    if fmt.tool_choice == "auto":
        return f"root ::= {call} | {_TEXT}\n{_TEXT} ::= [^<] .*\n{rules}"
    return f"root ::= {call}\n{rules}"


def _schema_gbnf(schema: str) -> str:
    try:
        text = json_schema_to_gbnf(schema)
    except Exception as exc:  # the converter asserts and raises on what it cannot read
        raise BadFormat(f"the schema cannot be converted to a grammar: {exc}") from None
    return text.replace(_CHAR, _JSON_CHAR)


def _hoist_defs(schema: Any, prefix: str, defs: dict[str, Any]) -> Any:
    """Moves a tool's `$defs` to the combined schema's root, renaming them and their refs."""
    if isinstance(schema, list):
        return [_hoist_defs(item, prefix, defs) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ("$defs", "definitions") and isinstance(value, dict):
            for name, sub in value.items():
                defs[prefix + name] = _hoist_defs(sub, prefix, defs)
        elif key == "$ref" and isinstance(value, str):
            out[key] = "#/$defs/" + prefix + value.rsplit("/", 1)[-1]
        else:
            out[key] = _hoist_defs(value, prefix, defs)
    return out


class Constraint:
    """One sequence's compiled grammar and the candidate buffers its sampling reuses."""

    def __init__(self, vocab: Any, n_vocab: int, text: str) -> None:
        if len(text) > MAX_GRAMMAR_CHARS:
            raise BadFormat(f"the grammar is {len(text)} characters long; the limit is {MAX_GRAMMAR_CHARS}")
        self.vocab, self.n_vocab = vocab, n_vocab
        self.grammar = llama_cpp.llama_sampler_init_grammar(vocab, text.encode("utf-8"), b"root")
        if not self.grammar:
            raise BadFormat("the grammar built from this format does not compile")
        self.data = (llama_cpp.llama_token_data * n_vocab)()
        self.rows = np.frombuffer(self.data, dtype=_TOKEN_DATA)
        self.ids = np.arange(n_vocab, dtype=np.int32)
        self.candidates = llama_cpp.llama_token_data_array(self.data, n_vocab, -1, False)
        self.one = llama_cpp.llama_token_data()
        self.single = llama_cpp.llama_token_data_array(ctypes.pointer(self.one), 1, -1, False)
        self.sampled = self.full_passes = 0  # tokens drawn; grammar passes over the whole vocabulary

    def allows(self, token: int) -> bool:
        """The grammar's verdict on one token, without moving it."""
        self.one.id, self.one.logit, self.one.p = token, 1.0, 0.0
        self.single.size, self.single.selected, self.single.sorted = 1, -1, False
        llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(self.single))
        return self.one.logit != float("-inf")

    def sample(self, chain: Any, ctx: Any, row: int) -> int:
        """Draw with `chain` from row `row`'s logits; the full grammar pass only on a rejection."""
        self.sampled += 1
        token = self._draw(chain, ctx, row, grammar=False)
        if not self.allows(token):
            token = self._draw(chain, ctx, row, grammar=True)
            if not self.allows(token):
                raise BadFormat("the grammar allows no token here")
        llama_cpp.llama_sampler_accept(chain, token)
        if not llama_cpp.llama_vocab_is_eog(self.vocab, token):
            llama_cpp.llama_sampler_accept(self.grammar, token)
        return token

    def replay(self, tokens: list[int]) -> None:
        """Advances the grammar over text already produced (a resumed job's)."""
        for token in tokens:
            if not self.allows(token):
                raise BadFormat("the resumed text does not fit the grammar")
            llama_cpp.llama_sampler_accept(self.grammar, token)

    def _draw(self, chain: Any, ctx: Any, row: int, grammar: bool) -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, row), shape=(self.n_vocab,))
        self.rows["id"] = self.ids
        self.rows["logit"] = logits
        self.rows["p"] = 0.0
        cur = self.candidates  # samplers may move `data` and shrink `size`: reset both
        cur.data = ctypes.cast(self.data, llama_cpp.llama_token_data_p)
        cur.size, cur.selected, cur.sorted = self.n_vocab, -1, False
        if grammar:
            self.full_passes += 1
            llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(cur))
        llama_cpp.llama_sampler_apply(chain, ctypes.byref(cur))
        if cur.selected < 0:
            raise BadFormat("the sampler selected no token")
        return int(cur.data[cur.selected].id)

    def free(self) -> None:
        if self.grammar:
            llama_cpp.llama_sampler_free(self.grammar)
            self.grammar = None
