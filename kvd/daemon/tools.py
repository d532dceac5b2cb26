"""Tool calling in the chat API: `tools`, `tool_choice`, `parallel_tool_calls`, the calls in
responses and stream chunks, and `role: tool` messages back through the chat template.

    plan = ToolPlan.of(tools, tool_choice, parallel_tool_calls, parser)   # ValueError naming the field
    plan.constraint()            # the grammar that named and "required" choices decode under
    messages, tools = render(messages, tools, template)  # what the chat template is given
    calls = plan.stream()        # per choice: .feed(text) / .finish() -> (content, tool call deltas)

How each `tool_choice` decodes:
- `none`: the tools are rendered (as vLLM does) but the output is plain content.
- named (`{"type": "function", "function": {"name": ...}}`): the output is the function's
  arguments, constrained by its `parameters` schema, so it works with any model; it comes
  back as one call, `finish_reason` "stop" (as OpenAI's).
- `required`: the output is a JSON array of `{"name": ..., "arguments": {...}}`, one item
  schema per tool (at most one item without `parallel_tool_calls`); `finish_reason`
  "tool_calls".
- `auto` (the default with tools): the model chooses; its output is parsed by
  `[http] tool_call_parser`: `hermes` takes `<tool_call>{"name", "arguments"}</tool_call>`
  blocks (Hermes, Qwen), `json` an output that is a bare call object or a list of them.
  Text that does not parse stays content.

A chat template that does not render tools (SmolLM2's does not) gets them from kvd in the
Hermes form instead: a system block listing the functions inside `<tools>` tags and asking
for `<tool_call>` blocks; an assistant turn's `tool_calls` become `<tool_call>` blocks of its
content and a tool's answer a `<tool_response>` block, as Hermes-format models were trained.
Calls stream as they complete (a named choice's arguments as they decode), each with its id,
name and arguments in OpenAI's delta shape.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import msgspec

from kvd.engine.grammar import check_schema
from kvd.sampling import StructuredOutputs

TOOL_CALL_PARSERS = ("hermes", "json")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_OPEN, _CLOSE = "<tool_call>", "</tool_call>"


class FunctionDef(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One entry of `tools`."""

    function: FunctionDef
    type: str = "function"


class FunctionName(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str


class NamedToolChoice(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`tool_choice` naming one function."""

    function: FunctionName
    type: str = "function"


class CallFunction(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One of an assistant message's `tool_calls`, sent back in a later request."""

    function: CallFunction
    id: str | None = None
    type: str = "function"


class ToolPlan:
    """What a chat request's tools mean for its prompt, its grammar and its output."""

    def __init__(self, tools: list[ToolDef], mode: str, name: str | None, parallel: bool, parser: str) -> None:
        self.tools = tools
        self.mode = mode  # none | auto | required | named
        self.name = name  # the named choice's function
        self.parallel = parallel
        self.parser = parser

    @classmethod
    def of(cls, tools: list[ToolDef] | None, choice: str | NamedToolChoice | None, parallel: bool,
           parser: str) -> ToolPlan | None:  # fmt: skip
        """The plan for these fields (None: no tools); ValueError naming the field."""
        tools = tools or []
        for i, tool in enumerate(tools):
            if tool.type != "function":
                raise ValueError(f"tools[{i}].type: expected 'function', got {tool.type!r}")
            if not _NAME.fullmatch(tool.function.name):
                raise ValueError(f"tools[{i}].function.name: 1 to 64 of a-z, A-Z, 0-9, _ and -, got "
                                 f"{tool.function.name!r}")  # fmt: skip
            if tool.function.parameters is not None:
                if tool.function.parameters.get("type", "object") != "object":
                    raise ValueError(f"tools[{i}].function.parameters: must be an object schema")
                check_schema(json.dumps(tool.function.parameters), f"tools[{i}].function.parameters")
        names = [tool.function.name for tool in tools]
        if len(set(names)) != len(names):
            raise ValueError("tools: function names must be unique")
        if isinstance(choice, NamedToolChoice):
            if choice.type != "function":
                raise ValueError(f"tool_choice.type: expected 'function', got {choice.type!r}")
            if choice.function.name not in names:
                raise ValueError(f"tool_choice.function.name: no tool named {choice.function.name!r}")
            return cls(tools, "named", choice.function.name, parallel, parser)
        if choice is None:
            choice = "auto" if tools else "none"
        if choice not in ("none", "auto", "required"):
            raise ValueError(f"tool_choice: expected none, auto, required or a named function, got {choice!r}")
        if choice != "none" and not tools:
            raise ValueError(f"tool_choice: {choice!r} needs tools")
        if choice == "auto" and parser not in TOOL_CALL_PARSERS:
            raise ValueError("tool_choice: 'auto' needs a tool call parser ([http] tool_call_parser)")
        return cls(tools, choice, None, parallel, parser) if tools else None

    def constraint(self) -> StructuredOutputs | None:
        """The grammar a named or required choice decodes under."""
        if self.mode == "named":
            tool = next(t for t in self.tools if t.function.name == self.name)
            return StructuredOutputs(json=json.dumps(_parameters(tool)))
        if self.mode == "required":
            items = [{"type": "object", "required": ["name", "arguments"], "additionalProperties": False,
                      "properties": {"name": {"const": t.function.name}, "arguments": _parameters(t)}}
                     for t in self.tools]  # fmt: skip
            schema = {"type": "array", "items": {"anyOf": items}, "minItems": 1}
            if not self.parallel:
                schema["maxItems"] = 1
            return StructuredOutputs(json=json.dumps(schema))
        return None

    def stream(self) -> ToolStream | None:
        """A choice's parser of its output (None: tool_choice none, plain content)."""
        if self.mode == "none":
            return None
        if self.mode == "named":
            return _NamedStream(self.name)
        fmt = "json" if self.mode == "required" else self.parser
        return ToolStream(fmt, self.parallel or self.mode == "required")

    def finish_reason(self, reason: str | None, made_calls: bool) -> str | None:
        return "tool_calls" if made_calls and reason == "stop" and self.mode != "named" else reason


def render(messages: list[dict[str, Any]], tools: list[ToolDef],
           template: str) -> tuple[list[dict[str, Any]], list | None]:  # fmt: skip
    """The messages and `tools` the chat template is given: as they are where the template
    renders tools, else in the Hermes form (module docstring)."""
    defs = [{"type": "function", "function": msgspec.to_builtins(t.function)} for t in tools] or None
    for d in defs or []:
        d["function"] = {k: v for k, v in d["function"].items() if v is not None}
    if "tools" in template and "tool_calls" in template:
        return messages, defs
    out = [_hermes_turn(m) for m in messages]
    if defs:
        block = _tools_block(defs)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + block}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out, None


def chat_turn(role: str, content: str | None, tool_calls: list[ToolCallIn] | None, tool_call_id: str | None,
              where: str) -> dict[str, Any]:  # fmt: skip
    """One message as the chat template takes it; ValueError naming `where`."""
    turn: dict[str, Any] = {"role": role, "content": content or ""}
    if tool_calls:
        if role != "assistant":
            raise ValueError(f"{where}.tool_calls: only assistant messages make tool calls")
        turn["tool_calls"] = [{"id": c.id or _call_id(), "type": "function",
                               "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                              for c in tool_calls]  # fmt: skip
    elif content is None:
        raise ValueError(f"{where}.content: required")
    if role == "tool":
        if tool_call_id is None:
            raise ValueError(f"{where}.tool_call_id: required for a tool message")
        turn["tool_call_id"] = tool_call_id
    return turn


class ToolStream:
    """One choice's output split into content and tool calls as its text arrives: `feed`
    and `finish` return (content to send, tool call deltas in OpenAI's shape). Whitespace
    is held until text follows it, so the content around calls is not padded."""

    def __init__(self, fmt: str, parallel: bool) -> None:
        self.fmt = fmt  # hermes: <tool_call> blocks; json: a call object or an array of them
        self.parallel = parallel
        self.calls = 0
        self._buf = ""  # text not yet split
        self._inside = False  # hermes: within a <tool_call> block
        self._raw = ""  # json: the whole output, in case it is not calls after all
        self._json: _JsonObjects | None = None
        self._not_calls: list[str] = []  # json: objects that are not calls
        self._space = ""  # whitespace held back

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        self._buf += text
        content, deltas = self._hermes() if self.fmt == "hermes" else self._json_feed()
        return self._settle(content), deltas

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        content, deltas = self._hermes() if self.fmt == "hermes" else self._json_feed()
        rest, self._buf = self._buf, ""
        if self.fmt == "hermes":
            if self._inside:
                unparsed: list[str] = []
                deltas += self._call(rest, _OPEN + rest, unparsed)
                content += "".join(unparsed)
            else:
                content += rest
        elif self._json is not None:
            residue = "".join(self._not_calls) + self._json.residue().strip(" \t\r\n,]")
            content += self._raw if not self.calls else residue
        content = self._settle(content)
        if not self.calls:
            content += self._space  # trailing whitespace of plain content stays
        self._space = ""
        return content, deltas

    def _settle(self, content: str) -> str:
        """Content with whitespace held while nothing but whitespace follows it."""
        content = self._space + content
        body = content.rstrip()
        self._space = content[len(body):]
        if self.calls and not body.strip():
            return ""
        return body

    def _hermes(self) -> tuple[str, list[dict[str, Any]]]:
        content, deltas = [], []
        while True:
            if not self._inside:
                at = self._buf.find(_OPEN)
                if at < 0:
                    keep = _partial_suffix(self._buf, _OPEN)
                    content.append(self._buf[: len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep :]
                    break
                content.append(self._buf[:at])
                self._buf, self._inside = self._buf[at + len(_OPEN) :], True
            else:
                end = self._buf.find(_CLOSE)
                if end < 0:
                    break
                body, self._buf, self._inside = self._buf[:end], self._buf[end + len(_CLOSE) :], False
                deltas += self._call(body, _OPEN + body + _CLOSE, content)
        return "".join(content), deltas

    def _json_feed(self) -> tuple[str, list[dict[str, Any]]]:
        text, self._buf = self._buf, ""
        if self._json is None:
            start = text.lstrip()
            if not start:
                self._buf = text  # not yet known whether it is JSON
                return "", []
            if start[0] not in "[{":
                self.fmt = "hermes"  # plain text: content (a <tool_call> block after it still counts)
                self._buf = text
                return self._hermes()
            self._json = _JsonObjects()
        self._raw += text
        deltas: list[dict[str, Any]] = []
        for obj in self._json.feed(text):
            deltas += self._call(obj, obj, self._not_calls)
        return "", deltas

    def _call(self, body: str, raw: str, content: list[str]) -> list[dict[str, Any]]:
        """The delta of one complete call, or [] with `raw` as content if it is not a call."""
        call = _parse_call(body)
        if call is None:
            content.append(raw)
            return []
        if self.calls and not self.parallel:
            return []  # parallel_tool_calls false: the first call only
        self.calls += 1
        name, arguments = call
        return [{"index": self.calls - 1, "id": _call_id(), "type": "function",
                 "function": {"name": name, "arguments": arguments}}]  # fmt: skip


class _NamedStream(ToolStream):
    """A named choice: the whole output is the function's arguments, streamed as they decode."""

    def __init__(self, name: str) -> None:
        super().__init__("json", False)
        self.name = name

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        if not text and self.calls:
            return "", []
        function = {"arguments": text}
        if not self.calls:
            self.calls = 1
            return "", [{"index": 0, "id": _call_id(), "type": "function", "function": {"name": self.name, **function}}]
        return "", [{"index": 0, "function": function}]

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        return self.feed("") if not self.calls else ("", [])


def merge_calls(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool call deltas as the whole calls of a (non-streamed) message."""
    calls: list[dict[str, Any]] = []
    for delta in deltas:
        if "id" in delta:
            calls.append({"id": delta["id"], "type": "function", "function": dict(delta["function"])})
        else:
            calls[delta["index"]]["function"]["arguments"] += delta["function"]["arguments"]
    return calls


class _JsonObjects:
    """The complete JSON objects of a stream that is one object or an array of them."""

    def __init__(self) -> None:
        self._base = -1  # the depth objects close at: 0 for a bare object, 1 inside an array
        self._depth = 0
        self._in_str = self._escape = False
        self._obj: list[str] = []  # the object being read
        self._rest: list[str] = []  # what follows the last complete object

    def feed(self, text: str) -> list[str]:
        done = []
        for ch in text:
            if self._base < 0 and not ch.isspace():
                self._base = 1 if ch == "[" else 0
            opening = self._depth == self._base and ch == "{" and not self._in_str
            if opening or self._obj:
                self._obj.append(ch)
            else:
                self._rest.append(ch)
            if self._in_str:
                if self._escape:
                    self._escape = False
                elif ch == "\\":
                    self._escape = True
                elif ch == '"':
                    self._in_str = False
            elif ch == '"':
                self._in_str = True
            elif ch in "[{":
                self._depth += 1
            elif ch in "]}":
                self._depth -= 1
                if self._depth == self._base and self._obj:
                    done.append("".join(self._obj))
                    self._obj, self._rest = [], []
        return done

    def residue(self) -> str:
        return "".join(self._rest) + "".join(self._obj)


def _parse_call(body: str) -> tuple[str, str] | None:
    """(name, arguments JSON) of a call object's text, or None."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return obj["name"], json.dumps(args, ensure_ascii=False)


def _parameters(tool: ToolDef) -> dict[str, Any]:
    return tool.function.parameters or {"type": "object", "properties": {}}


def _arguments(text: str) -> Any:
    """A call's arguments as templates take them: the object where the JSON text is one."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


def _hermes_turn(message: dict[str, Any]) -> dict[str, Any]:
    """A message in the Hermes form, for a template that knows nothing of tools."""
    if message.get("tool_calls"):
        blocks = [f"{_OPEN}\n{json.dumps({'name': c['function']['name'], 'arguments': c['function']['arguments']})}"
                  f"\n{_CLOSE}" for c in message["tool_calls"]]  # fmt: skip
        content = "\n".join(filter(None, [message["content"], *blocks]))
        return {"role": message["role"], "content": content}
    if message["role"] == "tool":
        return {"role": "tool", "content": f"<tool_response>\n{message['content']}\n</tool_response>"}
    return message


def _tools_block(defs: list[dict[str, Any]]) -> str:
    listing = "\n".join(json.dumps(d, ensure_ascii=False) for d in defs)
    return ("# Tools\n\nThese functions are available to you. Their signatures are inside <tools></tools> tags:\n"
            f"<tools>\n{listing}\n</tools>\n\n"
            "To call a function, answer with a JSON object holding its name and its arguments inside "
            "<tool_call></tool_call> tags, one block per call:\n"
            '<tool_call>\n{"name": <function name>, "arguments": <the arguments as a JSON object>}\n</tool_call>')


def _partial_suffix(text: str, tag: str) -> int:
    """How many characters at the end of `text` could begin `tag`."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"
