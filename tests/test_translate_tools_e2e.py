"""Tool calls, images and request fields across formats, end to end
(docs/reference.md#translation).

The official `openai`, `anthropic` and `google-genai` SDKs, unchanged, call OpenAI,
Anthropic and Gemini models through one sidecar and one mock upstream (the fixture of
`tests.test_translate_e2e`). Each test compares what the SDK parsed with what the mock
answered, and what the mock received (its request log) with what the SDK sent, in
each side's own wire format.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

import anthropic
import openai
import pytest
from google.genai import types as gtypes

from tests.test_translate_e2e import CALLERS, MODELS, REPLY, World, _png, ask, world

pytestmark = pytest.mark.asyncio(loop_scope="module")
__all__ = ["world"]  # the module-scoped fixture, re-used: one sidecar and one mock

QUESTION = "What is the weather in Paris?"
RESULT = "sunny, 22C"
TOOL = "get_weather"
ARGS = {"location": "Paris"}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"location": {"type": "string", "description": "a city"}},
    "required": ["location"],
}
FINISH_ON_CALL = {"openai": "tool_calls", "anthropic": "tool_use", "gemini": "STOP"}
MOCK_ID_PREFIX = {"openai": "call_mock_", "anthropic": "toolu_mock_"}
IMAGE_URL = "https://example.com/photos/cat.png"


# --------------------------------------------------------------------------- tool round trip


@dataclass
class ToolCall:
    """A tool call as the caller's SDK parsed it."""

    id: str | None
    name: str
    args: dict[str, Any]
    finish: str | None


def _openai_tools() -> list[dict[str, Any]]:
    function = {"name": TOOL, "description": "The weather in a city", "parameters": SCHEMA}
    return [{"type": "function", "function": function}]


def _anthropic_tools() -> list[dict[str, Any]]:
    return [{"name": TOOL, "description": "The weather in a city", "input_schema": SCHEMA}]


def _gemini_config(*first: gtypes.FunctionDeclaration) -> gtypes.GenerateContentConfig:
    """get_weather declared (after `first`, if any)."""
    declaration = gtypes.FunctionDeclaration(
        name=TOOL,
        description="The weather in a city",
        parameters=gtypes.Schema(
            type=gtypes.Type.OBJECT,
            properties={"location": gtypes.Schema(type=gtypes.Type.STRING, description="a city")},
            required=["location"],
        ),
    )
    tool = gtypes.Tool(function_declarations=[*first, declaration])
    return gtypes.GenerateContentConfig(tools=[tool])


async def _openai_chat(w: World, model: str, stream: bool, messages: list[Any]) -> Any:
    """The assistant message and finish reason, as the SDK (or its stream helper) parsed them."""
    client = w.openai()
    if stream:
        async with client.chat.completions.stream(
            model=model, messages=messages, tools=_openai_tools()
        ) as s:
            done = await s.get_final_completion()
    else:
        done = await client.chat.completions.create(
            model=model, messages=messages, tools=_openai_tools()
        )
    return done.choices[0]


async def _anthropic_chat(w: World, model: str, stream: bool, messages: list[Any]) -> Any:
    kwargs: dict[str, Any] = {"model": model, "max_tokens": 256, "messages": messages}
    kwargs["tools"] = _anthropic_tools()
    if stream:
        async with w.anthropic().messages.stream(**kwargs) as s:
            return await s.get_final_message()
    return await w.anthropic().messages.create(**kwargs)


async def _gemini_chat(w: World, model: str, stream: bool, contents: list[Any]) -> list[Any]:
    """Every response (one, or each stream chunk)."""
    aio = w.gemini().aio.models
    if stream:
        chunks = await aio.generate_content_stream(
            model=model, contents=contents, config=_gemini_config()
        )
        return [c async for c in chunks]
    return [await aio.generate_content(model=model, contents=contents, config=_gemini_config())]


def _gemini_question() -> gtypes.Content:
    return gtypes.Content(role="user", parts=[gtypes.Part(text=QUESTION)])


async def call_tool(w: World, caller: str, model: str, stream: bool) -> ToolCall:
    """Turn 1: the question, with get_weather offered in the caller's format."""
    if caller == "openai":
        choice = await _openai_chat(w, model, stream, [{"role": "user", "content": QUESTION}])
        calls = choice.message.tool_calls or []
        assert len(calls) == 1, choice.message
        fn = calls[0].function
        return ToolCall(calls[0].id, fn.name, json.loads(fn.arguments), choice.finish_reason)
    if caller == "anthropic":
        msg = await _anthropic_chat(w, model, stream, [{"role": "user", "content": QUESTION}])
        uses = [b for b in msg.content if b.type == "tool_use"]
        assert len(uses) == 1, msg.content
        return ToolCall(uses[0].id, uses[0].name, dict(uses[0].input), msg.stop_reason)
    chunks = await _gemini_chat(w, model, stream, [_gemini_question()])
    calls = [fc for c in chunks for fc in (c.function_calls or [])]
    assert len(calls) == 1, chunks
    last = chunks[-1].candidates[0]
    finish = last.finish_reason.value if last.finish_reason else None
    return ToolCall(calls[0].id, calls[0].name or "", dict(calls[0].args or {}), finish)


async def send_result(w: World, caller: str, model: str, stream: bool, call: ToolCall) -> str:
    """Turn 2: the conversation with the call and its result, in the caller's format; the text."""
    if caller == "openai":
        function = {"name": call.name, "arguments": json.dumps(call.args)}
        messages: list[Any] = [
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": call.id, "type": "function", "function": function}]},
            {"role": "tool", "tool_call_id": call.id, "content": RESULT},
        ]  # fmt: skip
        choice = await _openai_chat(w, model, stream, messages)
        assert not choice.message.tool_calls
        return str(choice.message.content or "")
    if caller == "anthropic":
        use = {"type": "tool_use", "id": call.id, "name": call.name, "input": call.args}
        result = {"type": "tool_result", "tool_use_id": call.id, "content": RESULT}
        messages = [
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": [use]},
            {"role": "user", "content": [result]},
        ]
        msg = await _anthropic_chat(w, model, stream, messages)
        assert not [b for b in msg.content if b.type == "tool_use"]
        return "".join(b.text for b in msg.content if b.type == "text")
    fc = gtypes.FunctionCall(id=call.id, name=call.name, args=call.args)
    response = gtypes.Part.from_function_response(name=call.name, response={"result": RESULT})
    contents = [
        _gemini_question(),
        gtypes.Content(role="model", parts=[gtypes.Part(function_call=fc)]),
        gtypes.Content(role="user", parts=[response]),
    ]
    chunks = await _gemini_chat(w, model, stream, contents)
    assert not [fc for c in chunks for fc in (c.function_calls or [])]
    return "".join(c.text or "" for c in chunks)


def offered_tool(upstream: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The first tool a request offers, read in the upstream's own format: (name, schema)."""
    if upstream == "openai":
        assert body["tools"][0]["type"] == "function"
        fn = body["tools"][0]["function"]
        return fn["name"], fn["parameters"]
    if upstream == "anthropic":
        return body["tools"][0]["name"], body["tools"][0]["input_schema"]
    decl = body["tools"][0]["functionDeclarations"][0]
    return decl["name"], decl.get("parameters") or decl["parametersJsonSchema"]


@dataclass
class Exchange:
    """A tool call and its result as an upstream received them, in its own format."""

    call_id: str | None
    name: str
    args: dict[str, Any]
    answers: str | None  # the result's reference to the call: its id (Gemini: its id if any)
    answers_name: str | None  # Gemini: the functionResponse's name
    result: Any


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(p["text"] for p in content if p.get("type") == "text")


def sent_exchange(upstream: str, body: dict[str, Any]) -> Exchange:
    if upstream == "openai":
        *_, assistant, tool = body["messages"]
        assert (assistant["role"], tool["role"]) == ("assistant", "tool")
        tc = assistant["tool_calls"][0]
        assert tc["type"] == "function"
        fn = tc["function"]
        args = json.loads(fn["arguments"])
        return Exchange(tc["id"], fn["name"], args, tool["tool_call_id"], None,
                        _text(tool["content"]))  # fmt: skip
    if upstream == "anthropic":
        *_, assistant, user = body["messages"]
        assert (assistant["role"], user["role"]) == ("assistant", "user")
        (use,) = [b for b in assistant["content"] if b["type"] == "tool_use"]
        (result,) = user["content"]
        assert result["type"] == "tool_result"
        return Exchange(use["id"], use["name"], use["input"], result["tool_use_id"], None,
                        _text(result["content"]))  # fmt: skip
    *_, model_turn, user = body["contents"]
    assert (model_turn["role"], user.get("role", "user")) == ("model", "user")
    (fc,) = [p["functionCall"] for p in model_turn["parts"] if "functionCall" in p]
    (fr,) = [p["functionResponse"] for p in user["parts"]]
    return Exchange(fc.get("id"), fc["name"], fc["args"], fr.get("id"), fr["name"],
                    fr["response"])  # fmt: skip


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("upstream", CALLERS)
@pytest.mark.parametrize("caller", CALLERS)
async def test_a_tool_call_round_trip_crosses_every_pair(
    world: World, caller: str, upstream: str, stream: bool
) -> None:
    model = MODELS[upstream]
    call = await call_tool(world, caller, model, stream)
    assert (call.name, call.args, call.finish) == (TOOL, ARGS, FINISH_ON_CALL[caller])
    if caller != "gemini":
        assert call.id
    if upstream != "gemini":  # the upstream's id reaches the caller (Gemini's mock sends none)
        assert (call.id or "").startswith(MOCK_ID_PREFIX[upstream])
    sent = (await world.mock_log())[-1]
    assert sent["format"] == upstream
    name, schema = offered_tool(upstream, sent["body"])
    assert name == TOOL
    assert (set(schema["properties"]), schema["required"]) == ({"location"}, ["location"])

    text = await send_result(world, caller, model, stream, call)
    assert text == f"The tool said: {RESULT}"
    got = sent_exchange(upstream, (await world.mock_log())[-1]["body"])
    assert (got.name, got.args) == (TOOL, ARGS)
    if upstream == "gemini":
        assert got.answers_name == TOOL
        assert got.result == {"result": RESULT}
        if got.call_id is not None:
            assert got.answers == got.call_id
    else:
        assert got.call_id
        assert got.answers == got.call_id
        assert got.result == RESULT
    if caller != "gemini" and upstream != "gemini":
        assert got.call_id == call.id  # the id the caller sent back, unchanged


# --------------------------------------------------------------------------- images


def _data_url() -> str:
    return "data:image/png;base64," + base64.b64encode(_png()).decode()


def _image_request(caller: str, kind: str) -> dict[str, Any]:
    """`ask` keyword arguments: a question with one image in the caller's format."""
    if caller == "openai":
        url = _data_url() if kind == "base64" else IMAGE_URL
        parts = [{"type": "text", "text": "What is this?"},
                 {"type": "image_url", "image_url": {"url": url}}]  # fmt: skip
        return {"messages": [{"role": "user", "content": parts}]}
    if caller == "anthropic":
        if kind == "base64":
            source = {"type": "base64", "media_type": "image/png",
                      "data": base64.b64encode(_png()).decode()}  # fmt: skip
        else:
            source = {"type": "url", "url": IMAGE_URL}
        blocks = [{"type": "text", "text": "What is this?"}, {"type": "image", "source": source}]
        return {"messages": [{"role": "user", "content": blocks}]}
    if kind == "base64":
        image = gtypes.Part.from_bytes(data=_png(), mime_type="image/png")
    else:
        image = gtypes.Part.from_uri(file_uri=IMAGE_URL, mime_type="image/png")
    return {
        "contents": [gtypes.Content(role="user", parts=[gtypes.Part(text="What is this?"), image])]
    }


def sent_image(upstream: str, body: dict[str, Any]) -> tuple[str, str]:
    """The one image a request carries, read in the upstream's own format: (kind, reference)."""
    if upstream == "openai":
        (part,) = [p for p in body["messages"][-1]["content"] if p["type"] == "image_url"]
        url = part["image_url"]["url"]
        return ("base64", url) if url.startswith("data:") else ("url", url)
    if upstream == "anthropic":
        (block,) = [b for b in body["messages"][-1]["content"] if b["type"] == "image"]
        source = block["source"]
        if source["type"] == "base64":
            return "base64", f"data:{source['media_type']};base64,{source['data']}"
        return source["type"], source["url"]
    parts = body["contents"][-1]["parts"]
    (part,) = [p for p in parts if "inlineData" in p or "fileData" in p]
    if "inlineData" in part:
        blob = part["inlineData"]  # the google-genai SDK sends `mime_type`, the sidecar `mimeType`
        mime = blob.get("mimeType", blob.get("mime_type"))
        return "base64", f"data:{mime};base64,{blob['data']}"
    ref = part["fileData"]
    assert ref.get("mimeType", ref.get("mime_type")) == "image/png"
    return "url", ref.get("fileUri", ref.get("file_uri"))


IMAGE_CASES = [
    (caller, upstream, kind, False)
    for caller in CALLERS
    for upstream in CALLERS
    for kind in ("base64", "url")
] + [("openai", "anthropic", "base64", True), ("anthropic", "gemini", "url", True),
     ("gemini", "openai", "base64", True)]  # fmt: skip


@pytest.mark.parametrize(("caller", "upstream", "kind", "stream"), IMAGE_CASES)
async def test_an_image_crosses_every_pair(
    world: World, caller: str, upstream: str, kind: str, stream: bool
) -> None:
    answer = await ask(
        world, caller, MODELS[upstream], stream=stream, **_image_request(caller, kind)
    )
    if kind == "base64":
        assert answer.text == f"I see 1 image (base64 image/png, {len(_png())} bytes)."
    else:
        assert answer.text == f"I see 1 image (url {IMAGE_URL})."
    sent = (await world.mock_log())[-1]
    assert sent["format"] == upstream
    expected = (kind, _data_url() if kind == "base64" else IMAGE_URL)
    assert sent_image(upstream, sent["body"]) == expected


# --------------------------------------------------------------------------- request fields


SYSTEM = "Answer in one short line."
STOP = ["END"]
MAX_TOKENS = 50
TEMPERATURE = 0.25


def _fields_request(caller: str) -> dict[str, Any]:
    """`ask` keyword arguments: a system prompt, stop sequences, a token limit, a temperature."""
    if caller == "openai":
        messages = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "say hi to me"},
        ]
        return {"messages": messages, "stop": STOP, "max_tokens": MAX_TOKENS,
                "temperature": TEMPERATURE}  # fmt: skip
    if caller == "anthropic":
        # this `anthropic` SDK's `create` has no `temperature` argument: the body carries it
        return {"system": SYSTEM, "stop_sequences": STOP, "max_tokens": MAX_TOKENS,
                "extra_body": {"temperature": TEMPERATURE}}  # fmt: skip
    return {"system_instruction": SYSTEM, "stop_sequences": STOP,
            "max_output_tokens": MAX_TOKENS, "temperature": TEMPERATURE}  # fmt: skip


def sent_fields(upstream: str, body: dict[str, Any]) -> tuple[str, list[str], int, float]:
    """(system, stop, max tokens, temperature) as the upstream received them, in its names."""
    if upstream == "openai":
        systems = [m for m in body["messages"] if m["role"] in ("system", "developer")]
        (system,) = systems
        stop = body["stop"]
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        return (_text(system["content"]), [stop] if isinstance(stop, str) else stop, limit,
                body["temperature"])  # fmt: skip
    if upstream == "anthropic":
        system = body["system"]
        return _text(system), body["stop_sequences"], body["max_tokens"], body["temperature"]
    config = body["generationConfig"]
    system = "".join(p["text"] for p in body["systemInstruction"]["parts"])
    return system, config["stopSequences"], config["maxOutputTokens"], config["temperature"]


@pytest.mark.parametrize(
    ("caller", "upstream"), [(c, u) for c in CALLERS for u in CALLERS if c != u]
)
async def test_system_stop_max_tokens_and_temperature_reach_the_upstream_by_its_own_names(
    world: World, caller: str, upstream: str
) -> None:
    answer = await ask(world, caller, MODELS[upstream], stream=False, **_fields_request(caller))
    assert answer.text == REPLY
    sent = (await world.mock_log())[-1]
    assert sent["format"] == upstream
    assert sent_fields(upstream, sent["body"]) == (SYSTEM, STOP, MAX_TOKENS, TEMPERATURE)


# --------------------------------------------------------------------------- tool choice

DECOY = "get_time"
DECOY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"timezone": {"type": "string"}},
    "required": ["timezone"],
}


async def _forced_call(w: World, caller: str, model: str) -> tuple[str, dict[str, Any]]:
    """get_weather forced by the caller's tool choice, offered after a decoy: (name, args)."""
    if caller == "openai":
        tools = [
            {"type": "function", "function": {"name": DECOY, "parameters": DECOY_SCHEMA}},
            *_openai_tools(),
        ]
        done = await w.openai().chat.completions.create(
            model=model, messages=[{"role": "user", "content": QUESTION}], tools=tools,
            tool_choice={"type": "function", "function": {"name": TOOL}},
        )  # fmt: skip
        (tc,) = done.choices[0].message.tool_calls or []
        return tc.function.name, json.loads(tc.function.arguments)
    if caller == "anthropic":
        msg = await w.anthropic().messages.create(
            model=model, max_tokens=256, messages=[{"role": "user", "content": QUESTION}],
            tools=[{"name": DECOY, "input_schema": DECOY_SCHEMA}, *_anthropic_tools()],
            tool_choice={"type": "tool", "name": TOOL},
        )  # fmt: skip
        (use,) = [b for b in msg.content if b.type == "tool_use"]
        return use.name, dict(use.input)
    decoy = gtypes.FunctionDeclaration(name=DECOY, parameters_json_schema=DECOY_SCHEMA)
    config = _gemini_config(decoy)
    config.tool_config = gtypes.ToolConfig(
        function_calling_config=gtypes.FunctionCallingConfig(
            mode=gtypes.FunctionCallingConfigMode.ANY, allowed_function_names=[TOOL]
        )
    )
    resp = await w.gemini().aio.models.generate_content(
        model=model, contents=QUESTION, config=config
    )
    (fc,) = resp.function_calls or []
    return fc.name or "", dict(fc.args or {})


def sent_choice(upstream: str, body: dict[str, Any]) -> Any:
    """The tool choice as the upstream received it, in its own format."""
    if upstream == "openai":
        return body["tool_choice"]
    if upstream == "anthropic":
        return {k: v for k, v in body["tool_choice"].items() if k in ("type", "name")}
    config = body["toolConfig"]["functionCallingConfig"]
    return config["mode"], config["allowedFunctionNames"]


FORCED = {
    "openai": {"type": "function", "function": {"name": TOOL}},
    "anthropic": {"type": "tool", "name": TOOL},
    "gemini": ("ANY", [TOOL]),
}


@pytest.mark.parametrize(
    ("caller", "upstream"), [(c, u) for c in CALLERS for u in CALLERS if c != u]
)
async def test_a_forced_tool_choice_reaches_the_upstream_in_its_own_format(
    world: World, caller: str, upstream: str
) -> None:
    assert await _forced_call(world, caller, MODELS[upstream]) == (TOOL, ARGS)
    sent = (await world.mock_log())[-1]
    assert sent["format"] == upstream
    assert sent_choice(upstream, sent["body"]) == FORCED[upstream]


# --------------------------------------------------------------------------- parallel calls

RESULTS = (RESULT, "rainy, 12C")
CITIES = ("Paris", "London")


def _parallel_request(caller: str) -> dict[str, Any]:
    """`ask` keyword arguments: an assistant turn with text and two calls, then both results."""
    if caller == "openai":
        calls = [
            {"id": f"call_{i}", "type": "function",
             "function": {"name": TOOL, "arguments": json.dumps({"location": city})}}
            for i, city in enumerate(CITIES)
        ]  # fmt: skip
        results = [
            {"role": "tool", "tool_call_id": f"call_{i}", "content": r}
            for i, r in enumerate(RESULTS)
        ]
        return {"messages": [
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": "Let me check.", "tool_calls": calls},
            *results,
        ], "tools": _openai_tools()}  # fmt: skip
    if caller == "anthropic":
        uses = [{"type": "tool_use", "id": f"toolu_{i}", "name": TOOL, "input": {"location": c}}
                for i, c in enumerate(CITIES)]  # fmt: skip
        blocks = [{"type": "tool_result", "tool_use_id": f"toolu_{i}",
                   "content": [{"type": "text", "text": r}]}
                  for i, r in enumerate(RESULTS)]  # fmt: skip
        return {"messages": [
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": [{"type": "text", "text": "Let me check."}, *uses]},
            {"role": "user", "content": blocks},
        ], "tools": _anthropic_tools()}  # fmt: skip
    calls = [gtypes.Part(function_call=gtypes.FunctionCall(name=TOOL, args={"location": c}))
             for c in CITIES]  # fmt: skip
    answers = [gtypes.Part.from_function_response(name=TOOL, response={"result": r})
               for r in RESULTS]  # fmt: skip
    contents = [
        _gemini_question(),
        gtypes.Content(role="model", parts=[gtypes.Part(text="Let me check."), *calls]),
        gtypes.Content(role="user", parts=answers),
    ]
    return {"contents": contents, "tools": _gemini_config().tools}


def sent_parallel(upstream: str, body: dict[str, Any]) -> tuple[str, list[Any], list[Any]]:
    """(assistant text, [(id, name, args)], [(answered id or name, result)]) as the upstream
    received the last two turns, in its own format."""
    if upstream == "openai":
        messages = body["messages"]
        (assistant,) = [m for m in messages if m["role"] == "assistant"]
        calls = [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
                 for c in assistant["tool_calls"]]  # fmt: skip
        results = [
            (m["tool_call_id"], _text(m["content"])) for m in messages if m["role"] == "tool"
        ]
        return _text(assistant["content"]), calls, results
    if upstream == "anthropic":
        *_, assistant, user = body["messages"]
        text = _text(assistant["content"])
        calls = [(b["id"], b["name"], b["input"]) for b in assistant["content"]
                 if b["type"] == "tool_use"]  # fmt: skip
        results = [(b["tool_use_id"], _text(b["content"])) for b in user["content"]]
        return text, calls, results
    *_, model_turn, user = body["contents"]
    text = "".join(p.get("text", "") for p in model_turn["parts"])
    calls = [(p["functionCall"].get("id"), p["functionCall"]["name"], p["functionCall"]["args"])
             for p in model_turn["parts"] if "functionCall" in p]  # fmt: skip
    results = [(p["functionResponse"].get("id") or p["functionResponse"]["name"],
                p["functionResponse"]["response"]) for p in user["parts"]]  # fmt: skip
    return text, calls, results


@pytest.mark.parametrize("upstream", CALLERS)
@pytest.mark.parametrize("caller", CALLERS)
async def test_two_calls_and_their_results_in_one_turn_cross_every_pair(
    world: World, caller: str, upstream: str
) -> None:
    answer = await ask(world, caller, MODELS[upstream], stream=False, **_parallel_request(caller))
    assert answer.text == "The tool said: " + "; ".join(RESULTS)
    sent = (await world.mock_log())[-1]
    assert sent["format"] == upstream
    text, calls, results = sent_parallel(upstream, sent["body"])
    assert text == "Let me check."
    assert [(name, args) for _, name, args in calls] == [(TOOL, {"location": c}) for c in CITIES]
    if upstream == "gemini":
        expected: list[Any] = [{"result": r} for r in RESULTS]
        ids = [call_id or TOOL for call_id, _, _ in calls]
    else:
        expected = list(RESULTS)
        ids = [call_id for call_id, _, _ in calls]
        assert len(set(ids)) == 2
    assert results == list(zip(ids, expected, strict=True))


NAMED = {  # the refused field, as the caller's own request names it
    "openai": "messages[1].content[1].image_url.url",
    "anthropic": "messages[0].content[1].source.url",
}


@pytest.mark.parametrize("caller", ["openai", "anthropic"])
async def test_an_image_url_gemini_cannot_type_is_refused_by_its_name_and_nothing_is_sent(
    world: World, caller: str
) -> None:
    """Gemini's fileData needs a mime type: a URL without an image extension cannot give one."""
    request = json.loads(
        json.dumps(_image_request(caller, "url")).replace(IMAGE_URL, "https://example.com/cat")
    )
    if caller == "openai":
        request["messages"].insert(0, {"role": "system", "content": SYSTEM})
    else:
        request["system"] = SYSTEM
    before = len(await world.mock_log())
    error = openai.BadRequestError if caller == "openai" else anthropic.BadRequestError
    with pytest.raises(error) as info:
        await ask(world, caller, MODELS["gemini"], stream=False, **request)
    assert info.value.status_code == 400
    body = info.value.body
    assert isinstance(body, dict)
    err = body["error"] if caller == "anthropic" else body  # the SDKs unwrap differently
    assert err["code"] == "translation_unsupported"
    assert err["message"].startswith(NAMED[caller] + " cannot be carried ")
    assert len(await world.mock_log()) == before
