"""The Gemini API `generateContent` format to and from the pivot (docs/reference.md#translation).

Requests are read in camelCase or snake_case (the REST API takes both, and the
`google-genai` SDK sends a mix of the two) and written in camelCase. What a
Gemini request holds that the pivot cannot carry raises `Unsupported` naming
the field: safety settings, cached content, thinking, speech, built-in tools
(Google Search, code execution, ...), more than one candidate, and parts other
than text, images, function calls and function responses.

Gemini matches a function response to its call by name; the pivot by id. A
call without an id gets `call_<n>` (in order, or `call_<responseId>_<n>` in an
answer, so ids stay unique over a conversation), and a response without one
takes the id of the earliest unanswered call of that name in the model turn
before it. Going to Gemini, a tool message's function name is looked up from
the assistant tool call it answers.

The pivot's `user` (an end-user id) is not sent to Gemini, which has no such
field: it changes nothing in the answer, so it is ignored rather than refused.
A function call the upstream cut off at the token limit (`finish_reason:
"length"`) whose arguments are not complete JSON goes out with `args: {}` and
`finishReason: "MAX_TOKENS"`.
"""

from __future__ import annotations

import json
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson

from sidecar.formats.gemini import RPC_NAMES, rpc_status
from sidecar.translate.base import Event, Pivot, Unsupported, pivot_error_type

__all__ = [
    "FromPivot",
    "ToPivot",
    "error_from_pivot",
    "error_to_pivot",
    "request_from_pivot",
    "request_to_pivot",
    "response_from_pivot",
    "response_to_pivot",
]

_REQUEST_KEYS = frozenset(
    {"contents", "systemInstruction", "tools", "toolConfig", "generationConfig", "model"}
)
_PART_KINDS = ("text", "inlineData", "fileData", "functionCall", "functionResponse")
#: Opaque to every other model, and not part of the answer: read and not carried.
_IGNORED_PART_KEYS = frozenset({"thoughtSignature"})
_SCHEMA_KEYS = frozenset(
    {
        "type", "format", "title", "description", "nullable", "enum", "maxItems",
        "minItems", "properties", "required", "minProperties", "maxProperties",
        "minLength", "maxLength", "pattern", "example", "anyOf", "propertyOrdering",
        "default", "items", "minimum", "maximum",
    }
)  # fmt: skip
_SCHEMA_INT_KEYS = frozenset(
    {"maxItems", "minItems", "minProperties", "maxProperties", "minLength", "maxLength"}
)
_GENERATION_SIMPLE = {
    "temperature": "temperature",
    "topP": "top_p",
    "topK": "top_k",
    "maxOutputTokens": "max_tokens",
    "presencePenalty": "presence_penalty",
    "frequencyPenalty": "frequency_penalty",
    "seed": "seed",
}
_PIVOT_SIMPLE = {
    "temperature": "temperature",
    "top_p": "topP",
    "top_k": "topK",
    "presence_penalty": "presencePenalty",
    "frequency_penalty": "frequencyPenalty",
    "seed": "seed",
}
_PIVOT_KEYS = frozenset(
    {
        *_PIVOT_SIMPLE, "messages", "model", "stream", "stream_options", "tools",
        "tool_choice", "parallel_tool_calls", "stop", "max_tokens",
        "max_completion_tokens", "n", "response_format", "logprobs", "user",
    }
)  # fmt: skip
_IMAGE_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
}
_DATA_URL = re.compile(r"data:([^;,]+);base64,(.*)", re.DOTALL)
#: Files uploaded to the Gemini Files API are readable with a Gemini key only.
_GEMINI_FILES_HOST = "generativelanguage.googleapis.com"
#: Google's documented stand-in for a thought signature on a function call
#: that Gemini 3 did not make itself (a conversation begun on another model).
_SKIP_SIGNATURE = "skip_thought_signature_validator"
_GEMINI_MAJOR = re.compile(r"(?:models/)?gemini-(\d+)")

_FILTERED = frozenset(
    {
        "SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII",
        "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION",
    }
)  # fmt: skip
_FINISH_FROM_PIVOT = {
    "stop": "STOP",
    "tool_calls": "STOP",
    "function_call": "STOP",
    "length": "MAX_TOKENS",
    "content_filter": "SAFETY",
}

_MAX_ERROR_TEXT = 1000
#: Levels of a Gemini `Schema` read (each is a Python call): deeper is refused.
_MAX_SCHEMA_DEPTH = 64
#: A streamed answer's function calls are held until its end: at most this many,
_MAX_CALLS = 128
#: and this many bytes of arguments over all of them.
_MAX_ARGUMENT_BYTES = 16 * 1024 * 1024
#: Where the calls of deltas without an `index` are numbered from (`FromPivot._unindexed`):
#: past any index an upstream would send.
_UNINDEXED = 1 << 40
_TOO_DEEP = "nested too deeply"


# --- shared helpers ---------------------------------------------------------------


def _camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(word[:1].upper() + word[1:] for word in rest)


def _at(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _fields(obj: Any, path: str, allowed: frozenset[str] | set[str]) -> dict[str, Any]:
    """A Gemini object's keys in camelCase, nulls left out; a key not `allowed` is refused.

    Only structural objects go through here: user data (function arguments,
    responses, property names of a schema) keeps its keys as they are.
    """
    if not isinstance(obj, dict):
        raise Unsupported(path or "body", "expected a JSON object")
    fields: dict[str, Any] = {}
    for key, value in obj.items():
        if value is None:
            continue
        name = _camel(str(key))
        if name not in allowed:
            raise Unsupported(_at(path, name))
        fields[name] = value
    return fields


def _list(value: Any, path: str) -> list[Any]:
    if not isinstance(value, list):
        raise Unsupported(path, "expected a list")
    return value


def _text(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise Unsupported(path, "expected a string")
    return value


def _number(value: Any) -> Any:
    """`3.0` as `3`: the SDK sends integer settings such as `topK` as floats."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _dumps(value: Any, path: str) -> str:
    """`value` as JSON text; nesting deeper than Python's recursion limit is refused."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except RecursionError:
        raise Unsupported(path, _TOO_DEEP) from None


def _loads(text: str) -> Any:
    """JSON text as a value, or None when it is not JSON (or nested too deeply to read).

    The standard parser reads integers wider than 64 bits exactly, as orjson does not.
    """
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _call_arguments(args: Any, path: str) -> str:
    return _dumps(args if args is not None else {}, path)


def _args_object(arguments: Any, path: str, cut: bool = False) -> dict[str, Any]:
    """A tool call's JSON `arguments` as the object Gemini's `functionCall.args` must be.

    `cut`: the answer stopped at the token limit, so arguments that are not a
    JSON object are the unfinished ones: `{}` rather than a refusal.
    """
    if isinstance(arguments, dict):
        return arguments
    if arguments is None or arguments == "":
        return {}
    value = _loads(arguments) if isinstance(arguments, str) else None
    if isinstance(value, dict):
        return value
    if cut:
        return {}
    raise Unsupported(path, "function arguments must be a JSON object")


def _response_object(text: str) -> dict[str, Any]:
    """A tool result as `functionResponse.response`: a JSON object as it is, else `{"result": text}`."""
    value = _loads(text)
    return value if isinstance(value, dict) else {"result": text}


def _response_text(response: Any, path: str) -> str:
    if isinstance(response, dict) and set(response) == {"result"}:
        result = response["result"]
        if isinstance(result, str):
            return result
    return _dumps(response, path)


def _shown(value: Any) -> str:
    """A value from a request or answer, for a message: scalars as they are, else the type.

    (The `str`/`repr` of a deeply nested value raises RecursionError.)
    """
    if value is None or isinstance(value, (str, int, float, bool)):
        return repr(value)
    return f"a JSON {'list' if isinstance(value, list) else 'object'}"


def _upper(value: Any, path: str) -> str:
    """An enum value (Gemini takes any case) in upper case."""
    return _text(value, path).upper()


def _pivot_text(content: Any, path: str) -> str:
    """Pivot content (a string or text parts) as one string."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(_list(content, path)):
        ppath = f"{path}[{j}]"
        if not isinstance(part, dict) or part.get("type") != "text":
            raise Unsupported(f"{ppath}.type", "only text parts are carried here")
        _only_pivot(part, {"type", "text"}, ppath)
        texts.append(_text(part.get("text"), f"{ppath}.text"))
    return "".join(texts)


def _only_pivot(obj: dict[str, Any], allowed: set[str], path: str) -> None:
    for key, value in obj.items():
        if value is not None and key not in allowed:
            raise Unsupported(_at(path, key))


def _safe_id(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "", value)


# --- requests: Gemini -> pivot ----------------------------------------------------


class _CallIds:
    """Ids for function calls, and which call each function response answers."""

    def __init__(self, prefix: str = "call_") -> None:
        self._prefix = prefix
        self._count = 0
        self._pending: dict[str, deque[str]] = {}
        self._known: set[str] = set()

    def new_turn(self) -> None:
        self._pending = {}

    def call(self, name: str, given: Any) -> str:
        if isinstance(given, str) and given:
            call_id = given
        else:
            call_id = f"{self._prefix}{self._count}"
            self._count += 1
        self._pending.setdefault(name, deque()).append(call_id)
        self._known.add(call_id)
        return call_id

    def answer(self, name: str, given: Any, path: str) -> str:
        pending = self._pending.get(name)
        if isinstance(given, str) and given in self._known:
            if pending and given in pending:
                pending.remove(given)
            return given
        if pending:
            return pending.popleft()
        if isinstance(given, str) and given:
            return given
        raise Unsupported(path, f"no earlier functionCall named {name!r} to answer")


def request_to_pivot(body: dict[str, Any]) -> Pivot:
    """A Gemini `generateContent` body as a pivot request (`model`/`stream` come from the URL)."""
    fields = _fields(body, "", _REQUEST_KEYS)
    pivot: Pivot = {}
    if "model" in fields:
        pivot["model"] = _text(fields["model"], "model").removeprefix("models/")
    messages = _system_to_pivot(fields.get("systemInstruction"))
    messages.extend(_contents_to_pivot(fields.get("contents", [])))
    pivot["messages"] = messages
    declared: list[str] = []
    if "tools" in fields:
        pivot["tools"] = _tools_to_pivot(fields["tools"])
        declared = [tool["function"]["name"] for tool in pivot["tools"]]
    if "toolConfig" in fields:
        choice = _tool_config_to_pivot(fields["toolConfig"], declared)
        if choice is not None:
            pivot["tool_choice"] = choice
    if "generationConfig" in fields:
        pivot.update(_generation_to_pivot(fields["generationConfig"]))
    return pivot


def _system_to_pivot(instruction: Any) -> list[Pivot]:
    if instruction is None:
        return []
    if isinstance(instruction, str):
        return [{"role": "system", "content": instruction}] if instruction else []
    fields = _fields(instruction, "systemInstruction", {"role", "parts"})
    texts = []
    for j, part in enumerate(_list(fields.get("parts", []), "systemInstruction.parts")):
        path = f"systemInstruction.parts[{j}]"
        kind, value = _part(part, path)
        if kind != "text":
            raise Unsupported(f"{path}.{kind}", "a system instruction carries text only")
        texts.append(_text(value, f"{path}.text"))
    if not texts:
        return []
    if len(texts) == 1:
        return [{"role": "system", "content": texts[0]}]
    return [{"role": "system", "content": [{"type": "text", "text": t} for t in texts]}]


def _part(part: Any, path: str) -> tuple[str, Any]:
    """The one kind of data a part holds, and its value."""
    fields = _fields(part, path, {*_PART_KINDS, *_IGNORED_PART_KEYS, "thought"})
    if fields.pop("thought", False):
        raise Unsupported(f"{path}.thought", "thought parts are not carried")
    kinds = [key for key in fields if key in _PART_KINDS]
    if len(kinds) != 1:
        raise Unsupported(path, "a part holds exactly one of " + ", ".join(_PART_KINDS))
    return kinds[0], fields[kinds[0]]


def _contents_to_pivot(contents: Any) -> list[Pivot]:
    ids = _CallIds()
    messages: list[Pivot] = []
    for i, content in enumerate(_list(contents, "contents")):
        path = f"contents[{i}]"
        fields = _fields(content, path, {"role", "parts"})
        parts = _list(fields.get("parts", []), f"{path}.parts")
        role = fields.get("role", "user")
        if role == "model":
            ids.new_turn()
            messages.append(_model_turn(parts, path, ids))
        elif role in ("user", "function"):
            messages.extend(_user_turn(parts, path, ids))
        else:
            raise Unsupported(f"{path}.role", "expected user or model")
    return messages


def _model_turn(parts: list[Any], path: str, ids: _CallIds) -> Pivot:
    texts: list[str] = []
    calls: list[Pivot] = []
    for j, part in enumerate(parts):
        ppath = f"{path}.parts[{j}]"
        kind, value = _part(part, ppath)
        if kind == "text":
            texts.append(_text(value, f"{ppath}.text"))
        elif kind == "functionCall":
            calls.append(_call_to_pivot(value, f"{ppath}.functionCall", ids))
        else:
            raise Unsupported(f"{ppath}.{kind}", "a model turn carries text and function calls")
    # The pivot's assistant message has content, tool calls or both.
    content = "".join(texts) if texts or not calls else None
    message: Pivot = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    return message


def _call_to_pivot(call: Any, path: str, ids: _CallIds) -> Pivot:
    fields = _fields(call, path, {"name", "args", "id"})
    name = _text(fields.get("name"), f"{path}.name")
    args = fields.get("args", {})
    if not isinstance(args, dict):
        raise Unsupported(f"{path}.args", "expected a JSON object")
    return {
        "id": ids.call(name, fields.get("id")),
        "type": "function",
        "function": {"name": name, "arguments": _call_arguments(args, f"{path}.args")},
    }


def _user_turn(parts: list[Any], path: str, ids: _CallIds) -> list[Pivot]:
    results: list[Pivot] = []
    content: list[Pivot] = []
    for j, part in enumerate(parts):
        ppath = f"{path}.parts[{j}]"
        kind, value = _part(part, ppath)
        if kind == "text":
            content.append({"type": "text", "text": _text(value, f"{ppath}.text")})
        elif kind == "inlineData":
            content.append(_inline_to_pivot(value, f"{ppath}.inlineData"))
        elif kind == "fileData":
            content.append(_file_to_pivot(value, f"{ppath}.fileData"))
        elif kind == "functionResponse":
            results.append(_result_to_pivot(value, f"{ppath}.functionResponse", ids))
        else:
            raise Unsupported(f"{ppath}.{kind}", "a function call belongs to a model turn")
    if len(content) == 1 and content[0]["type"] == "text":
        return [*results, {"role": "user", "content": content[0]["text"]}]
    if content:
        return [*results, {"role": "user", "content": content}]
    return results


def _inline_to_pivot(blob: Any, path: str) -> Pivot:
    fields = _fields(blob, path, {"mimeType", "data"})
    mime = _text(fields.get("mimeType"), f"{path}.mimeType")
    if not mime.startswith("image/"):
        raise Unsupported(f"{path}.mimeType", f"only images are carried, not {mime}")
    # The SDK sends URL-safe base64; a data: URL wants the standard alphabet.
    data = _text(fields.get("data"), f"{path}.data").replace("-", "+").replace("_", "/")
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}


def _file_to_pivot(file: Any, path: str) -> Pivot:
    fields = _fields(file, path, {"mimeType", "fileUri", "displayName"})
    uri = _text(fields.get("fileUri"), f"{path}.fileUri")
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or parts.hostname == _GEMINI_FILES_HOST:
        raise Unsupported(f"{path}.fileUri", "only public http(s) image URLs are carried")
    mime = fields.get("mimeType") or _IMAGE_TYPES.get(_extension(uri), "")
    if not isinstance(mime, str) or not mime.startswith("image/"):
        raise Unsupported(f"{path}.mimeType", "only images are carried")
    return {"type": "image_url", "image_url": {"url": uri}}


def _result_to_pivot(result: Any, path: str, ids: _CallIds) -> Pivot:
    fields = _fields(result, path, {"name", "response", "id"})
    name = _text(fields.get("name"), f"{path}.name")
    call_id = ids.answer(name, fields.get("id"), f"{path}.name")
    return {
        "role": "tool",
        "tool_call_id": call_id,
        "content": _response_text(fields.get("response", {}), f"{path}.response"),
    }


def _tools_to_pivot(tools: Any) -> list[Pivot]:
    out: list[Pivot] = []
    for i, tool in enumerate(_list(tools, "tools")):
        path = f"tools[{i}]"
        fields = _fields(tool, path, {"functionDeclarations"})
        for j, decl in enumerate(
            _list(fields.get("functionDeclarations", []), f"{path}.functionDeclarations")
        ):
            out.append(_declaration_to_pivot(decl, f"{path}.functionDeclarations[{j}]"))
    return out


def _declaration_to_pivot(decl: Any, path: str) -> Pivot:
    # `response`/`responseJsonSchema` describe what the function returns: the SDK
    # derives them from a Python return annotation, and no other format has them.
    fields = _fields(
        decl,
        path,
        {"name", "description", "parameters", "parametersJsonSchema", "response",
         "responseJsonSchema"},
    )  # fmt: skip
    function: Pivot = {"name": _text(fields.get("name"), f"{path}.name")}
    if "description" in fields:
        function["description"] = _text(fields["description"], f"{path}.description")
    if "parameters" in fields and "parametersJsonSchema" in fields:
        raise Unsupported(f"{path}.parameters", "give parameters or parametersJsonSchema, not both")
    if "parametersJsonSchema" in fields:
        function["parameters"] = fields["parametersJsonSchema"]
    elif "parameters" in fields:
        function["parameters"] = _schema_to_json(fields["parameters"], f"{path}.parameters")
    return {"type": "function", "function": function}


def _schema_to_json(schema: Any, path: str, depth: int = 0) -> dict[str, Any]:
    """A Gemini `Schema` (an OpenAPI subset, upper-case types) as JSON Schema."""
    if depth >= _MAX_SCHEMA_DEPTH:
        raise Unsupported(path, f"{_TOO_DEEP} (more than {_MAX_SCHEMA_DEPTH} levels)")
    fields = _fields(schema, path, _SCHEMA_KEYS)
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if key == "type":
            kind = _text(value, f"{path}.type").lower()
            if kind != "type_unspecified":
                out["type"] = kind
        elif key == "properties":
            if not isinstance(value, dict):
                raise Unsupported(f"{path}.properties", "expected a JSON object")
            out["properties"] = {
                name: _schema_to_json(sub, f"{path}.properties.{name}", depth + 1)
                for name, sub in value.items()
            }
        elif key == "items":
            out["items"] = _schema_to_json(value, f"{path}.items", depth + 1)
        elif key == "anyOf":
            out["anyOf"] = [
                _schema_to_json(sub, f"{path}.anyOf[{k}]", depth + 1)
                for k, sub in enumerate(_list(value, f"{path}.anyOf"))
            ]
        elif key in _SCHEMA_INT_KEYS:
            out[key] = _schema_int(value, f"{path}.{key}")
        elif key == "example":
            out["examples"] = [value]
        elif key == "format" and value == "enum":
            continue
        elif key not in ("nullable", "propertyOrdering"):
            out[key] = value
    order = fields.get("propertyOrdering")
    if order is not None and (
        not isinstance(order, list) or not all(isinstance(name, str) for name in order)
    ):
        raise Unsupported(f"{path}.propertyOrdering", "expected a list of property names")
    if order is not None and "properties" in out:
        props = out["properties"]
        ranked = [name for name in order if name in props]
        ranked += [name for name in props if name not in ranked]
        out["properties"] = {name: props[name] for name in ranked}
    if fields.get("nullable") is True:
        if isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
        elif "anyOf" in out:
            out["anyOf"].append({"type": "null"})
    return out


def _schema_int(value: Any, path: str) -> int:
    """Gemini's int64 schema limits, which proto JSON may write as strings."""
    try:
        return int(value)
    except (TypeError, ValueError):
        raise Unsupported(path, "expected an integer") from None


def _tool_config_to_pivot(config: Any, declared: list[str]) -> Any:
    fields = _fields(config, "toolConfig", {"functionCallingConfig"})
    if "functionCallingConfig" not in fields:
        return None
    path = "toolConfig.functionCallingConfig"
    calling = _fields(fields["functionCallingConfig"], path, {"mode", "allowedFunctionNames"})
    mode = _upper(calling.get("mode", "AUTO"), f"{path}.mode")
    names = [
        _text(name, f"{path}.allowedFunctionNames[{k}]")
        for k, name in enumerate(
            _list(calling.get("allowedFunctionNames", []), f"{path}.allowedFunctionNames")
        )
    ]
    if mode in ("AUTO", "NONE", "MODE_UNSPECIFIED"):
        if names:
            raise Unsupported(f"{path}.allowedFunctionNames", "only carried with mode ANY")
        return "none" if mode == "NONE" else "auto"
    if mode != "ANY":
        raise Unsupported(f"{path}.mode", f"{mode} is not carried")
    if not names or set(names) == set(declared):
        return "required"
    if len(names) == 1:
        return {"type": "function", "function": {"name": names[0]}}
    raise Unsupported(
        f"{path}.allowedFunctionNames", "several names that are not all the declared functions"
    )


def _generation_to_pivot(config: Any) -> Pivot:
    allowed = {
        *_GENERATION_SIMPLE, "stopSequences", "candidateCount", "responseMimeType",
        "responseSchema", "responseJsonSchema", "responseModalities",
    }  # fmt: skip
    fields = _fields(config, "generationConfig", allowed)
    pivot: Pivot = {
        pkey: _number(fields[gkey]) for gkey, pkey in _GENERATION_SIMPLE.items() if gkey in fields
    }
    if "stopSequences" in fields:
        pivot["stop"] = _list(fields["stopSequences"], "generationConfig.stopSequences")
    if _number(fields.get("candidateCount", 1)) != 1:
        raise Unsupported("generationConfig.candidateCount", "only one candidate is carried")
    modalities = _list(
        fields.get("responseModalities", ["TEXT"]), "generationConfig.responseModalities"
    )
    path = "generationConfig.responseModalities"
    if [_upper(m, f"{path}[{k}]") for k, m in enumerate(modalities)] != ["TEXT"]:
        raise Unsupported("generationConfig.responseModalities", "only TEXT is carried")
    response_format = _response_format_to_pivot(fields)
    if response_format is not None:
        pivot["response_format"] = response_format
    return pivot


def _response_format_to_pivot(fields: dict[str, Any]) -> Pivot | None:
    if "responseSchema" in fields and "responseJsonSchema" in fields:
        raise Unsupported("generationConfig.responseSchema", "give one schema, not two")
    schema = fields.get("responseJsonSchema")
    if "responseSchema" in fields:
        schema = _schema_to_json(fields["responseSchema"], "generationConfig.responseSchema")
    mime = fields.get("responseMimeType", "text/plain")
    if schema is not None:
        if mime != "application/json":
            raise Unsupported(
                "generationConfig.responseMimeType", "a schema needs application/json"
            )
        return {"type": "json_schema", "json_schema": {"name": "response", "schema": schema}}
    if mime == "application/json":
        return {"type": "json_object"}
    if mime != "text/plain":
        raise Unsupported("generationConfig.responseMimeType", f"{_shown(mime)} is not carried")
    return None


# --- requests: pivot -> Gemini ----------------------------------------------------


def request_from_pivot(pivot: Pivot, model: str, stream: bool) -> dict[str, Any]:
    """A pivot request as a Gemini body for `model` (streaming changes only the URL)."""
    for key, value in pivot.items():
        if value is not None and key not in _PIVOT_KEYS:
            raise Unsupported(key)
    # `user` (an end-user id) changes nothing in the answer and Gemini has no such
    # field: ignored, like Anthropic's `cache_control` (docs/reference.md#translation).
    if pivot.get("n") not in (None, 1):
        raise Unsupported("n", "Gemini answers with one candidate here")
    if pivot.get("logprobs"):
        raise Unsupported("logprobs")
    if pivot.get("parallel_tool_calls") is False:
        raise Unsupported("parallel_tool_calls", "Gemini cannot be held to one call at a time")
    system, contents = _messages_from_pivot(pivot.get("messages"), model)
    body: dict[str, Any] = {"contents": contents}
    if system:
        body["systemInstruction"] = {"parts": system}
    if pivot.get("tools") is not None:
        body["tools"] = [{"functionDeclarations": _tools_from_pivot(pivot["tools"])}]
    if pivot.get("tool_choice") is not None:
        body["toolConfig"] = {
            "functionCallingConfig": _tool_choice_from_pivot(pivot["tool_choice"])
        }
    generation = _generation_from_pivot(pivot)
    if generation:
        body["generationConfig"] = generation
    return body


def _messages_from_pivot(messages: Any, model: str) -> tuple[list[Pivot], list[Pivot]]:
    system: list[Pivot] = []
    contents: list[Pivot] = []
    names: dict[str, str] = {}
    started = False
    results: list[Pivot] | None = None  # the parts of the tool-results turn being built
    signed = _needs_signature(model)
    for i, message in enumerate(_list(messages, "messages")):
        path = f"messages[{i}]"
        if not isinstance(message, dict):
            raise Unsupported(path, "expected a JSON object")
        role = message.get("role")
        if role in ("system", "developer"):
            if started:
                raise Unsupported(path, "a system message after the conversation started")
            _only_pivot(message, {"role", "content"}, path)
            text = _pivot_text(message.get("content"), f"{path}.content")
            if text:
                system.append({"text": text})
            continue
        started = True
        if role == "tool":
            part = _tool_from_pivot(message, path, names)
            if results is None:
                results = []
                contents.append({"role": "user", "parts": results})
            results.append(part)
            continue
        results = None
        if role == "user":
            _only_pivot(message, {"role", "content"}, path)
            contents.append({"role": "user", "parts": _user_parts(message.get("content"), path)})
        elif role == "assistant":
            turn = _assistant_from_pivot(message, path, names, signed)
            if turn["parts"]:
                contents.append(turn)
        else:
            raise Unsupported(f"{path}.role", f"{_shown(role)} is not carried")
    return system, contents


def _needs_signature(model: str) -> bool:
    match = _GEMINI_MAJOR.match(model)
    return match is not None and int(match.group(1)) >= 3


def _user_parts(content: Any, path: str) -> list[Pivot]:
    if isinstance(content, str):
        return [{"text": content}] if content else []
    parts: list[Pivot] = []
    for j, part in enumerate(_list(content, f"{path}.content")):
        ppath = f"{path}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            _only_pivot(part, {"type", "text"}, ppath)
            text = _text(part.get("text"), f"{ppath}.text")
            if text:
                parts.append({"text": text})
        elif kind == "image_url":
            _only_pivot(part, {"type", "image_url"}, ppath)
            parts.append(_image_from_pivot(part.get("image_url"), f"{ppath}.image_url"))
        else:
            raise Unsupported(f"{ppath}.type", f"{_shown(kind)} parts are not carried")
    return parts


def _image_from_pivot(image: Any, path: str) -> Pivot:
    if isinstance(image, str):
        image = {"url": image}
    if not isinstance(image, dict):
        raise Unsupported(path, "expected a JSON object")
    _only_pivot(image, {"url", "detail"}, path)
    if image.get("detail", "auto") != "auto":
        raise Unsupported(f"{path}.detail", "Gemini has no per-image detail")
    url = _text(image.get("url"), f"{path}.url")
    data = _DATA_URL.fullmatch(url)
    if data is not None:
        return {"inlineData": {"mimeType": data.group(1), "data": data.group(2)}}
    if urlsplit(url).scheme not in ("http", "https"):
        raise Unsupported(f"{path}.url", "expected a data: or http(s) URL")
    mime = _IMAGE_TYPES.get(_extension(url))
    if mime is None:
        raise Unsupported(
            f"{path}.url", "the image type is not known from the URL (png, jpg, gif, webp)"
        )
    return {"fileData": {"mimeType": mime, "fileUri": url}}


def _extension(url: str) -> str:
    path = urlsplit(url).path.lower()
    dot = path.rfind(".")
    return path[dot:] if dot > path.rfind("/") else ""


def _assistant_from_pivot(message: Pivot, path: str, names: dict[str, str], signed: bool) -> Pivot:
    _only_pivot(message, {"role", "content", "tool_calls", "refusal"}, path)
    parts: list[Pivot] = []
    text = _pivot_text(message.get("content"), f"{path}.content")
    refusal = message.get("refusal")
    if refusal is not None and not text:
        text = _text(refusal, f"{path}.refusal")  # what the assistant said, refusing
    if text:
        parts.append({"text": text})
    calls = message.get("tool_calls") or []
    for j, call in enumerate(_list(calls, f"{path}.tool_calls")):
        cpath = f"{path}.tool_calls[{j}]"
        if not isinstance(call, dict) or call.get("type", "function") != "function":
            raise Unsupported(f"{cpath}.type", "only function calls are carried")
        _only_pivot(call, {"id", "type", "function", "index"}, cpath)
        function = call.get("function")
        if not isinstance(function, dict):
            raise Unsupported(f"{cpath}.function", "expected a JSON object")
        _only_pivot(function, {"name", "arguments"}, f"{cpath}.function")
        name = _text(function.get("name"), f"{cpath}.function.name")
        gemini_call: Pivot = {
            "name": name,
            "args": _args_object(function.get("arguments"), f"{cpath}.function.arguments"),
        }
        call_id = call.get("id")
        if isinstance(call_id, str) and call_id:
            gemini_call["id"] = call_id
            names[call_id] = name
        part: Pivot = {"functionCall": gemini_call}
        if signed and j == 0:
            part["thoughtSignature"] = _SKIP_SIGNATURE
        parts.append(part)
    return {"role": "model", "parts": parts}


def _tool_from_pivot(message: Pivot, path: str, names: dict[str, str]) -> Pivot:
    _only_pivot(message, {"role", "tool_call_id", "content"}, path)
    call_id = message.get("tool_call_id")
    name = names.get(call_id) if isinstance(call_id, str) else None
    if name is None:
        raise Unsupported(f"{path}.tool_call_id", "no earlier assistant tool call has this id")
    text = _pivot_text(message.get("content"), f"{path}.content")
    return {"functionResponse": {"id": call_id, "name": name, "response": _response_object(text)}}


def _tools_from_pivot(tools: Any) -> list[Pivot]:
    declarations: list[Pivot] = []
    for i, tool in enumerate(_list(tools, "tools")):
        path = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise Unsupported(f"{path}.type", "only function tools are carried")
        _only_pivot(tool, {"type", "function"}, path)
        function = tool.get("function")
        if not isinstance(function, dict):
            raise Unsupported(f"{path}.function", "expected a JSON object")
        # `strict` asks for arguments that follow the schema; Gemini follows it anyway.
        _only_pivot(function, {"name", "description", "parameters", "strict"}, f"{path}.function")
        declaration: Pivot = {"name": _text(function.get("name"), f"{path}.function.name")}
        if function.get("description") is not None:
            declaration["description"] = function["description"]
        if function.get("parameters") is not None:
            declaration["parametersJsonSchema"] = function["parameters"]
        declarations.append(declaration)
    return declarations


def _tool_choice_from_pivot(choice: Any) -> Pivot:
    modes = {"auto": "AUTO", "none": "NONE", "required": "ANY"}
    if isinstance(choice, str) and choice in modes:
        return {"mode": modes[choice]}
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if isinstance(name, str):
            return {"mode": "ANY", "allowedFunctionNames": [name]}
    raise Unsupported("tool_choice", "expected auto, none, required or one function")


def _generation_from_pivot(pivot: Pivot) -> dict[str, Any]:
    config: dict[str, Any] = {
        gkey: pivot[pkey] for pkey, gkey in _PIVOT_SIMPLE.items() if pivot.get(pkey) is not None
    }
    max_tokens = pivot.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = pivot.get("max_tokens")
    if max_tokens is not None:
        config["maxOutputTokens"] = max_tokens
    stop = pivot.get("stop")
    if stop is not None:
        config["stopSequences"] = [stop] if isinstance(stop, str) else _list(stop, "stop")
    response_format = pivot.get("response_format")
    if response_format is not None:
        config.update(_response_format_from_pivot(response_format))
    return config


def _response_format_from_pivot(response_format: Any) -> dict[str, Any]:
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"responseMimeType": "application/json"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise Unsupported("response_format.json_schema.schema", "expected a JSON object")
        _only_pivot(
            spec, {"name", "schema", "strict", "description"}, "response_format.json_schema"
        )
        return {"responseMimeType": "application/json", "responseJsonSchema": spec["schema"]}
    raise Unsupported("response_format.type", f"{_shown(kind)} is not carried")


# --- answers ------------------------------------------------------------------------


def _finish_to_pivot(reason: Any, has_calls: bool) -> str:
    if reason == "MAX_TOKENS":
        return "length"
    if isinstance(reason, str) and reason in _FILTERED:
        return "content_filter"
    return "tool_calls" if has_calls else "stop"


def _finish_from_pivot(reason: Any) -> str:
    return _FINISH_FROM_PIVOT.get(reason, "STOP") if isinstance(reason, str) else "STOP"


def _usage_to_pivot(metadata: Any) -> Pivot:
    meta = metadata if isinstance(metadata, dict) else {}
    prompt = int(meta.get("promptTokenCount") or 0)
    thoughts = int(meta.get("thoughtsTokenCount") or 0)
    completion = int(meta.get("candidatesTokenCount") or 0) + thoughts
    usage: Pivot = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    cached = int(meta.get("cachedContentTokenCount") or 0)
    if cached:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    if thoughts:
        usage["completion_tokens_details"] = {"reasoning_tokens": thoughts}
    return usage


def _usage_from_pivot(usage: Any) -> dict[str, Any]:
    use = usage if isinstance(usage, dict) else {}
    prompt = int(use.get("prompt_tokens") or 0)
    completion = int(use.get("completion_tokens") or 0)
    details = use.get("completion_tokens_details")
    reasoning = (
        int((details or {}).get("reasoning_tokens") or 0) if isinstance(details, dict) else 0
    )
    metadata: dict[str, Any] = {
        "promptTokenCount": prompt,
        "candidatesTokenCount": completion - reasoning,
        "totalTokenCount": prompt + completion,
    }
    if reasoning:
        metadata["thoughtsTokenCount"] = reasoning
    prompt_details = use.get("prompt_tokens_details")
    cached = prompt_details.get("cached_tokens") if isinstance(prompt_details, dict) else None
    if cached:
        metadata["cachedContentTokenCount"] = int(cached)
    return metadata


def _candidate(body: dict[str, Any]) -> dict[str, Any]:
    candidates = body.get("candidates")
    if isinstance(candidates, list) and candidates and isinstance(candidates[0], dict):
        return candidates[0]
    return {}


def _candidate_parts(
    candidate: dict[str, Any],
) -> tuple[list[str], list[tuple[str, dict[str, Any]]]]:
    """The answer's text, and its function calls with their paths; thoughts and other
    parts are not the answer."""
    content = candidate.get("content")
    parts = content.get("parts") if isinstance(content, dict) else None
    texts: list[str] = []
    calls: list[tuple[str, dict[str, Any]]] = []
    for j, part in enumerate(parts if isinstance(parts, list) else []):
        if not isinstance(part, dict) or part.get("thought"):
            continue
        if isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif isinstance(part.get("functionCall"), dict):
            calls.append((f"candidates[0].content.parts[{j}].functionCall", part["functionCall"]))
    return texts, calls


def _blocked(body: dict[str, Any]) -> bool:
    feedback = body.get("promptFeedback")
    return isinstance(feedback, dict) and bool(feedback.get("blockReason"))


def _answer_id(body: dict[str, Any]) -> str:
    response_id = body.get("responseId")
    return response_id if isinstance(response_id, str) and response_id else "gemini"


def _call_prefix(body: dict[str, Any]) -> str:
    response_id = body.get("responseId")
    if isinstance(response_id, str) and _safe_id(response_id):
        return f"call_{_safe_id(response_id)}_"
    return "call_"


def _pivot_call(call: dict[str, Any], call_id: str, path: str) -> Pivot:
    name = call.get("name")
    return {
        "id": call_id,
        "type": "function",
        "function": {
            "name": name if isinstance(name, str) else "",
            "arguments": _call_arguments(call.get("args"), f"{path}.args"),
        },
    }


def response_to_pivot(body: dict[str, Any]) -> Pivot:
    """A Gemini answer (its first candidate) as a `chat.completion`."""
    candidate = _candidate(body)
    texts, calls = _candidate_parts(candidate)
    prefix = _call_prefix(body)
    message: Pivot = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        message["tool_calls"] = [
            _pivot_call(call, _given_id(call) or f"{prefix}{n}", path)
            for n, (path, call) in enumerate(calls)
        ]
    finish = (
        "content_filter"
        if not candidate and _blocked(body)
        else _finish_to_pivot(candidate.get("finishReason"), bool(calls))
    )
    return {
        "id": _answer_id(body),
        "object": "chat.completion",
        "created": 0,
        "model": _id_text(body.get("modelVersion")),
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": _usage_to_pivot(body.get("usageMetadata")),
    }


def _id_text(value: Any) -> str:
    """An id or model name from an answer: a string or a number, else empty."""
    if isinstance(value, str):
        return value
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else ""


def _given_id(call: dict[str, Any]) -> str | None:
    call_id = call.get("id")
    return call_id if isinstance(call_id, str) and call_id else None


def response_from_pivot(pivot: Pivot, model: str) -> dict[str, Any]:
    """A `chat.completion` as a Gemini `GenerateContentResponse`."""
    choices = pivot.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message") or {}
    parts: list[Pivot] = []
    text = _pivot_text(message.get("content"), "choices[0].message.content")
    refusal = message.get("refusal")
    if not text and isinstance(refusal, str):
        text = refusal  # what the model said, refusing (Gemini has no field of its own for it)
    if text:
        parts.append({"text": text})
    cut = choice.get("finish_reason") == "length"
    for j, call in enumerate(message.get("tool_calls") or []):
        parts.append(_gemini_call(call, f"choices[0].message.tool_calls[{j}]", cut))
    return {
        "candidates": [
            {
                "content": {"role": "model", "parts": parts},
                "finishReason": _finish_from_pivot(choice.get("finish_reason")),
                "index": 0,
            }
        ],
        "usageMetadata": _usage_from_pivot(pivot.get("usage")),
        "modelVersion": model or _id_text(pivot.get("model")),
        "responseId": _id_text(pivot.get("id")),
    }


def _gemini_call(call: Any, path: str, cut: bool) -> Pivot:
    """A pivot tool call as a Gemini function call part (`cut`: see `_args_object`)."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict):
        raise Unsupported(f"{path}.function", "expected a JSON object")
    name = function.get("name")
    gemini_call: Pivot = {
        "name": name if isinstance(name, str) else "",
        "args": _args_object(function.get("arguments"), f"{path}.function.arguments", cut),
    }
    call_id = call.get("id")
    if isinstance(call_id, str) and call_id:
        gemini_call["id"] = call_id
    return {"functionCall": gemini_call}


# --- errors ---------------------------------------------------------------------------


def error_to_pivot(status: int, body: bytes) -> Pivot:
    """A Gemini error body (or any bytes) as a pivot error; the HTTP status is kept.

    Never raises: a body that is not a Gemini error (not JSON, nested too deeply
    to read, another shape) is carried as its text.
    """
    try:
        parsed: Any = orjson.loads(body)
    except (orjson.JSONDecodeError, TypeError):
        parsed = None
    if isinstance(parsed, list) and len(parsed) == 1:
        parsed = parsed[0]  # the error of a stream read without ?alt=sse
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict):
        return _error_pivot(status, error)
    return _error_pivot(status, {"message": _body_text(body)})


def _body_text(body: Any) -> str:
    if not isinstance(body, (bytes, bytearray)):
        return ""
    return bytes(body[: _MAX_ERROR_TEXT * 4]).decode("utf-8", "replace").strip()[:_MAX_ERROR_TEXT]


def _error_pivot(status: int, error: dict[str, Any]) -> Pivot:
    """A Gemini `error` object as a pivot error (only its string fields are read)."""
    message = error.get("message")
    code = error.get("status")
    out: Pivot = {
        "message": message if isinstance(message, str) and message else _no_message(status),
        "type": pivot_error_type(status),
        "code": code if isinstance(code, str) else None,
    }
    details = _details(error.get("details"))
    if details is not None:
        out["details"] = details
    return {"error": out, "status": status}


def _no_message(status: int) -> str:
    return f"upstream answered HTTP {status}"


def _details(details: Any) -> list[Any] | None:
    """An error's `details` list, kept only if it can be written back out as JSON."""
    if not isinstance(details, list):
        return None
    try:
        orjson.dumps(details)
    except TypeError:  # orjson.JSONEncodeError: nested too deeply, ...
        return None
    return details


def error_from_pivot(pivot: Pivot) -> dict[str, Any]:
    """A pivot error as Gemini's `{"error": {"code", "message", "status"}}`."""
    status = pivot.get("status")
    code = status if isinstance(status, int) and not isinstance(status, bool) else 500
    error = pivot.get("error")
    error = error if isinstance(error, dict) else {}
    rpc = error.get("code")
    message = error.get("message")
    out: dict[str, Any] = {
        "code": code,
        "message": message if isinstance(message, str) else "",
        "status": rpc if isinstance(rpc, str) and rpc in RPC_NAMES else rpc_status(code),
    }
    details = _details(error.get("details"))
    if details is not None:
        out["details"] = details
    return {"error": out}


# --- streams ----------------------------------------------------------------------------


class ToPivot:
    """A Gemini `streamGenerateContent?alt=sse` stream, chunk by chunk, as pivot chunks.

    Gemini sends no terminator: the chunk that carries `finishReason` (whose
    `usageMetadata` is final) ends the answer with a finish chunk, a usage chunk
    and `None`.
    """

    def __init__(self, model: str) -> None:
        self._model = model
        self._id: str | None = None
        self._prefix = "call_"
        self._role_sent = False
        self._calls = 0
        self._usage: Any = None
        self._done = False

    def event(self, name: str | None, data: dict[str, Any]) -> list[Pivot | None]:
        if self._done:
            return []
        if isinstance(data.get("error"), dict):
            self._done = True
            return [_error_pivot(_error_code(data["error"]), data["error"])]
        if self._id is None:
            self._id = _answer_id(data)
            self._prefix = _call_prefix(data)
        if isinstance(data.get("modelVersion"), str):
            self._model = data["modelVersion"]
        if data.get("usageMetadata") is not None:
            self._usage = data["usageMetadata"]
        candidate = _candidate(data)
        out: list[Pivot | None] = []
        delta = self._delta(candidate)
        if delta:
            out.append(self._chunk(delta, None))
        reason = candidate.get("finishReason")
        if reason is not None or (not candidate and _blocked(data)):
            finish = (
                "content_filter" if reason is None else _finish_to_pivot(reason, self._calls > 0)
            )
            out.append(self._chunk({}, finish))
            out.append(self._usage_chunk())
            out.append(None)
            self._done = True
        return out

    def _delta(self, candidate: dict[str, Any]) -> Pivot:
        texts, calls = _candidate_parts(candidate)
        delta: Pivot = {}
        if texts and "".join(texts):
            delta["content"] = "".join(texts)
        if calls:
            delta["tool_calls"] = [self._tool_call(call, path) for path, call in calls]
        return delta

    def _tool_call(self, call: dict[str, Any], path: str) -> Pivot:
        index = self._calls
        self._calls += 1
        pivot = _pivot_call(call, _given_id(call) or f"{self._prefix}{index}", path)
        return {"index": index, **pivot}

    def _chunk(self, delta: Pivot, finish: str | None) -> Pivot:
        if not self._role_sent:
            delta = {"role": "assistant", **delta}
            self._role_sent = True
        return {
            **self._head(),
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    def _usage_chunk(self) -> Pivot:
        return {**self._head(), "choices": [], "usage": _usage_to_pivot(self._usage)}

    def _head(self) -> Pivot:
        return {
            "id": self._id or "gemini",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": self._model,
        }


def _error_code(error: dict[str, Any]) -> int:
    code = error.get("code")
    return code if isinstance(code, int) and 400 <= code <= 599 else 500


@dataclass
class _Call:
    """A streamed function call, held until the answer ends: its argument deltas are
    collected in `pieces` and joined once."""

    id: str = ""
    name: str = ""
    pieces: list[str] = field(default_factory=list)


class FromPivot:
    """Pivot chunks as Gemini stream chunks: one per text delta; function calls whole at the end.

    The last chunk carries the function calls, `finishReason` and `usageMetadata`.
    Function calls are held until then: more than `_MAX_CALLS` of them, or more
    than `_MAX_ARGUMENT_BYTES` of arguments, end the stream with an error event.
    """

    def __init__(self, model: str) -> None:
        self._model = model
        self._id = ""
        self._calls: dict[int, _Call] = {}
        self._latest: int | None = None  # the call the last tool-call delta went to
        self._unindexed_calls = 0
        self._argument_bytes = 0
        self._finish: str | None = None
        self._usage: Any = None
        self._done = False

    def chunk(self, chunk: Pivot | None) -> list[Event]:
        if self._done:
            return []
        if chunk is None:
            self._done = True
            return [self._final()]
        if "error" in chunk:
            self._done = True
            return [(None, error_from_pivot(chunk))]
        if not self._id and isinstance(chunk.get("id"), str):
            self._id = chunk["id"]
        if chunk.get("usage") is not None:
            self._usage = chunk["usage"]
        events: list[Event] = []
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            delta = delta if isinstance(delta, dict) else {}
            for key in ("content", "refusal"):  # a refusal is what the model said
                text = delta.get(key)
                if isinstance(text, str) and text:
                    events.append((None, self._body([{"text": text}])))
            calls = delta.get("tool_calls")
            for call in calls if isinstance(calls, list) else []:
                refusal = self._add_call(call)
                if refusal is not None:
                    self._done = True
                    return [*events, (None, error_from_pivot(refusal))]
            if choice.get("finish_reason") is not None:
                self._finish = choice["finish_reason"]
        return events

    def _add_call(self, call: Any) -> Pivot | None:
        """Adds a tool call delta; a pivot error when the answer's calls pass a cap."""
        if not isinstance(call, dict):
            return None
        if not isinstance(call.get("function"), dict) and not call.get("id"):
            return None  # nothing in it to keep
        index = call.get("index")
        if not isinstance(index, int) or isinstance(index, bool):
            index = self._unindexed(call)
        self._latest = index
        known = self._calls.get(index)
        if known is None:
            if len(self._calls) >= _MAX_CALLS:
                return _too_large(f"more than {_MAX_CALLS} function calls")
            known = self._calls[index] = _Call()
        if isinstance(call.get("id"), str) and call["id"]:
            known.id = call["id"]
        function = call.get("function")
        if not isinstance(function, dict):
            return None
        if isinstance(function.get("name"), str) and function["name"]:
            known.name = function["name"]
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            self._argument_bytes += _utf8_size(arguments)
            if self._argument_bytes > _MAX_ARGUMENT_BYTES:
                return _too_large(f"function call arguments over {_MAX_ARGUMENT_BYTES} bytes")
            known.pieces.append(arguments)
        return None

    def _unindexed(self, call: dict[str, Any]) -> int:
        """Which call a delta without an `index` belongs to (some OpenAI-compatible upstreams
        omit it): the call with its `id` if one was seen; else a new `id` (or, without one,
        a new `name` where the latest call has one) starts a call, and a delta with neither
        continues the latest. Such calls are numbered after any `index` an upstream could
        send (`_UNINDEXED`), so the two never share a slot."""
        given = call.get("id")
        if isinstance(given, str) and given:
            for index, known in self._calls.items():
                if known.id == given:
                    return index
        latest = self._calls.get(self._latest) if self._latest is not None else None
        function = call.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if (
            latest is None
            or (given and given != latest.id)
            or (not given and name and latest.name and name != latest.name)
        ):
            self._unindexed_calls += 1
            return _UNINDEXED + self._unindexed_calls
        assert self._latest is not None
        return self._latest

    def _final(self) -> Event:
        parts: list[Pivot] = []
        cut = self._finish == "length"
        for index in sorted(self._calls):
            call = self._calls[index]
            function = {"name": call.name, "arguments": "".join(call.pieces)}
            try:
                parts.append(
                    _gemini_call({"id": call.id, "function": function}, f"tool_calls[{index}]", cut)
                )
            except Unsupported as exc:
                return (None, error_from_pivot(_bad_arguments(exc)))
        body = self._body(parts)
        body["candidates"][0]["finishReason"] = _finish_from_pivot(self._finish)
        if self._usage is not None:
            body["usageMetadata"] = _usage_from_pivot(self._usage)
        return (None, body)

    def _body(self, parts: list[Pivot]) -> dict[str, Any]:
        return {
            "candidates": [{"content": {"role": "model", "parts": parts}, "index": 0}],
            "modelVersion": self._model,
            "responseId": self._id,
        }


def _utf8_size(text: str) -> int:
    if text.isascii():
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


def _too_large(what: str) -> Pivot:
    """The upstream's answer holds more function calls than the gateway translates."""
    return {
        "error": {
            "message": f"the upstream's answer is too large to translate: {what}",
            "type": "api_error",
            "code": "INTERNAL",
        },
        "status": 502,
    }


def _bad_arguments(exc: Unsupported) -> Pivot:
    """The upstream's function arguments were not a JSON object: Gemini cannot show them."""
    return {
        "error": {"message": str(exc), "type": "api_error", "code": "INTERNAL"},
        "status": 502,
    }
