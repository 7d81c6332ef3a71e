"""Anthropic Messages <-> the pivot (docs/reference.md#translation).

Requests, answers, errors and stream events of `POST /v1/messages` as OpenAI
chat completions and back. What Anthropic has and the pivot has not (thinking,
documents, server tools, citations in a request, `output_config`...) raises
`Unsupported` naming the field; so does what the pivot has and Anthropic has not
(`n` > 1, `seed`, penalties, `logprobs`, JSON mode, audio). A pivot field equal
to OpenAI's default (`n: 1`, `presence_penalty: 0`, `logprobs: false`...) or JSON
`null` carries nothing and is accepted.

Deliberate approximations, documented for callers: `cache_control` (and OpenAI's
`prompt_cache_*`) are caching hints and are ignored; OpenAI's `user` (else
`safety_identifier`) is `metadata.user_id`; a `tool_result` with `is_error:
true` becomes the result text prefixed with "Error: "; system and developer
messages anywhere in an OpenAI conversation become Anthropic's top-level
`system`, in order; a pivot request without `max_tokens` gets
`DEFAULT_MAX_TOKENS` (Anthropic requires one); tool-call ids are made
Anthropic-safe (`[A-Za-z0-9_-]`) the same way in `tool_use` and `tool_result`.
Thinking blocks and citations in an answer are left out of the pivot answer. An
answer cut by the token limit (`finish_reason: length`) carries a tool call
whose `arguments` end mid-JSON with an empty `input` (the stream passes the
partial JSON on); a complete answer with malformed arguments is refused.
OpenAI's `image_url.detail` other than "auto" is refused (Anthropic has none).
Streamed tool-call deltas without `index` (some OpenAI-compatible upstreams) are
told apart by a new `id` or `name`. Ids the upstream gave are kept; where there
is none, one is derived from a hash of what it names (stable, no clock, no
randomness). `created` is 0: this module has no clock.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Final

import orjson

from sidecar.translate.base import PIVOT_ERROR_TYPES, Event, Pivot, Unsupported, pivot_error_type

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "FromPivot",
    "ToPivot",
    "error_from_pivot",
    "error_to_pivot",
    "request_from_pivot",
    "request_to_pivot",
    "response_from_pivot",
    "response_to_pivot",
]

#: `max_tokens` sent to Anthropic when the pivot request has none (Anthropic requires it).
DEFAULT_MAX_TOKENS: Final = 4096

_EMPTY_SCHEMA: Final = {"type": "object", "properties": {}}
_STOP_TO_FINISH: Final = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
_FINISH_TO_STOP: Final = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
_TOOL_CHOICE_TO_PIVOT: Final = {"auto": "auto", "any": "required", "none": "none"}
_TOOL_CHOICE_FROM_PIVOT: Final = {"auto": "auto", "required": "any", "none": "none"}
#: Anthropic's error types by status: the pivot's plus the two Anthropic has of its own.
_ANTHROPIC_TYPES: Final = {**PIVOT_ERROR_TYPES, 402: "billing_error", 504: "timeout_error"}
_STATUS_BY_TYPE: Final = {kind: status for status, kind in _ANTHROPIC_TYPES.items()} | {
    "api_error": 500
}
#: Pivot request fields whose value here means "OpenAI's default": nothing to carry.
_PIVOT_DEFAULTS: Final[dict[str, Any]] = {
    "n": 1,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logprobs": False,
    "store": False,
    "modalities": ["text"],
}
#: Pivot request fields read apart from the rest (`model` and `stream` come as arguments).
_PIVOT_ELSEWHERE: Final = frozenset(
    {
        "messages",
        "model",
        "stream",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
    }
)
#: OpenAI's prompt-caching hints: like Anthropic's `cache_control`, no effect on the answer.
_PIVOT_CACHE_HINTS: Final = frozenset(
    {"prompt_cache_key", "prompt_cache_retention", "prompt_cache_options"}
)
_REQUEST_KEYS: Final = frozenset(
    {
        "model",
        "stream",
        "system",
        "messages",
        "max_tokens",
        "stop_sequences",
        "temperature",
        "top_p",
        "top_k",
        "metadata",
        "tools",
        "tool_choice",
        "thinking",
        "cache_control",
    }
)
_UNSAFE_ID: Final = re.compile(r"[^A-Za-z0-9_-]")
_MAX_ERROR_TEXT: Final = 500
_MAX_NAMED: Final = 64  # characters of a refused value shown in the field that names it


# -- small helpers -------------------------------------------------------------------------


def _present(obj: dict[str, Any]) -> dict[str, Any]:
    """`obj` without its JSON nulls: an explicit null carries nothing."""
    return {key: value for key, value in obj.items() if value is not None}


def _check_keys(obj: dict[str, Any], allowed: frozenset[str], path: str) -> None:
    """Unsupported for the first key of `obj` outside `allowed` that carries something (nulls,
    empty lists and objects, and the `cache_control` hint carry nothing)."""
    for key, value in obj.items():
        if value not in (None, [], {}) and key not in allowed and key != "cache_control":
            raise Unsupported(f"{path}.{key}")


def _is(path: str, value: Any) -> str:
    """`path=value` naming a refused value: a string as itself (cut short), `None` as None,
    anything else by its JSON kind, never its text (which may be huge or nested deeply)."""
    if isinstance(value, str):
        return f"{path}={value[:_MAX_NAMED]}"
    if value is None:
        return f"{path}=None"
    return f"{path}=<{type(value).__name__}>"


def _object(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise Unsupported(path, "expected an object")
    return value


def _objects(value: Any, path: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise Unsupported(path, "expected a list")
    return [_object(item, f"{path}[{i}]") for i, item in enumerate(value)]


def _string(obj: dict[str, Any], key: str, path: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise Unsupported(f"{path}.{key}", "expected a string")
    return value


def _dumps(value: Any, path: str = "") -> str:
    """`value` as a JSON string. What orjson cannot write (an integer over 64 bits, a lone
    surrogate, nesting over 254 levels) the standard library writes; nesting past Python's
    recursion limit is `Unsupported(path)`."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # orjson.JSONEncodeError
        pass
    try:
        return json.dumps(value, separators=(",", ":"))
    except RecursionError:
        raise Unsupported(path, "nested too deeply") from None


def _stable_id(prefix: str, *parts: Any) -> str:
    """An id derived from what it names: the same input gives the same id."""
    try:
        data = orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # what orjson cannot write: see `_dumps`
        try:
            data = json.dumps(parts, sort_keys=True).encode()
        except RecursionError:  # too deep to write at all: its top-level keys name it
            data = repr([sorted(p) if isinstance(p, dict) else type(p) for p in parts]).encode()
    digest = hashlib.sha256(data).hexdigest()
    return prefix + digest[:24]


def _parse_arguments(raw: Any, path: str) -> dict[str, Any]:
    """A tool call's `arguments` JSON string as Anthropic's `input` object."""
    if raw is None or raw == "":
        return {}
    if not isinstance(raw, str):
        raise Unsupported(path, "expected a JSON string")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise Unsupported(path, "not valid JSON") from None
    if not isinstance(value, dict):
        raise Unsupported(path, "not a JSON object")
    return value


def _answer_input(raw: Any, path: str, cut: bool) -> dict[str, Any]:
    """An answer's tool-call `arguments` as `input`. A call cut by the token limit (`cut`)
    may end mid-JSON: it is carried with an empty `input` (the answer stops at max_tokens),
    as the stream carries the partial JSON; an answer that claims to be whole is refused."""
    try:
        return _parse_arguments(raw, path)
    except Unsupported:
        if cut and isinstance(raw, str):
            return {}
        raise


def _stop_sequences(value: Any, path: str) -> list[str]:
    """A stop sequence or a list of them, as a list of strings."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    raise Unsupported(path, "expected a string or a list of strings")


def _collapse(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """One text part as a plain string (both formats' shorthand), else the parts."""
    if len(parts) == 1 and parts[0]["type"] == "text":
        text: str = parts[0]["text"]
        return text
    return parts


# -- requests: Anthropic -> pivot ----------------------------------------------------------


def request_to_pivot(body: dict[str, Any]) -> Pivot:
    """An Anthropic Messages request as a pivot (OpenAI chat) request."""
    body = _present(body)
    for key in body:
        if key not in _REQUEST_KEYS:
            raise Unsupported(key)
    thinking = body.get("thinking")
    if thinking is not None and thinking != {"type": "disabled"}:
        raise Unsupported("thinking", "no equivalent in the pivot")
    messages: list[Pivot] = []
    if "system" in body:
        messages.append(_system_to_pivot(body["system"], "system"))
    messages.extend(_messages_to_pivot(body.get("messages"), "messages"))
    pivot: Pivot = {"messages": messages}
    for key in ("model", "stream", "max_tokens", "temperature", "top_p", "top_k"):
        if key in body:
            pivot[key] = body[key]
    if "stop_sequences" in body:
        pivot["stop"] = _stop_sequences(body["stop_sequences"], "stop_sequences")
    if "metadata" in body:
        metadata = _object(body["metadata"], "metadata")
        _check_keys(metadata, frozenset({"user_id"}), "metadata")
        if metadata.get("user_id") is not None:
            pivot["user"] = metadata["user_id"]
    if "tools" in body:
        pivot["tools"] = [
            _tool_to_pivot(tool, f"tools[{i}]")
            for i, tool in enumerate(_objects(body["tools"], "tools"))
        ]
    if "tool_choice" in body:
        _tool_choice_to_pivot(_object(body["tool_choice"], "tool_choice"), pivot)
    return pivot


def _text_of(block: dict[str, Any], path: str) -> dict[str, Any]:
    _check_keys(block, frozenset({"type", "text"}), path)
    return {"type": "text", "text": _string(block, "text", path)}


def _text_blocks(content: Any, path: str) -> list[dict[str, Any]]:
    """Text-only content (a string or text blocks) as text parts."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    parts = []
    for j, block in enumerate(_objects(content, path)):
        if block.get("type") != "text":
            raise Unsupported(_is(f"{path}[{j}].type", block.get("type")))
        parts.append(_text_of(block, f"{path}[{j}]"))
    return parts


def _system_to_pivot(system: Any, path: str) -> Pivot:
    return {"role": "system", "content": _collapse(_text_blocks(system, path))}


def _content_blocks(content: Any, path: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return _objects(content, path)


def _messages_to_pivot(messages: Any, path: str) -> list[Pivot]:
    out: list[Pivot] = []
    for i, message in enumerate(_objects(messages, path)):
        here = f"{path}[{i}]"
        _check_keys(message, frozenset({"role", "content"}), here)
        role = message.get("role")
        content = message.get("content")
        if role == "system":
            out.append(_system_to_pivot(content, f"{here}.content"))
        elif role == "user":
            out.extend(_user_to_pivot(_content_blocks(content, f"{here}.content"), here))
        elif role == "assistant":
            out.append(_assistant_to_pivot(_content_blocks(content, f"{here}.content"), here))
        else:
            raise Unsupported(_is(f"{here}.role", role))
    return out


def _user_to_pivot(blocks: list[dict[str, Any]], path: str) -> list[Pivot]:
    """One user turn: its tool results as `tool` messages first (OpenAI wants them right
    after the assistant's tool calls), then the rest as one user message."""
    results: list[Pivot] = []
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        here = f"{path}.content[{j}]"
        kind = block.get("type")
        if kind == "text":
            parts.append(_text_of(block, here))
        elif kind == "image":
            parts.append(_image_to_pivot(block, here))
        elif kind == "tool_result":
            results.append(_tool_result_to_pivot(block, here))
        else:
            raise Unsupported(_is(f"{here}.type", kind))
    if parts:
        results.append({"role": "user", "content": _collapse(parts)})
    return results


def _image_to_pivot(block: dict[str, Any], path: str) -> dict[str, Any]:
    _check_keys(block, frozenset({"type", "source"}), path)
    source = _object(block.get("source"), f"{path}.source")
    kind = source.get("type")
    if kind == "base64":
        _check_keys(source, frozenset({"type", "media_type", "data"}), f"{path}.source")
        media = _string(source, "media_type", f"{path}.source")
        data = _string(source, "data", f"{path}.source")
        url = f"data:{media};base64,{data}"
    elif kind == "url":
        _check_keys(source, frozenset({"type", "url"}), f"{path}.source")
        url = _string(source, "url", f"{path}.source")
    else:
        raise Unsupported(_is(f"{path}.source.type", kind))
    return {"type": "image_url", "image_url": {"url": url}}


def _tool_result_to_pivot(block: dict[str, Any], path: str) -> Pivot:
    _check_keys(block, frozenset({"type", "tool_use_id", "content", "is_error"}), path)
    content = block.get("content")
    parts = [] if content is None else _text_blocks(content, f"{path}.content")
    if block.get("is_error"):
        if parts:
            parts[0] = {"type": "text", "text": "Error: " + parts[0]["text"]}
        else:
            parts = [{"type": "text", "text": "Error: "}]
    return {
        "role": "tool",
        "tool_call_id": _string(block, "tool_use_id", path),
        "content": "" if not parts else _collapse(parts),
    }


def _assistant_to_pivot(blocks: list[dict[str, Any]], path: str) -> Pivot:
    texts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        here = f"{path}.content[{j}]"
        kind = block.get("type")
        if kind == "text":
            texts.append(_text_of(block, here))
        elif kind == "tool_use":
            if block.get("caller") in ({"type": "direct"}, None):
                block = {key: value for key, value in block.items() if key != "caller"}
            _check_keys(block, frozenset({"type", "id", "name", "input"}), here)
            arguments = _object(block.get("input", {}), f"{here}.input")
            calls.append(
                {
                    "id": _string(block, "id", here),
                    "type": "function",
                    "function": {
                        "name": _string(block, "name", here),
                        "arguments": _dumps(arguments, f"{here}.input"),
                    },
                }
            )
        else:
            raise Unsupported(_is(f"{here}.type", kind))
    message: Pivot = {"role": "assistant", "content": _collapse(texts) if texts else None}
    if calls:
        message["tool_calls"] = calls
    return message


def _tool_to_pivot(tool: dict[str, Any], path: str) -> Pivot:
    kind = tool.get("type")
    if kind not in (None, "custom"):
        raise Unsupported(_is(f"{path}.type", kind))
    _check_keys(tool, frozenset({"type", "name", "description", "input_schema", "strict"}), path)
    function: dict[str, Any] = {"name": _string(tool, "name", path)}
    if "description" in tool:
        function["description"] = tool["description"]
    schema = tool.get("input_schema")
    schema = {} if schema is None else _object(schema, f"{path}.input_schema")
    function["parameters"] = schema or dict(_EMPTY_SCHEMA)
    if "strict" in tool:
        function["strict"] = tool["strict"]
    return {"type": "function", "function": function}


def _tool_choice_to_pivot(choice: dict[str, Any], pivot: Pivot) -> None:
    _check_keys(choice, frozenset({"type", "name", "disable_parallel_tool_use"}), "tool_choice")
    kind = choice.get("type")
    if kind == "tool":
        name = _string(choice, "name", "tool_choice")
        pivot["tool_choice"] = {"type": "function", "function": {"name": name}}
    elif isinstance(kind, str) and kind in _TOOL_CHOICE_TO_PIVOT:
        pivot["tool_choice"] = _TOOL_CHOICE_TO_PIVOT[kind]
    else:
        raise Unsupported(_is("tool_choice.type", kind))
    if choice.get("disable_parallel_tool_use"):
        pivot["parallel_tool_calls"] = False


# -- requests: pivot -> Anthropic ----------------------------------------------------------


def request_from_pivot(pivot: Pivot, model: str, stream: bool) -> dict[str, Any]:
    """A pivot request as an Anthropic Messages request for `model`."""
    pivot = _present(pivot)
    body: dict[str, Any] = {"model": model, "max_tokens": DEFAULT_MAX_TOKENS}
    for key, value in pivot.items():
        if key in _PIVOT_ELSEWHERE or key in _PIVOT_CACHE_HINTS:
            continue
        if key in ("temperature", "top_p", "top_k"):
            body[key] = value
        elif key == "stop":
            body["stop_sequences"] = _stop_sequences(value, key)
        elif key in ("user", "safety_identifier"):
            body["metadata"] = {"user_id": pivot.get("user", value)}
        elif key == "response_format":
            kind = _object(value, key).get("type")
            if kind != "text":
                raise Unsupported(key, f"{_is('type', kind)} has no Anthropic equivalent")
        elif key in _PIVOT_DEFAULTS:
            if value != _PIVOT_DEFAULTS[key]:
                raise Unsupported(key, "no Anthropic equivalent")
        else:
            raise Unsupported(key)
    limit = pivot.get("max_completion_tokens", pivot.get("max_tokens"))
    if limit is not None:
        body["max_tokens"] = limit
    system, messages = _messages_from_pivot(pivot.get("messages"), "messages")
    if system:
        body["system"] = _collapse(system)
    body["messages"] = messages
    if pivot.get("tools"):
        body["tools"] = [
            _tool_from_pivot(tool, f"tools[{i}]")
            for i, tool in enumerate(_objects(pivot["tools"], "tools"))
        ]
        choice = _tool_choice_from_pivot(pivot.get("tool_choice"), pivot.get("parallel_tool_calls"))
        if choice is not None:
            body["tool_choice"] = choice
    if stream:
        body["stream"] = True
    return body


def _append(messages: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    """Add a turn, merged into the previous one of the same role (Anthropic alternates)."""
    if not blocks:
        return
    if messages and messages[-1]["role"] == role:
        messages[-1]["content"].extend(blocks)
    else:
        messages.append({"role": role, "content": blocks})


def _messages_from_pivot(
    messages: Any, path: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The pivot's messages as (system text blocks, alternating Anthropic messages)."""
    system: list[dict[str, Any]] = []
    out: list[dict[str, Any]] = []
    for i, message in enumerate(_objects(messages, path)):
        here = f"{path}[{i}]"
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            _check_keys(message, frozenset({"role", "content"}), here)
            system.extend(_nonempty(_pivot_text(content, f"{here}.content")))
        elif role == "user":
            _check_keys(message, frozenset({"role", "content"}), here)
            _append(out, "user", _user_from_pivot(content, f"{here}.content"))
        elif role == "assistant":
            _check_keys(message, frozenset({"role", "content", "tool_calls"}), here)
            _append(out, "assistant", _assistant_from_pivot(message, here))
        elif role == "tool":
            _check_keys(message, frozenset({"role", "content", "tool_call_id", "name"}), here)
            _append(out, "user", [_tool_result_from_pivot(message, here)])
        else:
            raise Unsupported(_is(f"{here}.role", role))
    for message in out:
        message["content"] = _collapse(message["content"])
    return system, out


def _nonempty(blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Without empty text blocks, which Anthropic refuses."""
    return [block for block in blocks if block["type"] != "text" or block["text"]]


def _pivot_text(content: Any, path: str) -> list[dict[str, Any]]:
    """Pivot text content (None, a string or text parts) as Anthropic text blocks: the same
    `{"type": "text", "text"}` shape on both sides."""
    return [] if content is None else _text_blocks(content, path)


def _user_from_pivot(content: Any, path: str) -> list[dict[str, Any]]:
    if content is None or isinstance(content, str):
        return _nonempty(_pivot_text(content, path))
    blocks = []
    for j, part in enumerate(_objects(content, path)):
        here = f"{path}[{j}]"
        kind = part.get("type")
        if kind == "text":
            blocks.append(_text_of(part, here))
        elif kind == "image_url":
            _check_keys(part, frozenset({"type", "image_url"}), here)
            image = _object(part.get("image_url"), f"{here}.image_url")
            _check_keys(image, frozenset({"url", "detail"}), f"{here}.image_url")
            if image.get("detail") not in (None, "auto"):
                raise Unsupported(f"{here}.image_url.detail", "Anthropic has no per-image detail")
            blocks.append(_image_from_url(_string(image, "url", f"{here}.image_url"), here))
        else:
            raise Unsupported(_is(f"{here}.type", kind))
    return _nonempty(blocks)


def _image_from_url(url: str, path: str) -> dict[str, Any]:
    if url.startswith("data:"):
        header, _, data = url[5:].partition(",")
        if not header.endswith(";base64"):
            raise Unsupported(f"{path}.image_url.url", "only base64 data: URLs")
        source = {"type": "base64", "media_type": header[: -len(";base64")], "data": data}
    elif url.startswith(("https://", "http://")):
        source = {"type": "url", "url": url}
    else:
        raise Unsupported(f"{path}.image_url.url", "expected a data: or http(s) URL")
    return {"type": "image", "source": source}


def _safe_id(value: str) -> str:
    """A tool-call id Anthropic accepts ([A-Za-z0-9_-]); applied alike to calls and results."""
    return _UNSAFE_ID.sub("_", value)


def _assistant_from_pivot(message: dict[str, Any], path: str) -> list[dict[str, Any]]:
    blocks = _nonempty(_pivot_text(message.get("content"), f"{path}.content"))
    calls = message.get("tool_calls") or []
    for k, call in enumerate(_objects(calls, f"{path}.tool_calls")):
        here = f"{path}.tool_calls[{k}]"
        if call.get("type", "function") != "function":
            raise Unsupported(_is(f"{here}.type", call.get("type")))
        _check_keys(call, frozenset({"id", "type", "function", "index"}), here)
        function = _object(call.get("function"), f"{here}.function")
        _check_keys(function, frozenset({"name", "arguments"}), f"{here}.function")
        blocks.append(
            {
                "type": "tool_use",
                "id": _safe_id(_string(call, "id", here)),
                "name": _string(function, "name", f"{here}.function"),
                "input": _parse_arguments(function.get("arguments"), f"{here}.function.arguments"),
            }
        )
    return blocks


def _tool_result_from_pivot(message: dict[str, Any], path: str) -> dict[str, Any]:
    content = message.get("content")
    result: Any = content if isinstance(content, str) else _pivot_text(content, f"{path}.content")
    return {
        "type": "tool_result",
        "tool_use_id": _safe_id(_string(message, "tool_call_id", path)),
        "content": result,
    }


def _tool_from_pivot(tool: dict[str, Any], path: str) -> dict[str, Any]:
    if tool.get("type") != "function":
        raise Unsupported(_is(f"{path}.type", tool.get("type")))
    _check_keys(tool, frozenset({"type", "function"}), path)
    function = _object(tool.get("function"), f"{path}.function")
    _check_keys(
        function, frozenset({"name", "description", "parameters", "strict"}), f"{path}.function"
    )
    schema = function.get("parameters")
    schema = {} if schema is None else _object(schema, f"{path}.function.parameters")
    schema = schema or dict(_EMPTY_SCHEMA)
    if "type" not in schema:
        schema = {"type": "object", **schema}
    out: dict[str, Any] = {"name": _string(function, "name", f"{path}.function")}
    if function.get("description") is not None:
        out["description"] = function["description"]
    out["input_schema"] = schema
    if function.get("strict") is not None:
        out["strict"] = function["strict"]
    return out


def _tool_choice_from_pivot(choice: Any, parallel: Any) -> dict[str, Any] | None:
    if choice is None:
        out: dict[str, Any] | None = {"type": "auto"} if parallel is False else None
    elif isinstance(choice, str) and choice in _TOOL_CHOICE_FROM_PIVOT:
        out = {"type": _TOOL_CHOICE_FROM_PIVOT[choice]}
    elif isinstance(choice, dict) and choice.get("type") == "function":
        function = _object(choice.get("function"), "tool_choice.function")
        out = {"type": "tool", "name": _string(function, "name", "tool_choice.function")}
    else:
        kind = choice.get("type") if isinstance(choice, dict) else choice
        raise Unsupported(
            _is("tool_choice.type", kind) if isinstance(choice, dict) else "tool_choice"
        )
    if out is not None and parallel is False and out["type"] != "none":
        out["disable_parallel_tool_use"] = True
    return out


# -- answers -------------------------------------------------------------------------------


def _usage_to_pivot(usage: dict[str, Any]) -> dict[str, Any]:
    """Anthropic usage as the pivot's: every kind of input token counts as a prompt token."""
    cached = usage.get("cache_read_input_tokens") or 0
    prompt = (usage.get("input_tokens") or 0) + (usage.get("cache_creation_input_tokens") or 0)
    prompt += cached
    completion = usage.get("output_tokens") or 0
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if cached:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out


def _usage_from_pivot(usage: dict[str, Any] | None) -> dict[str, int]:
    """Pivot usage as Anthropic's: cached prompt tokens are `cache_read_input_tokens`."""
    usage = usage or {}
    prompt = usage.get("prompt_tokens") or 0
    details = usage.get("prompt_tokens_details") or {}
    cached = min(details.get("cached_tokens") or 0, prompt)
    return {
        "input_tokens": prompt - cached,
        "output_tokens": usage.get("completion_tokens") or 0,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def response_to_pivot(body: dict[str, Any]) -> Pivot:
    """An Anthropic Message as a pivot `chat.completion`."""
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in body.get("content") or []:
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text") or "")
        elif kind == "tool_use":
            calls.append(
                {
                    "id": block.get("id") or _stable_id("toolu_", body.get("id"), len(calls)),
                    "type": "function",
                    "function": {
                        "name": block.get("name") or "",
                        "arguments": _dumps(block.get("input") or {}),
                    },
                }
            )
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        message["tool_calls"] = calls
    return {
        "id": body.get("id") or _stable_id("chatcmpl-", body),
        "object": "chat.completion",
        "created": 0,
        "model": body.get("model") or "",
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": _STOP_TO_FINISH.get(body.get("stop_reason") or "", "stop"),
            }
        ],
        "usage": _usage_to_pivot(body.get("usage") or {}),
    }


def response_from_pivot(pivot: Pivot, model: str) -> dict[str, Any]:
    """A pivot `chat.completion` as an Anthropic Message answering for `model`."""
    message_id = pivot.get("id") or _stable_id("msg_", pivot)
    choices = pivot.get("choices") or [{}]
    choice = choices[0]
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    text = message.get("content")
    if isinstance(text, list):
        text = "".join(part.get("text") or "" for part in text if part.get("type") == "text")
    if text:
        content.append({"type": "text", "text": text})
    refusal = message.get("refusal")
    if refusal:
        content.append({"type": "text", "text": refusal})
    cut = choice.get("finish_reason") == "length"
    for k, call in enumerate(message.get("tool_calls") or []):
        function = call.get("function") or {}
        content.append(
            {
                "type": "tool_use",
                "id": call.get("id") or _stable_id("toolu_", message_id, k),
                "name": function.get("name") or "",
                "input": _answer_input(
                    function.get("arguments"),
                    f"choices[0].message.tool_calls[{k}].function.arguments",
                    cut,
                ),
            }
        )
    stop = "refusal" if refusal else _FINISH_TO_STOP.get(choice.get("finish_reason"), "end_turn")
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model or pivot.get("model") or "",
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": _usage_from_pivot(pivot.get("usage")),
    }


# -- errors --------------------------------------------------------------------------------


def _anthropic_type(status: int) -> str:
    return _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def _error_fields(body: bytes) -> tuple[str, str | None]:
    """(message, type) of an error body in any shape, JSON or not."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = " ".join(body.decode("utf-8", "replace").split())
        return text[:_MAX_ERROR_TEXT], None
    if isinstance(doc, list) and doc and isinstance(doc[0], dict):
        doc = doc[0]  # Google-style answers wrap the error in a list
    if not isinstance(doc, dict):
        return "", None
    error = doc.get("error")
    if isinstance(error, str):
        return error, None
    if isinstance(error, dict):
        message, kind = error.get("message"), error.get("type")
    else:
        message, kind = doc.get("message"), None
    return (
        message if isinstance(message, str) else "",
        kind if isinstance(kind, str) and kind else None,
    )


def error_to_pivot(status: int, body: bytes) -> Pivot:
    """An Anthropic error body (or any bytes) as a pivot error, status kept."""
    message, kind = _error_fields(body)
    return {
        "error": {
            "message": message or f"upstream answered HTTP {status}",
            "type": kind or pivot_error_type(status),
            "code": None,
        },
        "status": status,
    }


def error_from_pivot(pivot: Pivot) -> dict[str, Any]:
    """A pivot error as Anthropic's error body; the type follows the status unless the pivot
    already names one of Anthropic's types."""
    status = pivot.get("status")
    status = status if isinstance(status, int) else 500
    error = pivot.get("error")
    if not isinstance(error, dict):
        error = {"message": error if isinstance(error, str) else ""}
    kind = error.get("type")
    if kind not in _STATUS_BY_TYPE:
        kind = _anthropic_type(status)
    message = error.get("message") or f"upstream answered HTTP {status}"
    return {"type": "error", "error": {"type": kind, "message": message}}


# -- streams -------------------------------------------------------------------------------


class ToPivot:
    """Anthropic stream events as pivot chunks.

    The first chunk carries `role`; text deltas become `content`, each `tool_use` block a
    tool call (its id and name first, then its `input_json_delta`s as `arguments`);
    `message_delta` gives the chunk with `finish_reason`, and `message_stop` the usage chunk
    and the end (None). `ping`, thinking and unknown events carry nothing for the pivot.
    """

    __slots__ = ("_finished", "_id", "_model", "_role_sent", "_tools", "_usage")

    def __init__(self, model: str) -> None:
        self._model = model
        self._id = ""
        self._role_sent = False
        self._finished = False
        self._tools: dict[int, int] = {}  # Anthropic block index -> pivot tool-call index
        self._usage: dict[str, Any] = {}

    def event(self, name: str | None, data: dict[str, Any]) -> list[Pivot | None]:
        kind = data.get("type") or name
        if kind == "message_start":
            message = data.get("message") or {}
            self._id = message.get("id") or self._id
            self._model = message.get("model") or self._model
            self._usage.update(_present(message.get("usage") or {}))
            return []
        if kind == "content_block_start":
            return self._block_start(data.get("index", 0), data.get("content_block") or {})
        if kind == "content_block_delta":
            return self._block_delta(data.get("index", 0), data.get("delta") or {})
        if kind == "message_delta":
            self._usage.update(_present(data.get("usage") or {}))
            stop = (data.get("delta") or {}).get("stop_reason") or ""
            self._finished = True
            return [self._chunk({}, _STOP_TO_FINISH.get(stop, "stop"))]
        if kind == "message_stop":
            out: list[Pivot | None] = [] if self._finished else [self._chunk({}, "stop")]
            usage_chunk = self._base()
            usage_chunk["choices"] = []
            usage_chunk["usage"] = _usage_to_pivot(self._usage)
            return [*out, usage_chunk, None]
        if kind == "error":
            return [self._error(data.get("error") or {})]
        return []

    def _block_start(self, index: int, block: dict[str, Any]) -> list[Pivot | None]:
        kind = block.get("type")
        if kind == "text":
            text = block.get("text") or ""
            return [self._chunk({"content": text})] if text or not self._role_sent else []
        if kind == "tool_use":
            position = len(self._tools)
            self._tools[index] = position
            given = block.get("input")
            call = {
                "index": position,
                "id": block.get("id") or _stable_id("toolu_", self._id, position),
                "type": "function",
                "function": {
                    "name": block.get("name") or "",
                    "arguments": _dumps(given) if given else "",
                },
            }
            return [self._chunk({"tool_calls": [call]})]
        return []

    def _block_delta(self, index: int, delta: dict[str, Any]) -> list[Pivot | None]:
        kind = delta.get("type")
        if kind == "text_delta" and delta.get("text"):
            return [self._chunk({"content": delta["text"]})]
        if kind == "input_json_delta" and delta.get("partial_json") and index in self._tools:
            call = {"index": self._tools[index], "function": {"arguments": delta["partial_json"]}}
            return [self._chunk({"tool_calls": [call]})]
        return []

    def _base(self) -> Pivot:
        if not self._id:
            self._id = _stable_id("chatcmpl-", self._model)
        return {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": 0,
            "model": self._model,
        }

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> Pivot:
        if not self._role_sent:
            delta = {"role": "assistant", **delta}
            self._role_sent = True
        chunk = self._base()
        chunk["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}]
        return chunk

    @staticmethod
    def _error(error: dict[str, Any]) -> Pivot:
        given = error.get("type")
        kind = given if isinstance(given, str) else "api_error"
        status = _STATUS_BY_TYPE.get(kind, 500)
        message = error.get("message") or f"upstream stream error ({kind})"
        return {"error": {"message": message, "type": kind, "code": None}, "status": status}


def _event(data: dict[str, Any]) -> Event:
    return (data["type"], data)


class FromPivot:
    """Pivot chunks as the Anthropic stream events the official SDK accumulates.

    `message_start` (input usage 0 until known), one block per run of text or per tool
    call (`content_block_start`, `text_delta` / `input_json_delta`, `content_block_stop`),
    then at the end (None) `message_delta` with the stop reason and the final usage, and
    `message_stop`. A pivot error becomes Anthropic's in-band `error` event.
    """

    __slots__ = (
        "_ended",
        "_id",
        "_latest",
        "_model",
        "_next",
        "_open",
        "_refused",
        "_started",
        "_stop",
        "_tools",
        "_usage",
    )

    def __init__(self, model: str) -> None:
        self._model = model
        self._id = ""
        self._started = False
        self._ended = False
        self._next = 0  # the next block's index
        self._open: tuple[int, str] | None = None  # (index, "text" | "tool") of the open block
        self._tools: dict[int | str, int] = {}  # pivot tool-call key (see `_call_key`) -> block
        self._latest: tuple[int | str, str, str] | None = None  # (key, id, name) of the last call
        self._stop = "end_turn"
        self._refused = False
        self._usage: dict[str, Any] | None = None

    def chunk(self, chunk: Pivot | None) -> list[Event]:
        if self._ended:
            return []
        if chunk is None:
            return self._end()
        if "error" in chunk:
            self._ended = True
            return [_event(error_from_pivot(chunk))]
        events = self._start(chunk)
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            for key in ("content", "refusal"):
                if isinstance(delta.get(key), str) and delta[key]:
                    events += self._text(delta[key])
            for call in delta.get("tool_calls") or []:
                events += self._tool_call(call)
            if delta.get("refusal"):
                self._refused = True
            if choice.get("finish_reason"):
                self._stop = _FINISH_TO_STOP.get(choice["finish_reason"], "end_turn")
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        return events

    def _start(self, chunk: Pivot) -> list[Event]:
        if self._started:
            return []
        self._started = True
        self._id = chunk.get("id") or _stable_id("msg_", self._model, chunk)
        message: dict[str, Any] = {
            "id": self._id,
            "type": "message",
            "role": "assistant",
            "model": self._model or chunk.get("model") or "",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return [_event({"type": "message_start", "message": message})]

    def _close(self) -> list[Event]:
        if self._open is None:
            return []
        index, _ = self._open
        self._open = None
        return [_event({"type": "content_block_stop", "index": index})]

    def _open_block(self, kind: str, block: dict[str, Any]) -> list[Event]:
        events = self._close()
        index = self._next
        self._next += 1
        self._open = (index, kind)
        events.append(
            _event({"type": "content_block_start", "index": index, "content_block": block})
        )
        return events

    def _text(self, text: str) -> list[Event]:
        events: list[Event] = []
        if self._open is None or self._open[1] != "text":
            events += self._open_block("text", {"type": "text", "text": ""})
        assert self._open is not None
        delta = {"type": "text_delta", "text": text}
        events.append(
            _event({"type": "content_block_delta", "index": self._open[0], "delta": delta})
        )
        return events

    def _call_key(self, call: dict[str, Any], function: dict[str, Any]) -> int | str:
        """Which call a tool-call delta belongs to: its `index`. Some OpenAI-compatible
        upstreams omit it; then a new `id` (or, without an id, a new `name`) starts a call
        and a delta with neither continues the latest one."""
        index = call.get("index")
        if isinstance(index, int):
            return index
        latest = self._latest
        given, name = call.get("id"), function.get("name")
        if (
            latest is None
            or (given and given != latest[1])
            or (not given and name and name != latest[2])
        ):
            return f"call-{len(self._tools)}"
        return latest[0]

    def _tool_call(self, call: dict[str, Any]) -> list[Event]:
        function = call.get("function") or {}
        position = self._call_key(call, function)
        latest = self._latest or (position, "", "")
        self._latest = (
            position,
            call.get("id") or (latest[1] if latest[0] == position else ""),
            function.get("name") or (latest[2] if latest[0] == position else ""),
        )
        events: list[Event] = []
        if position not in self._tools:
            block: dict[str, Any] = {
                "type": "tool_use",
                "id": call.get("id") or _stable_id("toolu_", self._id, position),
                "name": function.get("name") or "",
                "input": {},
            }
            events += self._open_block("tool", block)
            self._tools[position] = self._next - 1
        arguments = function.get("arguments")
        if arguments:
            delta = {"type": "input_json_delta", "partial_json": arguments}
            index = self._tools[position]
            events.append(_event({"type": "content_block_delta", "index": index, "delta": delta}))
        return events

    def _end(self) -> list[Event]:
        events = self._start({})
        events += self._close()
        self._ended = True
        stop = "refusal" if self._refused else self._stop
        delta = {"stop_reason": stop, "stop_sequence": None}
        usage = _usage_from_pivot(self._usage)
        events.append(_event({"type": "message_delta", "delta": delta, "usage": usage}))
        events.append(_event({"type": "message_stop"}))
        return events
