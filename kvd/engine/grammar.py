"""Structured outputs: xgrammar grammars compiled from `StructuredOutputs`, and a matcher
per request that says which tokens may come next.

    grammars = Grammars(tokenizer, vocab_size)       # once per tokenizer; xgrammar caches compiles
    compiled = grammars.compile(spec)                # ValueError naming the field (run it off the step loop)
    matcher = grammars.matcher(compiled)             # one per request record (request.grammar)
    bitmask = grammars.bitmask(rows)                 # a reused int32 tensor, a row per constrained request
    matcher.fill_next_token_bitmask(bitmask, row)    # the allowed next tokens, one bit each
    matcher.accept_token(token); matcher.is_terminated()

Compiling runs in xgrammar's C++ with the GIL released, so the daemon compiles in a
thread while the step loop goes on (`Serving.admit`). The engine keeps the matchers and
fills each constrained row's bitmask when it schedules a step; the worker's sampler masks
the logits with it; the engine advances the matcher with each accepted token and a
grammar that reaches its end finishes the request ("stop"). xgrammar is imported on first
use (about 2 s), never by a daemon that serves no structured output.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading

import msgspec

from kvd.sampling import StructuredOutputs

MAX_COMPILE_S = 10.0  # a grammar that takes longer is refused (400), as unreasonable for a request
MAX_SCHEMA_DEPTH = 64
MAX_SEEN = 4096  # specs remembered as compiled (past it the memory starts again)  # JSON nesting of a schema (objects and arrays), its keywords' included


class Grammars:
    """The xgrammar compiler for one tokenizer (and its cache of compiled grammars)."""

    def __init__(self, tokenizer, vocab_size: int, max_threads: int = 1) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the model's (its logits' width), which may exceed the tokenizer's
        self.max_threads = max_threads
        self._compiler = None
        self._lock = threading.Lock()
        self._bitmask = None
        self._seen: set[bytes] = set()  # the specs compiled so far (xgrammar caches their grammars)

    def _xgr(self):
        import xgrammar

        return xgrammar

    @property
    def compiler(self):
        with self._lock:  # the first compile builds it; others wait for it
            if self._compiler is None:
                xgr = self._xgr()
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size)
                self._compiler = xgr.GrammarCompiler(info, max_threads=self.max_threads)
            return self._compiler

    def compile(self, spec: StructuredOutputs):
        """The compiled grammar (cached by xgrammar); ValueError naming the field."""
        compiler = self.compiler
        try:
            if spec.json is not None:
                compiled = compiler.compile_json_schema(check_schema(spec.json))
            elif spec.json_object:  # any object (OpenAI's json_object: not an array or a bare value)
                compiled = compiler.compile_json_schema('{"type": "object"}', strict_mode=False)
            elif spec.regex is not None:
                compiled = compiler.compile_regex(spec.regex)
            elif spec.choice is not None:
                compiled = compiler.compile_grammar(_choice_ebnf(spec.choice))
            else:
                compiled = compiler.compile_grammar(spec.grammar)
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - xgrammar's errors (RuntimeError, its own) become the field's
            field = next(n for n in ("json", "regex", "choice", "grammar") if getattr(spec, n) is not None)
            raise ValueError(f"structured_outputs.{field}: {_first_line(e)}") from None
        if len(self._seen) >= MAX_SEEN:
            self._seen.clear()
        self._seen.add(msgspec.json.encode(spec))
        return compiled

    def matcher(self, compiled):
        return self._xgr().GrammarMatcher(compiled)

    def bitmask(self, rows: int):
        """An int32 bitmask of `rows` rows (vocab_size bits each), from one tensor kept for
        every step: a matcher's fill writes its whole row. (A fresh `torch.full` a step was
        most of the daemon's cost under structured outputs, waking torch's threads on the
        worker's cores; docs/benchmarks.md, "Structured outputs".)"""
        if self._bitmask is None or self._bitmask.shape[0] < rows:
            self._bitmask = self._xgr().allocate_token_bitmask(max(rows, 64), self.vocab_size)
        return self._bitmask[:rows]

    def compiled(self, spec: StructuredOutputs) -> bool:
        """Whether this spec compiled before (so compiling it again is a cache hit)."""
        return msgspec.json.encode(spec) in self._seen


async def compile_off_loop(grammars: Grammars, spec: StructuredOutputs) -> None:
    """Compile in a thread (xgrammar releases the GIL), within MAX_COMPILE_S; ValueError
    naming the field. The compiled grammar lands in the compiler's cache; a spec that
    compiled before is a cache hit, about 20 µs, and skips the thread's hop (15 to 20 ms
    that put a constrained request behind plain ones sent with it)."""
    if grammars.compiled(spec):
        return
    try:
        await asyncio.wait_for(asyncio.to_thread(grammars.compile, spec), MAX_COMPILE_S)
    except TimeoutError:
        raise ValueError(f"structured_outputs: did not compile within {MAX_COMPILE_S} s") from None


def check_schema(schema: str, field: str = "structured_outputs.json") -> str:
    """The schema, checked: JSON, an object, nested at most MAX_SCHEMA_DEPTH deep (a deeper
    one would take seconds to compile, or exhaust the compiler's stack); ValueError naming
    `field`."""
    try:
        parsed = json.loads(schema)
    except (json.JSONDecodeError, RecursionError) as e:
        detail = f"not JSON: {e}" if isinstance(e, json.JSONDecodeError) else "nested too deep"
        raise ValueError(f"{field}: {detail}") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"{field}: a JSON schema is an object")
    stack = [(parsed, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise ValueError(f"{field}: nested deeper than {MAX_SCHEMA_DEPTH} levels")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack += [(child, depth + 1) for child in children if isinstance(child, (dict, list))]
    return schema


def _choice_ebnf(choices: list[str]) -> str:
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


def _first_line(e: Exception) -> str:
    """xgrammar's message without its log prefix ("[hh:mm:ss] /path/file.cc:123: ")."""
    text = (str(e).strip() or type(e).__name__).splitlines()[0]
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", text)[:300]
