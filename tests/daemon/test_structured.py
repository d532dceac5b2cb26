"""Structured outputs through a real `kvd serve` with the openai SDK, the ZeroMQ client and
the offline engine: sampled (T = 1.0) outputs under a JSON schema all validate with
jsonschema; regex and choice outputs match; bad schemas and grammars are a 400 naming
the field; preemption (recompute and swap) and prefix-cache hits keep the grammar right."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from kvd import LLM, SamplingParams
from kvd.client import Client, KvdError
from kvd.sampling import StructuredOutputs

MODEL = "SmolLM2-135M-Instruct"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,12}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                      "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "member", "address", "tags"],
    "additionalProperties": False,
}  # fmt: skip
ASK = [{"role": "user", "content": "Describe a customer as JSON."}]


def test_fifty_sampled_outputs_fit_a_nested_schema(sdk):
    r = sdk.chat.completions.create(model=MODEL, messages=ASK, n=50, max_tokens=150, temperature=1.0, seed=3,
                                    response_format={"type": "json_schema",
                                                     "json_schema": {"name": "customer", "schema": SCHEMA}})  # fmt: skip
    assert len(r.choices) == 50
    for c in r.choices:
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.message.content), SCHEMA)


def test_json_object_regex_and_choice(sdk, served):
    r = sdk.chat.completions.create(model=MODEL, messages=ASK, n=5, max_tokens=200, temperature=0.7, seed=1,
                                    response_format={"type": "json_object"})  # fmt: skip
    done = [c for c in r.choices if c.finish_reason == "stop"]  # any JSON object may run past max_tokens
    assert len(done) >= 3 and all(isinstance(json.loads(c.message.content), dict) for c in done)
    phone = r"\d{3}-\d{3}-\d{4}"
    r = sdk.completions.create(model=MODEL, prompt="Call me at", n=5, max_tokens=20, temperature=1.0,
                               extra_body={"structured_outputs": {"regex": phone}})  # fmt: skip
    assert all(re.fullmatch(phone, c.text) for c in r.choices), [c.text for c in r.choices]
    r = sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Is fire hot?"}], n=5,
                                    max_tokens=5, temperature=1.0,
                                    extra_body={"structured_outputs": {"choice": ["yes", "no"]}})  # fmt: skip
    assert all(c.message.content in ("yes", "no") for c in r.choices)
    # Streamed, the chunks add up to the constrained text.
    stream = sdk.completions.create(model=MODEL, prompt="Call me at", max_tokens=20, temperature=1.0, stream=True,
                                    extra_body={"structured_outputs": {"regex": phone}})  # fmt: skip
    assert re.fullmatch(phone, "".join(c.choices[0].text for c in stream if c.choices))
    # The ZeroMQ client: the same field of SamplingParams.
    with Client(served.endpoint, timeout=120) as c:
        out = c.generate(prompt="Call me at", max_tokens=20, temperature=1.0,
                         structured_outputs={"regex": phone})  # fmt: skip
        assert re.fullmatch(phone, out.text) and out.finish_reason == "stop"
        with pytest.raises(KvdError) as e:
            c.generate(prompt="x", structured_outputs={"regex": "(["})
        assert e.value.code == 400 and e.value.message.startswith("structured_outputs.regex")


def _deep(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.mark.parametrize("extra, field", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
     "structured_outputs.json"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"structured_outputs": {"grammar": "root ::= "}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"json": _deep(100)}}, "structured_outputs.json"),
    ({"structured_outputs": {"json": {"type": "object"}}, "response_format": {"type": "json_object"}},
     "structured_outputs"),
])  # fmt: skip
def test_bad_schemas_and_grammars_are_a_400_naming_the_field(sdk, served, extra, field):
    with pytest.raises(openai.BadRequestError) as e:
        sdk.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, extra_body=extra)
    body = e.value.body
    assert body["param"] == field and "Traceback" not in body["message"], body
    with Client(served.endpoint, timeout=30) as c:  # the daemon goes on serving
        assert c.generate(prompt="hi", max_tokens=2).finish_reason == "length"


@pytest.mark.parametrize("preempt", ["recompute", "swap"])
def test_preemption_and_prefix_hits_keep_the_grammar(smollm2_dir, preempt):
    llm = LLM(str(smollm2_dir), dtype="float32", num_blocks=40, block_size=16, preempt=preempt,
              swap_space_gb=0.1, max_num_seqs=16)  # fmt: skip
    prompt = llm.apply_chat_template(ASK)
    params = SamplingParams(max_tokens=150, temperature=1.0, seed=9,
                            structured_outputs=StructuredOutputs(json=json.dumps(SCHEMA)))  # fmt: skip
    outs = llm.generate([prompt] * 12, params)  # the same prompt: prefix hits after the first
    assert llm.engine.scheduler.num_preemptions > 0
    for o in outs:
        assert o.finish_reason == "stop" and o.num_cached_tokens > 0 or o is outs[0]
        jsonschema.validate(json.loads(o.text), SCHEMA)
    llm.check_integrity()


def test_an_abort_while_the_grammar_compiles_ends_the_request(served):
    """A ZeroMQ Abort that arrives before the request's grammar has compiled (the record
    does not exist yet) still ends it, with "abort", once it is queued."""
    import asyncio
    import uuid

    from harness import log_events
    from kvd.client import AsyncClient

    salt = uuid.uuid4().hex[:8]  # a schema no earlier compile cached
    schema = {"type": "object", "properties": {f"field_{salt}_{i}": {"type": "string"} for i in range(80)},
              "required": [f"field_{salt}_{i}" for i in range(80)]}  # fmt: skip

    async def go():
        async with AsyncClient(served.endpoint, timeout=60) as c:
            chunks = []

            async def read():
                async for chunk in c.stream(prompt="Describe a customer as JSON.", max_tokens=800, temperature=1.0,
                                            request_id="abort-compiling",
                                            structured_outputs={"json": json.dumps(schema)}):  # fmt: skip
                    chunks.append(chunk)

            task = asyncio.ensure_future(read())
            await asyncio.sleep(0.005)  # the Generate frame is out; its grammar takes longer than this
            await c.abort("abort-compiling")
            await asyncio.wait_for(task, 60)
            return chunks

    chunks = asyncio.run(go())
    assert chunks[-1].finish_reason == "abort" and sum(len(c.token_ids) for c in chunks) < 50
    assert [e["request_id"] for e in log_events(served.log_file, "abort_deferred")] == ["abort-compiling"]
