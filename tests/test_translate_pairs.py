"""Every (caller format, upstream format) pair through `sidecar.translate.Translation`.

The format modules have their own tests against the pivot; these check the six
directed pairs end to end, on fixtures written here in each format's own wire shape:
a conversation with a system prompt, a tool definition, a tool call and its result
and an image goes out in the upstream's shape, and an answer, a stream (split at
every byte) and an error come back in the caller's. Pure: no servers.
"""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest

from sidecar.translate import SseTranslator, Translation, Unsupported

FORMATS = ("openai", "anthropic", "gemini")
PAIRS = [(c, u) for c, u in itertools.permutations(FORMATS, 2)]
PNG = "iVBORw0KGgo="
MODEL = {"openai": "gpt-4o-mini", "anthropic": "claude-haiku-4-5", "gemini": "gemini-2.5-flash"}
TOOL_SCHEMA = {"type": "object", "properties": {"location": {"type": "string"}},
               "required": ["location"]}  # fmt: skip


# --------------------------------------------------------------------------- requests


def conversation(fmt: str) -> dict[str, Any]:
    """System prompt, a user turn with an image, a tool call, its result, a follow-up."""
    if fmt == "openai":
        return {
            "model": MODEL["openai"],
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [
                    {"type": "text", "text": "weather here?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                ]},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"location":"Paris"}'}},
                ]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                {"role": "user", "content": "thanks"},
            ],
            "tools": [{"type": "function", "function": {"name": "get_weather",
                                                        "parameters": TOOL_SCHEMA}}],
            "max_tokens": 50, "temperature": 0.5, "stop": ["END"],
        }  # fmt: skip
    if fmt == "anthropic":
        return {
            "model": MODEL["anthropic"],
            "system": "be brief",
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "weather here?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                 "data": PNG}},
                ]},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "call_1", "name": "get_weather",
                     "input": {"location": "Paris"}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"},
                    {"type": "text", "text": "thanks"},
                ]},
            ],
            "tools": [{"name": "get_weather", "input_schema": TOOL_SCHEMA}],
            "max_tokens": 50, "temperature": 0.5, "stop_sequences": ["END"],
        }  # fmt: skip
    return {
        "systemInstruction": {"parts": [{"text": "be brief"}]},
        "contents": [
            {"role": "user", "parts": [
                {"text": "weather here?"}, {"inlineData": {"mimeType": "image/png", "data": PNG}},
            ]},
            {"role": "model", "parts": [
                {"functionCall": {"id": "call_1", "name": "get_weather",
                                  "args": {"location": "Paris"}}},
            ]},
            {"role": "user", "parts": [
                {"functionResponse": {"id": "call_1", "name": "get_weather",
                                      "response": {"result": "sunny"}}},
            ]},
            {"role": "user", "parts": [{"text": "thanks"}]},
        ],
        "tools": [{"functionDeclarations": [{"name": "get_weather",
                                             "parametersJsonSchema": TOOL_SCHEMA}]}],
        "generationConfig": {"maxOutputTokens": 50, "temperature": 0.5,
                             "stopSequences": ["END"]},
    }  # fmt: skip


def read_request(fmt: str, body: dict[str, Any]) -> dict[str, Any]:
    """What a request asks, in words that do not depend on its format."""
    if fmt == "openai":
        msgs = body["messages"]
        system = " ".join(str(m["content"]) for m in msgs if m["role"] in ("system", "developer"))
        calls = [(c["function"]["name"], orjson.loads(c["function"]["arguments"]))
                 for m in msgs for c in m.get("tool_calls") or ()]  # fmt: skip
        results = [str(m["content"]) for m in msgs if m["role"] == "tool"]
        images = [p for m in msgs if isinstance(m.get("content"), list)
                  for p in m["content"] if p.get("type") == "image_url"]  # fmt: skip
        tools = [t["function"]["name"] for t in body.get("tools", [])]
        return {"system": system, "calls": calls, "results": results, "images": len(images),
                "tools": tools, "max": body.get("max_tokens") or body.get("max_completion_tokens"),
                "temperature": body.get("temperature"), "stop": body.get("stop")}  # fmt: skip
    if fmt == "anthropic":
        system = body.get("system")
        if isinstance(system, list):
            system = " ".join(b["text"] for b in system)
        blocks = [b for m in body["messages"] if isinstance(m["content"], list) for b in m["content"]]
        results = []
        for b in blocks:
            if b["type"] == "tool_result":
                c = b["content"]
                results.append(c if isinstance(c, str) else " ".join(x["text"] for x in c))
        return {"system": system, "calls": [(b["name"], b["input"]) for b in blocks
                                            if b["type"] == "tool_use"],
                "results": results, "images": sum(b["type"] == "image" for b in blocks),
                "tools": [t["name"] for t in body.get("tools", [])], "max": body["max_tokens"],
                "temperature": body.get("temperature"), "stop": body.get("stop_sequences")}  # fmt: skip
    parts = [p for c in body["contents"] for p in c["parts"]]
    results = []
    for p in parts:
        if "functionResponse" in p:
            r = p["functionResponse"]["response"]
            results.append(r["result"] if set(r) == {"result"} else orjson.dumps(r).decode())
    gen = body.get("generationConfig", {})
    return {"system": " ".join(p["text"] for p in body["systemInstruction"]["parts"]),
            "calls": [(p["functionCall"]["name"], p["functionCall"]["args"]) for p in parts
                      if "functionCall" in p],
            "results": results, "images": sum("inlineData" in p for p in parts),
            "tools": [d["name"] for t in body["tools"] for d in t["functionDeclarations"]],
            "max": gen.get("maxOutputTokens"), "temperature": gen.get("temperature"),
            "stop": gen.get("stopSequences")}  # fmt: skip


@pytest.mark.parametrize(("caller", "upstream"), PAIRS)
def test_a_conversation_goes_out_in_the_upstreams_shape(caller: str, upstream: str) -> None:
    sent = Translation(caller, upstream).request(conversation(caller), MODEL[upstream], False)
    want = read_request(caller, conversation(caller))
    got = read_request(upstream, sent)
    assert got == want
    assert want["calls"] == [("get_weather", {"location": "Paris"})]
    assert want["results"] == ["sunny"]
    if upstream == "gemini":
        assert "model" not in sent  # Gemini's model is in the URL
    else:
        assert sent["model"] == MODEL[upstream]


@pytest.mark.parametrize(("caller", "upstream"), PAIRS)
def test_a_request_for_a_stream_asks_the_upstream_for_one(caller: str, upstream: str) -> None:
    body = conversation(caller)
    if caller != "gemini":
        body["stream"] = True
    sent = Translation(caller, upstream).request(body, MODEL[upstream], True)
    if upstream == "openai":
        assert sent["stream"] is True
        assert sent["stream_options"] == {"include_usage": True}  # always metered
    elif upstream == "anthropic":
        assert sent["stream"] is True
    else:
        assert "stream" not in sent  # Gemini streams by URL (`:streamGenerateContent`)


UNCARRIED = [
    ("openai", "anthropic", {"logprobs": True}, "logprobs"),
    ("openai", "gemini", {"parallel_tool_calls": False}, "parallel_tool_calls"),
    ("openai", "anthropic", {"brand_new_field": 1}, "brand_new_field"),
    ("anthropic", "openai", {"thinking": {"type": "enabled", "budget_tokens": 2000}}, "thinking"),
    ("anthropic", "gemini", {"top_k": 5, "service_tier": "auto"}, "service_tier"),
    ("gemini", "openai", {"safetySettings": []}, "safetySettings"),
    ("gemini", "anthropic", {"cachedContent": "cachedContents/1"}, "cachedContent"),
    ("anthropic", "openai", {"top_k": 5}, "top_k"),
]


@pytest.mark.parametrize(("caller", "upstream", "extra", "field"), UNCARRIED)
def test_what_cannot_be_carried_is_refused_by_name(
    caller: str, upstream: str, extra: dict[str, Any], field: str
) -> None:
    with pytest.raises(Unsupported) as info:
        Translation(caller, upstream).request(
            {**conversation(caller), **extra}, MODEL[upstream], False
        )
    assert field in info.value.field


def test_top_k_crosses_between_the_formats_that_have_it() -> None:
    body = {**conversation("anthropic"), "top_k": 7}
    assert Translation("anthropic", "gemini").request(body, MODEL["gemini"], False)[
        "generationConfig"
    ]["topK"] == 7


# --------------------------------------------------------------------------- answers


def answer(fmt: str, *, tool: bool) -> dict[str, Any]:
    """An upstream's whole answer: text, or a tool call; 4 tokens in, 5 out."""
    if fmt == "openai":
        msg: dict[str, Any] = {"role": "assistant", "content": None if tool else "Hi there."}
        if tool:
            msg["tool_calls"] = [{"id": "call_9", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"location":"Paris"}'}}]  # fmt: skip
        return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
                "choices": [{"index": 0, "message": msg,
                             "finish_reason": "tool_calls" if tool else "stop"}],
                "usage": {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}}  # fmt: skip
    if fmt == "anthropic":
        block = ({"type": "tool_use", "id": "call_9", "name": "get_weather",
                  "input": {"location": "Paris"}} if tool
                 else {"type": "text", "text": "Hi there."})  # fmt: skip
        return {"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
                "content": [block], "stop_reason": "tool_use" if tool else "end_turn",
                "stop_sequence": None, "usage": {"input_tokens": 4, "output_tokens": 5}}  # fmt: skip
    part = ({"functionCall": {"id": "call_9", "name": "get_weather",
                              "args": {"location": "Paris"}}} if tool else {"text": "Hi there."})  # fmt: skip
    return {"candidates": [{"content": {"role": "model", "parts": [part]},
                            "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": 5,
                              "totalTokenCount": 9},
            "modelVersion": "m", "responseId": "r1"}  # fmt: skip


def read_answer(fmt: str, doc: dict[str, Any]) -> tuple[str, list[Any], str, tuple[int, int]]:
    """(text, tool calls as (id, name, args), finish, (input, output tokens))."""
    if fmt == "openai":
        choice = doc["choices"][0]
        msg = choice["message"]
        calls = [(c["id"], c["function"]["name"], orjson.loads(c["function"]["arguments"]))
                 for c in msg.get("tool_calls") or ()]  # fmt: skip
        u = doc["usage"]
        finish = {"stop": "stop", "tool_calls": "tool"}[choice["finish_reason"]]
        return msg["content"] or "", calls, finish, (u["prompt_tokens"], u["completion_tokens"])
    if fmt == "anthropic":
        text = "".join(b["text"] for b in doc["content"] if b["type"] == "text")
        calls = [(b["id"], b["name"], b["input"]) for b in doc["content"] if b["type"] == "tool_use"]
        finish = {"end_turn": "stop", "tool_use": "tool"}[doc["stop_reason"]]
        u = doc["usage"]
        return text, calls, finish, (u["input_tokens"], u["output_tokens"])
    parts = doc["candidates"][0]["content"]["parts"]
    text = "".join(p.get("text", "") for p in parts)
    calls = [(p["functionCall"].get("id"), p["functionCall"]["name"], p["functionCall"]["args"])
             for p in parts if "functionCall" in p]  # fmt: skip
    assert doc["candidates"][0]["finishReason"] == "STOP"
    u = doc["usageMetadata"]
    return text, calls, "tool" if calls else "stop", (u["promptTokenCount"],
                                                       u["candidatesTokenCount"])


@pytest.mark.parametrize("tool", [False, True], ids=["text", "tool_call"])
@pytest.mark.parametrize(("caller", "upstream"), PAIRS)
def test_an_answer_comes_back_in_the_callers_shape(caller: str, upstream: str, tool: bool) -> None:
    raw = orjson.dumps(answer(upstream, tool=tool))
    out = Translation(caller, upstream).response(raw, MODEL[upstream])
    assert out is not None
    got = read_answer(caller, orjson.loads(out))
    want = read_answer(upstream, answer(upstream, tool=tool))
    assert got == want


@pytest.mark.parametrize(("caller", "upstream"), PAIRS)
def test_an_unreadable_answer_is_none_not_a_crash(caller: str, upstream: str) -> None:
    tr = Translation(caller, upstream)
    assert tr.response(b"not json", "m") is None
    assert tr.response(b"[1, 2]", "m") is None


# --------------------------------------------------------------------------- errors


NATIVE_ERRORS = {
    "openai": b'{"error": {"message": "slow down", "type": "rate_limit_error", "code": null}}',
    "anthropic": b'{"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}',
    "gemini": b'{"error": {"code": 429, "message": "slow down", "status": "RESOURCE_EXHAUSTED"}}',
}


def read_error(fmt: str, doc: dict[str, Any]) -> str:
    if fmt == "anthropic":
        assert doc["type"] == "error"
        assert doc["error"]["type"] == "rate_limit_error"
    elif fmt == "gemini":
        assert doc["error"]["code"] == 429
        assert doc["error"]["status"] == "RESOURCE_EXHAUSTED"
    return str(doc["error"]["message"])


@pytest.mark.parametrize(("caller", "upstream"), PAIRS)
def test_an_error_comes_back_in_the_callers_shape(caller: str, upstream: str) -> None:
    out = Translation(caller, upstream).error(429, NATIVE_ERRORS[upstream])
    assert read_error(caller, orjson.loads(out)) == "slow down"


@pytest.mark.parametrize(("caller", "upstream"), PAIRS)
def test_an_error_body_that_is_not_json_still_says_something(caller: str, upstream: str) -> None:
    out = orjson.loads(Translation(caller, upstream).error(502, b"<html>bad gateway</html>"))
    assert "bad gateway" in orjson.dumps(out).decode()


# --------------------------------------------------------------------------- streams


def sse(events: list[tuple[str | None, Any]], crlf: bool = False) -> bytes:
    end = b"\r\n\r\n" if crlf else b"\n\n"
    nl = b"\r\n" if crlf else b"\n"
    out = b""
    for name, data in events:
        head = b"event: " + name.encode() + nl if name else b""
        body = data if isinstance(data, bytes) else orjson.dumps(data)
        out += head + b"data: " + body + end
    return out


def upstream_stream(fmt: str, *, tool: bool = False) -> bytes:
    """A complete stream of "Hi there." (or a tool call) with usage 4 in, 5 out."""
    if fmt == "openai":
        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
        deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
        if tool:
            deltas += [
                {"tool_calls": [{"index": 0, "id": "call_9", "type": "function",
                                 "function": {"name": "get_weather", "arguments": ""}}]},
                {"tool_calls": [{"index": 0, "function": {"arguments": '{"locat'}}]},
                {"tool_calls": [{"index": 0, "function": {"arguments": 'ion":"Paris"}'}}]},
            ]  # fmt: skip
        else:
            deltas += [{"content": "Hi "}, {"content": "there."}]
        events: list[tuple[str | None, Any]] = [
            (None, {**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]})
            for d in deltas
        ]
        events.append((None, {**base, "choices": [{"index": 0, "delta": {},
                                                   "finish_reason": "tool_calls" if tool else "stop"}]}))  # fmt: skip
        events.append((None, {**base, "choices": [], "usage": {
            "prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}}))  # fmt: skip
        events.append((None, b"[DONE]"))
        return sse(events)
    if fmt == "anthropic":
        start = {"type": "message_start", "message": {"id": "msg_1", "type": "message",
                 "role": "assistant", "model": "m", "content": [], "stop_reason": None,
                 "stop_sequence": None, "usage": {"input_tokens": 4, "output_tokens": 1}}}  # fmt: skip
        if tool:
            blocks = [
                {"type": "content_block_start", "index": 0, "content_block": {
                    "type": "tool_use", "id": "call_9", "name": "get_weather", "input": {}}},
                {"type": "content_block_delta", "index": 0, "delta": {
                    "type": "input_json_delta", "partial_json": '{"locat'}},
                {"type": "content_block_delta", "index": 0, "delta": {
                    "type": "input_json_delta", "partial_json": 'ion":"Paris"}'}},
            ]  # fmt: skip
        else:
            blocks = [
                {"type": "content_block_start", "index": 0,
                 "content_block": {"type": "text", "text": ""}},
                {"type": "content_block_delta", "index": 0,
                 "delta": {"type": "text_delta", "text": "Hi "}},
                {"type": "content_block_delta", "index": 0,
                 "delta": {"type": "text_delta", "text": "there."}},
            ]  # fmt: skip
        tail = [
            {"type": "content_block_stop", "index": 0},
            {"type": "message_delta", "delta": {"stop_reason": "tool_use" if tool else "end_turn",
                                                "stop_sequence": None},
             "usage": {"output_tokens": 5}},
            {"type": "message_stop"},
        ]  # fmt: skip
        return sse([(e["type"], e) for e in [start, {"type": "ping"}, *blocks, *tail]])
    usage = {"promptTokenCount": 4, "candidatesTokenCount": 5, "totalTokenCount": 9}
    if tool:
        parts = [[{"functionCall": {"id": "call_9", "name": "get_weather",
                                    "args": {"location": "Paris"}}}]]  # fmt: skip
    else:
        parts = [[{"text": "Hi "}], [{"text": "there."}]]
    chunks = [{"candidates": [{"content": {"role": "model", "parts": p}, "index": 0}],
               "modelVersion": "m", "responseId": "r1"} for p in parts]  # fmt: skip
    chunks[-1]["candidates"][0]["finishReason"] = "STOP"
    chunks[-1]["usageMetadata"] = usage
    return sse([(None, c) for c in chunks], crlf=True)


def events_of(raw: bytes) -> list[tuple[str | None, Any]]:
    out: list[tuple[str | None, Any]] = []
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        if not block.strip():
            continue
        name = None
        data = b""
        for line in block.split(b"\n"):
            if line.startswith(b"event: "):
                name = line[7:].decode()
            elif line.startswith(b"data: "):
                data = line[6:]
        out.append((name, None if data == b"[DONE]" else orjson.loads(data)))
    return out


def read_stream(fmt: str, raw: bytes) -> tuple[str, list[Any], str | None, tuple[int, int], bool]:
    """(text, tool calls (name, args), finish, usage, terminated) as an SDK would assemble."""
    text = ""
    args: dict[int, list[str]] = {}
    names: dict[int, str] = {}
    finish = None
    usage = (0, 0)
    done = False
    for name, data in events_of(raw):
        if fmt == "openai":
            if data is None:
                done = True
                continue
            if data.get("usage"):
                usage = (data["usage"]["prompt_tokens"], data["usage"]["completion_tokens"])
            for ch in data["choices"]:
                text += ch["delta"].get("content") or ""
                for tc in ch["delta"].get("tool_calls") or ():
                    if tc.get("function", {}).get("name"):
                        names[tc["index"]] = tc["function"]["name"]
                    args.setdefault(tc["index"], []).append(tc["function"].get("arguments") or "")
                finish = ch.get("finish_reason") or finish
        elif fmt == "anthropic":
            assert name == data["type"]
            kind = data["type"]
            if kind == "message_start":
                usage = (data["message"]["usage"]["input_tokens"], 0)
            elif kind == "content_block_start" and data["content_block"]["type"] == "tool_use":
                names[data["index"]] = data["content_block"]["name"]
            elif kind == "content_block_delta":
                d = data["delta"]
                if d["type"] == "text_delta":
                    text += d["text"]
                else:
                    args.setdefault(data["index"], []).append(d["partial_json"])
            elif kind == "message_delta":
                finish = data["delta"]["stop_reason"]
                u = data["usage"]
                usage = (u.get("input_tokens") or usage[0], u["output_tokens"])
            elif kind == "message_stop":
                done = True
        else:
            cand = data["candidates"][0]
            for i, part in enumerate(cand.get("content", {}).get("parts", [])):
                text += part.get("text", "")
                if "functionCall" in part:
                    names[i] = part["functionCall"]["name"]
                    args[i] = [orjson.dumps(part["functionCall"]["args"]).decode()]
            finish = cand.get("finishReason") or finish
            if "usageMetadata" in data:
                m = data["usageMetadata"]
                usage = (m["promptTokenCount"], m["candidatesTokenCount"])
            done = finish is not None
    calls = [(names[i], orjson.loads("".join(args[i]))) for i in sorted(names)]
    canonical = {"stop": "stop", "end_turn": "stop", "STOP": "stop", "tool_calls": "tool",
                 "tool_use": "tool"}  # fmt: skip
    if fmt == "gemini" and calls:
        finish = "tool_calls"
    return text, calls, canonical.get(finish or "", finish), usage, done


@pytest.mark.parametrize("tool", [False, True], ids=["text", "tool_call"])
@pytest.mark.parametrize(("caller", "upstream"), PAIRS)
def test_a_stream_is_rebuilt_in_the_callers_shape(caller: str, upstream: str, tool: bool) -> None:
    raw = upstream_stream(upstream, tool=tool)
    want = read_stream(upstream, raw)
    assert want[4]
    whole = Translation(caller, upstream).stream(MODEL[upstream])
    out = whole.feed(raw) + whole.finish()
    assert read_stream(caller, out) == want
    # Split anywhere (every 7 bytes, so inside `\r\n` pairs too): the same events.
    split = Translation(caller, upstream).stream(MODEL[upstream])
    pieces = b"".join(split.feed(raw[i : i + 7]) for i in range(0, len(raw), 7)) + split.finish()
    assert events_of(pieces) == events_of(out)


@pytest.mark.parametrize(("caller", "upstream"), PAIRS)
def test_a_stream_cut_short_is_not_completed(caller: str, upstream: str) -> None:
    raw = upstream_stream(upstream)
    cut = raw[: len(raw) // 2]
    tr = Translation(caller, upstream).stream(MODEL[upstream])
    out = tr.feed(cut) + tr.finish()
    text, _, _, _, done = read_stream(caller, out)
    assert not done
    assert "Hi there."[: len(text)] == text


@pytest.mark.parametrize(("caller", "upstream"), PAIRS)
def test_an_in_band_error_becomes_the_callers_error_event(caller: str, upstream: str) -> None:
    err: tuple[str | None, Any]
    if upstream == "openai":
        err = (None, {"error": {"message": "boom", "type": "server_error", "code": None}})
    elif upstream == "anthropic":
        err = ("error", {"type": "error", "error": {"type": "overloaded_error",
                                                     "message": "boom"}})  # fmt: skip
    else:
        err = (None, {"error": {"code": 503, "message": "boom", "status": "UNAVAILABLE"}})
    tr = Translation(caller, upstream).stream(MODEL[upstream])
    (name, data), *_ = events_of(tr.feed(sse([err])))
    if caller == "anthropic":
        assert name == "error"
        assert data["error"]["message"] == "boom"
    else:
        assert data["error"]["message"] == "boom"
        if caller == "gemini":
            assert data["error"]["code"] >= 500


@pytest.mark.parametrize(("caller", "upstream"), PAIRS)
def test_garbage_from_the_upstream_is_malformed_for_the_caller(caller: str, upstream: str) -> None:
    tr = Translation(caller, upstream).stream(MODEL[upstream])
    out = tr.feed(b'data: {"choices": [{"delta": {"content": "oops\n\n')
    assert out == b"data: {malformed\n\n"  # the caller's tracker fails the stream over
    assert tr.feed(upstream_stream(upstream)) == b""  # nothing after it


def test_an_event_held_past_the_limit_is_malformed() -> None:
    tr = Translation("openai", "anthropic").stream("m")
    assert isinstance(tr, SseTranslator)
    out = b""
    chunk = b"data: " + b"x" * (1 << 20)
    for _ in range(17):
        out += tr.feed(chunk)
    assert out == b"data: {malformed\n\n"


def test_comments_and_keep_alives_are_not_events() -> None:
    tr = Translation("openai", "anthropic").stream("m")
    assert tr.feed(b": keep-alive\n\nevent: ping\ndata: {\"type\": \"ping\"}\n\n") == b""


def test_an_upstream_side_refusal_names_the_callers_own_field() -> None:
    """A field the upstream's format refuses is named where the caller put it, not by the
    pivot's (OpenAI chat) name for it."""
    with pytest.raises(Unsupported) as info:
        Translation("gemini", "anthropic").request(
            {"contents": [{"parts": [{"text": "hi"}]}],
             "generationConfig": {"presencePenalty": 0.5}}, MODEL["anthropic"], False)  # fmt: skip
    assert info.value.field == "generationConfig.presencePenalty"
    body = {"model": "x", "max_tokens": 10, "system": "Be brief.", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image", "source": {
            "type": "url", "url": "https://example.com/cat"}}]}]}  # fmt: skip
    with pytest.raises(Unsupported) as info:
        Translation("anthropic", "gemini").request(body, MODEL["gemini"], False)
    assert info.value.field == "messages[0].content[1].source.url"


@pytest.mark.parametrize(("caller", "upstream"), PAIRS)
def test_a_stream_split_at_every_byte_gives_the_same_events(caller: str, upstream: str) -> None:
    raw = upstream_stream(upstream, tool=True)
    whole = Translation(caller, upstream).stream(MODEL[upstream])
    want = events_of(whole.feed(raw) + whole.finish())
    tr = Translation(caller, upstream).stream(MODEL[upstream])
    got = b"".join(tr.feed(raw[i : i + 1]) for i in range(len(raw))) + tr.finish()
    assert events_of(got) == want


@pytest.mark.parametrize("caller", ["anthropic", "gemini"])
def test_a_finished_answer_that_lost_its_terminator_is_ended_for_the_caller(caller: str) -> None:
    """OpenAI's `[DONE]` lost after the finish and the usage: the answer was whole, so the
    caller's stream is ended (Anthropic `message_stop`, Gemini's last chunk), not broken."""
    raw = upstream_stream("openai").replace(b"data: [DONE]\n\n", b"")
    tr = Translation(caller, "openai").stream(MODEL["openai"])
    out = tr.feed(raw)
    assert not read_stream(caller, out)[4]  # not ended before EOF
    out += tr.finish()
    whole = read_stream("openai", upstream_stream("openai"))
    assert read_stream(caller, out) == (*whole[:4], True)


def test_an_unfinished_answer_is_not_ended_at_eof() -> None:
    raw = upstream_stream("anthropic")
    cut = raw[: raw.index(b"event: message_delta")]
    tr = Translation("openai", "anthropic").stream(MODEL["anthropic"])
    out = tr.feed(cut) + tr.finish()
    assert not read_stream("openai", out)[4]


@pytest.mark.parametrize(("model", "field"), [("o3-mini", "max_completion_tokens"),
                                              ("gpt-5", "max_completion_tokens"),
                                              ("gpt-4o-mini", "max_tokens")])  # fmt: skip
def test_openais_reasoning_models_get_max_completion_tokens(model: str, field: str) -> None:
    """Anthropic callers always send `max_tokens`; OpenAI's reasoning models refuse it."""
    sent = Translation("anthropic", "openai").request(conversation("anthropic"), model, False)
    assert sent[field] == 50
    other = "max_tokens" if field == "max_completion_tokens" else "max_completion_tokens"
    assert other not in sent


@pytest.mark.parametrize(("caller", "upstream"), PAIRS)
def test_a_200_that_is_not_an_answer_is_not_translated_into_one(caller: str, upstream: str) -> None:
    tr = Translation(caller, upstream)
    assert tr.response(b'{"error": {"message": "Provider returned error"}}', "m") is None
    assert tr.response(b'{"object": "list", "data": []}', "m") is None


@pytest.mark.parametrize("caller", ["anthropic", "gemini"])
def test_an_answer_with_a_null_error_field_is_still_an_answer(caller: str) -> None:
    doc = {**answer("openai", tool=False), "error": None}
    assert Translation(caller, "openai").response(orjson.dumps(doc), "m") is not None


# -- found by review: odd input is a clear refusal or a malformed event, never a crash ----------


@pytest.mark.parametrize("entry", [{"x": 1}, ["a"], 3, None])
@pytest.mark.parametrize(("where", "upstream"), [("tool", "openai"), ("tool", "anthropic"),
                                                 ("response", "openai")])  # fmt: skip
def test_a_property_ordering_that_is_not_names_is_refused_not_a_crash(
    entry: Any, where: str, upstream: str
) -> None:
    schema = {"type": "OBJECT", "properties": {"a": {"type": "STRING"}},
              "propertyOrdering": ["a", entry]}  # fmt: skip
    body: dict[str, Any] = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    if where == "tool":
        body["tools"] = [{"functionDeclarations": [{"name": "f", "parameters": schema}]}]
    else:
        body["generationConfig"] = {"responseMimeType": "application/json",
                                    "responseSchema": schema}  # fmt: skip
    with pytest.raises(Unsupported) as info:
        Translation("gemini", upstream).request(body, MODEL[upstream], False)
    assert "propertyOrdering" in info.value.field


@pytest.mark.parametrize("caller", ["anthropic", "gemini"])
@pytest.mark.parametrize("usage", [{"prompt_tokens": "7", "completion_tokens": 2},
                                   {"prompt_tokens": "abc", "completion_tokens": 2},
                                   {"prompt_tokens": 7, "completion_tokens": [2]}])  # fmt: skip
@pytest.mark.parametrize("end", ["done", "eof"])
def test_a_usage_the_translation_cannot_read_is_malformed_not_a_crash(
    caller: str, usage: dict[str, Any], end: str
) -> None:
    """The usage is read when the answer ends: at `[DONE]`, or at EOF after the finish. What
    cannot be read as a number makes the stream malformed for the caller (its tracker then
    decides); it never raises out of the translator."""
    raw = upstream_stream("openai")
    events = [(None, e) for e in sse_data_objects(raw)]
    events.append((None, {"id": "x", "object": "chat.completion.chunk", "choices": [], "usage": usage}))
    tr = Translation(caller, "openai").stream(MODEL["openai"])
    out = tr.feed(sse(events))
    out += tr.feed(b"data: [DONE]\n\n") if end == "done" else tr.finish()
    assert out.endswith(b"data: {malformed\n\n") or read_stream(caller, out)[4]


def sse_data_objects(raw: bytes) -> list[Any]:
    """The JSON objects of an OpenAI stream, without its usage chunk and `[DONE]`."""
    return [obj for name, obj in events_of(raw) if isinstance(obj, dict) and obj.get("choices")]


def test_a_tool_call_the_callers_format_holds_back_is_content_held() -> None:
    """A Gemini caller gets function calls whole, at the end; the upstream's first tool-call
    delta is content all the same, which the tracker reports as held."""
    from sidecar.streams import Shape, StreamTracker

    tracker = StreamTracker(Shape.GEMINI, pre=Translation("gemini", "openai").stream(MODEL["openai"]))
    role = {"id": "x", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}  # fmt: skip
    assert tracker.feed(sse([(None, role)])) == b""
    assert not tracker.started  # an empty preamble is not content
    call = {"id": "x", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {
        "tool_calls": [{"index": 0, "id": "c1", "type": "function",
                        "function": {"name": "write_file", "arguments": "{\"pa"}}]},
        "finish_reason": None}]}  # fmt: skip
    assert tracker.feed(sse([(None, call)])) == b""  # held until the end, as Gemini sends calls
    assert tracker.content_held  # the upstream is answering (the hold now waits per gap)
    assert not tracker.started  # but nothing reached the caller: it can still fail over
