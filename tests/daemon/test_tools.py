"""Tool calling through a real `kvd serve` with the openai SDK: named and required choices
decode under their tools' schemas (arguments validate with jsonschema), auto parses the
model's `<tool_call>` blocks, calls stream as OpenAI's deltas, tool answers go back through
the template, bad tool fields are a 400 naming the field; and the parser on its own, fed the
same text in chunks of every size."""

from __future__ import annotations

import json
import urllib.request

import jsonschema
import openai
import pytest

from kvd.daemon.tools import FunctionDef, ToolDef, ToolStream, merge_calls, render

MODEL = "SmolLM2-135M-Instruct"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                            "unit": {"enum": ["celsius", "fahrenheit"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "unit", "days"], "additionalProperties": False}  # fmt: skip
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "pattern": "^[A-Z][a-z]+/[A-Z][a-z]+$"}},
        "required": ["timezone"], "additionalProperties": False}  # fmt: skip
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The forecast for a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "The time in a timezone",
                                           "parameters": TIME}}]  # fmt: skip
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris this week, and what time is it there?"}]


def _valid(call) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_named_choice_gives_arguments_that_fit_the_schema(sdk):
    r = sdk.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, n=8, max_tokens=80, temperature=1.0,
                                    seed=4, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    for c in r.choices:
        assert c.finish_reason == "stop" and c.message.content is None, c
        (call,) = c.message.tool_calls
        assert call.function.name == "get_weather"
        _valid(call)


def test_required_choice_calls_one_or_more_tools(sdk):
    r = sdk.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", n=6,
                                    max_tokens=160, temperature=1.0, seed=8)  # fmt: skip
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and c.message.tool_calls, c
        assert len({call.id for call in c.message.tool_calls}) == len(c.message.tool_calls)
        for call in c.message.tool_calls:
            _valid(call)
    r = sdk.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", n=4,
                                    max_tokens=160, temperature=1.0, seed=9, parallel_tool_calls=False)  # fmt: skip
    assert all(c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1 for c in r.choices), r.choices


def test_streamed_calls_add_up_to_the_whole_response(sdk):
    named = {"type": "function", "function": {"name": "get_time"}}
    for choice in (named, "required"):
        args = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=120, temperature=0.0)
        whole = sdk.chat.completions.create(**args).choices[0]
        calls: dict[int, dict] = {}
        finish = None
        for chunk in sdk.chat.completions.create(**args, stream=True):
            for c in chunk.choices:
                finish = c.finish_reason or finish
                assert not c.delta.content
                for d in c.delta.tool_calls or []:
                    if d.id is not None:  # a call's first delta: its id and name
                        assert d.index not in calls and d.function.name
                        calls[d.index] = {"name": d.function.name, "arguments": d.function.arguments or ""}
                    else:
                        calls[d.index]["arguments"] += d.function.arguments
        assert finish == whole.finish_reason
        assert [(c.function.name, c.function.arguments) for c in whole.message.tool_calls] == \
            [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)]  # fmt: skip


def test_auto_parses_tool_call_blocks_and_leaves_plain_text_as_content(sdk):
    # The model picks freely under auto; a grammar makes it write a call, so the parse is what is tested.
    block = '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}\n</tool_call>'
    grammar = f'root ::= "Checking. " {json.dumps(block)}'
    args = dict(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=60, temperature=0.0,
                extra_body={"structured_outputs": {"grammar": grammar}})  # fmt: skip
    c = sdk.chat.completions.create(**args).choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content == "Checking."
    (call,) = c.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_time", {"timezone": "Europe/Paris"})
    content, names = "", []
    for chunk in sdk.chat.completions.create(**args, stream=True):
        for ch in chunk.choices:
            content += ch.delta.content or ""
            names += [d.function.name for d in ch.delta.tool_calls or []]
    assert content == "Checking." and names == ["get_time"]
    # No call in the output: all of it is content; tool_choice none never parses.
    for choice in ("auto", "none"):
        c = sdk.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=12,
                                        temperature=0.0, extra_body={"structured_outputs": {"choice": ["Sunny."]}})
        assert (c.choices[0].message.content, c.choices[0].message.tool_calls) == ("Sunny.", None)
        assert c.choices[0].finish_reason == "stop"


def test_a_tool_answer_goes_back_through_the_template(sdk, served):
    turn = [*ASK, {"role": "assistant", "content": None,
                   "tool_calls": [{"id": "call_1", "type": "function",
                                   "function": {"name": "get_time", "arguments": '{"timezone": "Europe/Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "14:05"}]  # fmt: skip
    r = sdk.chat.completions.create(model=MODEL, messages=turn, tools=TOOLS, max_tokens=8, temperature=0.0)
    plain = sdk.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=8, temperature=0.0)
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens + 20  # the call and the answer are in the prompt
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # /tokenize renders the same prompt.
    req = urllib.request.Request(served.url + "/tokenize", json.dumps({"messages": turn, "tools": TOOLS}).encode(),
                                 {"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert json.load(resp)["count"] == r.usage.prompt_tokens


def test_the_hermes_form_for_a_template_without_tools(smollm2_dir):
    from transformers import AutoTokenizer

    from kvd.engine.text import TextStage

    text = TextStage(AutoTokenizer.from_pretrained(smollm2_dir))
    call = {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": {"timezone": "X"}}}
    messages = [{"role": "user", "content": "time?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": "14:05", "tool_call_id": "c1"}]  # fmt: skip
    tools = [ToolDef(FunctionDef("get_time", "The time", TIME))]
    shown, defs = render(messages, tools, text.tokenizer.chat_template)
    prompt = text.tokenizer.decode(text.chat_ids(shown, tools=defs))
    assert defs is None  # SmolLM2's template knows nothing of tools: kvd writes them in
    assert prompt.startswith("<|im_start|>system\n# Tools") and '"name": "get_time"' in prompt
    assert '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "X"}}\n</tool_call>' in prompt
    assert "<|im_start|>tool\n<tool_response>\n14:05\n</tool_response><|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice.function.name"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
         "tools[0].function.parameters"),
        ({"tools": TOOLS * 2}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
            "x": json.loads('{"type": "array", "items": ' * 80 + '{"type": "string"}' + "}" * 80)}}}}],
          "tool_choice": "required"}, "tools[0].function.parameters"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
        ({"messages": [{"role": "tool", "content": "14:05"}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": []}, {"role": "user"}]}, "messages[1].content"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": [{"type": "function", "function": {
            "name": "f", "arguments": "{}"}}]}]}, "messages[0].tool_calls"),
    ],
)  # fmt: skip
def test_bad_tool_fields_are_a_400_naming_the_field(sdk, extra, param):
    body = {"model": MODEL, "messages": ASK, "max_tokens": 4, **extra}
    with pytest.raises(openai.BadRequestError) as e:
        sdk.chat.completions.create(**body)
    assert e.value.body["param"] == param, e.value.body


# ---- the parser on its own ---------------------------------------------------------------
def _split(stream: ToolStream, text: str, size: int) -> tuple[str, list[tuple[str, dict]]]:
    content, deltas = "", []
    for at in range(0, len(text), size):
        c, d = stream.feed(text[at : at + size])
        content, deltas = content + c, deltas + d
    c, d = stream.finish()
    calls = merge_calls(deltas + d)
    return content + c, [(call["function"]["name"], json.loads(call["function"]["arguments"])) for call in calls]


HERMES = ('Let me look.\n<tool_call>\n{"name": "get_time", "arguments": {"timezone": "A/B"}}\n</tool_call>\n'
          '<tool_call>{"name": "f", "arguments": "{\\"s\\": \\"</tool_call>\\"}"}</tool_call>\n')  # fmt: skip
ARRAY = '[{"name": "a", "arguments": {"s": "x\\"}]{"}}, {"name": "b", "arguments": {}}]'


@pytest.mark.parametrize("size", [1, 2, 3, 5, 11, 1000])
def test_the_parser_gives_the_same_calls_in_chunks_of_any_size(size):
    # The second block's arguments hold "</tool_call>" inside a JSON string: a tag inside
    # a string ends the block early, so that block stays content, whole.
    content, calls = _split(ToolStream("hermes", True), HERMES, size)
    assert calls == [("get_time", {"timezone": "A/B"})]
    assert content.startswith("Let me look.") and content.endswith('"}"}</tool_call>')
    assert _split(ToolStream("json", True), ARRAY, size) == ("", [("a", {"s": 'x"}]{'}), ("b", {})])
    assert _split(ToolStream("json", True), ' {"name": "a", "parameters": {"q": 1}}', size) == ("", [("a", {"q": 1})])


def test_what_is_not_a_call_stays_content():
    for text in ("Hello <tool_cal, not a tag\n", "<tool_call>{oops}</tool_call>"):
        assert _split(ToolStream("hermes", True), text, 4) == (text, [])
    assert _split(ToolStream("json", True), '{"x": 1}', 3) == ('{"x": 1}', [])
    assert _split(ToolStream("json", True), '[{"name": "a", "argu', 3) == ('[{"name": "a", "argu', [])
    # An unterminated last block that parses is still a call (max_tokens ran out at the tag).
    assert _split(ToolStream("hermes", True), '<tool_call>{"name": "a", "arguments": {}}', 3) == ("", [("a", {})])
    # parallel_tool_calls false: the first call only.
    two = '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": {}}</tool_call>'
    assert _split(ToolStream("hermes", False), two, 7) == ("", [("a", {})])
