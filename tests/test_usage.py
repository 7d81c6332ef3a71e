from __future__ import annotations

import random
from collections.abc import Iterable, Iterator

import orjson
import pytest

from sidecar.streams import Shape, StreamTracker
from sidecar.usage import (
    Usage,
    ensure_stream_usage,
    request_wants_stream_usage,
    usage_from_body,
    usage_from_tail,
)


def sse(*objs: object, done: bool = False, newline: bytes = b"\n") -> list[bytes]:
    """One SSE event per object, as OpenAI sends them."""
    events = [b"data: " + orjson.dumps(o) + newline + newline for o in objs]
    if done:
        events.append(b"data: [DONE]" + newline + newline)
    return events


def chat_chunk(content: str, *, finish: str | None = None) -> dict[str, object]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}],
        "usage": None,
    }


USAGE_CHUNK = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "created": 1,
    "model": "gpt-4o-mini",
    "choices": [],
    "usage": {
        "prompt_tokens": 12,
        "completion_tokens": 34,
        "total_tokens": 46,
        "prompt_tokens_details": {"cached_tokens": 0},
    },
}


def openai_events(newline: bytes = b"\n") -> tuple[list[bytes], int]:
    """A chat stream with include_usage; returns its events and the usage event's index."""
    objs = [
        chat_chunk(""),
        chat_chunk("Hello"),
        chat_chunk(', "usage" is a word'),
        chat_chunk("!", finish="stop"),
        USAGE_CHUNK,
    ]
    return sse(*objs, done=True, newline=newline), 4


def anthropic_stream(newline: bytes = b"\n") -> bytes:
    events = [
        ("message_start", {
            "type": "message_start",
            "message": {
                "id": "msg_1", "type": "message", "role": "assistant", "content": [],
                "model": "claude-sonnet-4-20250514", "stop_reason": None,
                "usage": {
                    "input_tokens": 25, "cache_creation_input_tokens": 100,
                    "cache_read_input_tokens": 7, "output_tokens": 1,
                },
            },
        }),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("ping", {"type": "ping"}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "Hi"}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                           "usage": {"output_tokens": 15}}),
        ("message_delta", {"type": "message_delta", "delta": {},
                           "usage": {"output_tokens": 40}}),
        ("message_stop", {"type": "message_stop"}),
    ]  # fmt: skip
    return b"".join(
        b"event: " + name.encode() + newline + b"data: " + orjson.dumps(obj) + newline + newline
        for name, obj in events
    )


def responses_stream() -> bytes:
    resp = {"id": "resp_1", "object": "response", "status": "in_progress", "usage": None}
    done = {
        **resp,
        "status": "completed",
        "output": [{"type": "message", "content": [{"type": "output_text", "text": "Hi"}]}],
        "usage": {"input_tokens": 9, "output_tokens": 3, "total_tokens": 12},
    }
    events = [
        ("response.created", {"type": "response.created", "response": resp}),
        ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "Hi"}),
        ("response.completed", {"type": "response.completed", "response": done}),
    ]
    return b"".join(
        b"event: " + n.encode() + b"\ndata: " + orjson.dumps(o) + b"\n\n" for n, o in events
    )


def pieces(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    out, prev = [], 0
    for cut in sorted(set(cuts)):
        out.append(data[prev:cut])
        prev = cut
    out.append(data[prev:])
    return out


def every_split(data: bytes) -> Iterator[list[bytes]]:
    for i in range(len(data) + 1):
        yield pieces(data, [i])


def random_splits(data: bytes, rounds: int = 300, seed: int = 1234) -> Iterator[list[bytes]]:
    rng = random.Random(seed)
    yield [data[i : i + 1] for i in range(len(data))]
    for _ in range(rounds):
        yield pieces(data, rng.sample(range(len(data) + 1), rng.randint(1, 40)))


def run(meter: StreamTracker, chunks: list[bytes]) -> bytes:
    return b"".join([meter.feed(c) for c in chunks]) + meter.finish()


# -- usage_from_body ----------------------------------------------------------


def test_openai_chat_body() -> None:
    body = orjson.dumps(
        {"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}
    )
    assert usage_from_body("openai", body) == Usage(10, 5)


def test_openai_embeddings_body() -> None:
    body = orjson.dumps({"data": [], "usage": {"prompt_tokens": 8, "total_tokens": 8}})
    assert usage_from_body("openai", body) == Usage(8, 0)


def test_openai_responses_body() -> None:
    body = orjson.dumps(
        {"object": "response", "usage": {"input_tokens": 7, "output_tokens": 2, "total_tokens": 9}}
    )
    assert usage_from_body("openai", body) == Usage(7, 2)


def test_anthropic_body_adds_cache_tokens() -> None:
    body = orjson.dumps(
        {
            "type": "message",
            "usage": {
                "input_tokens": 3,
                "cache_creation_input_tokens": 200,
                "cache_read_input_tokens": 50,
                "output_tokens": 9,
            },
        }
    )
    assert usage_from_body("anthropic", body) == Usage(253, 9)
    plain = orjson.dumps({"usage": {"input_tokens": 3, "output_tokens": 9}})
    assert usage_from_body("anthropic", plain) == Usage(3, 9)


def test_anthropic_null_cache_tokens() -> None:
    body = orjson.dumps(
        {"usage": {"input_tokens": 3, "cache_creation_input_tokens": None, "output_tokens": 1}}
    )
    assert usage_from_body("anthropic", body) == Usage(3, 1)


@pytest.mark.parametrize(
    "body",
    [
        b'{"input_tokens": 42}',  # count_tokens
        b"",
        b"not json",
        b'{"usage": ',
        b'["usage"]',
        b'{"usage": null}',
        b'{"usage": "lots"}',
        b'\xff\xfe"usage"',
        b'{"error": {"message": "no \\"usage\\" here"}}',
    ],
)
def test_body_without_usage(body: bytes) -> None:
    assert usage_from_body("openai", body) is None
    assert usage_from_body("anthropic", body) is None


def test_body_garbage_counts_are_zero() -> None:
    body = b'{"usage": {"prompt_tokens": "x", "completion_tokens": true}}'
    assert usage_from_body("openai", body) == Usage(0, 0)
    body = b'{"usage": {"prompt_tokens": -5, "completion_tokens": 1.5}}'
    assert usage_from_body("openai", body) == Usage(0, 0)


def test_body_unknown_format() -> None:
    assert usage_from_body("gemini", b'{"usage": {"prompt_tokens": 1}}') is None


_USED = b'"usage": {"prompt_tokens": 7, "completion_tokens": 3}'


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # only the top-level `usage` counts, wherever it sits among the other keys
        (b'{"choices": [{"usage": {"prompt_tokens": 99}}], ' + _USED + b"}", Usage(7, 3)),
        (b'{"choices": [{"usage": {"prompt_tokens": 99}}]}', None),
        # a repeated key: the last one wins, as with any JSON parser here
        (b'{"usage": null, ' + _USED + b"}", Usage(7, 3)),
        (b"{" + _USED + b', "usage": null}', None),
        # a key spelled with an escape is not looked for: no parse without the plain bytes
        (b'{"\\u0075sage": {"prompt_tokens": 7, "completion_tokens": 3}}', None),
        # nested deeper than msgspec reads: orjson reads the whole body
        (b'{"deep": ' + b"[" * 1010 + b"]" * 1010 + b", " + _USED + b"}", Usage(7, 3)),
        # a count no answer has is garbage, however it is read (orjson: a float; msgspec: an int)
        (b'{"usage": {"prompt_tokens": 18446744073709551616, "completion_tokens": 3}}',
         Usage(0, 3)),
        (b'{"usage": {"prompt_tokens": 1000000000001, "completion_tokens": 1000000000000}}',
         Usage(0, 10**12)),
        # text that is not UTF-8 elsewhere in the answer does not hide what was used
        (b'{"choices": [{"text": "\xff"}], ' + _USED + b"}", Usage(7, 3)),
        (b"[" + _USED.join([b"{", b"}"]) + b"]", None),
    ],
)  # fmt: skip
def test_body_usage_is_the_top_level_key(body: bytes, expected: Usage | None) -> None:
    assert usage_from_body("openai", body) == expected


def test_gemini_body_usage_metadata_is_the_top_level_key() -> None:
    meta = b'"usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": 2}'
    body = b'{"candidates": [{"usageMetadata": {"promptTokenCount": 99}}], ' + meta + b"}"
    assert usage_from_body("gemini", body) == Usage(4, 2)
    assert usage_from_body("gemini", b'{"candidates": []}') is None
    assert usage_from_body("gemini", b"[{" + meta + b"}]") is None


# -- request bodies -----------------------------------------------------------


def test_request_wants_stream_usage() -> None:
    assert request_wants_stream_usage({"stream_options": {"include_usage": True}})
    assert not request_wants_stream_usage({"stream_options": {"include_usage": False}})
    assert not request_wants_stream_usage({"stream_options": None})
    assert not request_wants_stream_usage({"stream": True})


def test_ensure_stream_usage_adds_when_absent() -> None:
    body: dict[str, object] = {"model": "gpt-4o", "stream": True}
    assert ensure_stream_usage(body) is True
    assert body["stream_options"] == {"include_usage": True}


def test_ensure_stream_usage_keeps_other_options() -> None:
    body: dict[str, object] = {"stream": True, "stream_options": {"x": 1}}
    assert ensure_stream_usage(body) is True
    assert body["stream_options"] == {"x": 1, "include_usage": True}
    body = {"stream": True, "stream_options": {"include_usage": False}}
    assert ensure_stream_usage(body) is True
    assert body["stream_options"] == {"include_usage": True}


def test_ensure_stream_usage_leaves_alone() -> None:
    asked: dict[str, object] = {"stream": True, "stream_options": {"include_usage": True}}
    assert ensure_stream_usage(asked) is False
    assert asked["stream_options"] == {"include_usage": True}
    not_stream: dict[str, object] = {"model": "gpt-4o"}
    assert ensure_stream_usage(not_stream) is False
    assert "stream_options" not in not_stream
    odd: dict[str, object] = {"stream": True, "stream_options": "yes"}
    assert ensure_stream_usage(odd) is False
    assert odd["stream_options"] == "yes"


# -- streams (sidecar.streams.StreamTracker), split at every point ---------------


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_scan_openai_every_split(newline: bytes) -> None:
    data = b"".join(openai_events(newline)[0])
    for chunks in every_split(data):
        meter = StreamTracker(Shape.CHAT)
        assert run(meter, chunks) == data
        assert meter.usage == Usage(12, 34)


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_scan_anthropic_every_split(newline: bytes) -> None:
    data = anthropic_stream(newline)
    for chunks in every_split(data):
        meter = StreamTracker(Shape.MESSAGES)
        assert run(meter, chunks) == data
        assert meter.usage == Usage(25 + 100 + 7, 40)


def test_scan_anthropic_message_delta_with_input_counts() -> None:
    meter = StreamTracker(Shape.MESSAGES)
    meter.feed(
        b'data: {"type":"message_start","message":{"usage":'
        b'{"input_tokens":10,"cache_read_input_tokens":5,"output_tokens":1}}}\n\n'
    )
    assert meter.usage == Usage(15, 1)
    meter.feed(b'data: {"type":"message_delta","usage":{"input_tokens":12,"output_tokens":9}}\n\n')
    assert meter.usage == Usage(17, 9)


def test_scan_responses_every_split() -> None:
    data = responses_stream()
    for chunks in random_splits(data, rounds=100):
        meter = StreamTracker(Shape.RESPONSES)
        assert run(meter, chunks) == data
        assert meter.usage == Usage(9, 3)


# -- stripping the usage chunk the sidecar added ---------------------------


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_strip_every_split_is_byte_exact(newline: bytes) -> None:
    events, at = openai_events(newline)
    data = b"".join(events)
    expected = b"".join(events[:at] + events[at + 1 :])
    assert expected.endswith(b"data: [DONE]" + newline + newline)
    for chunks in every_split(data):
        meter = StreamTracker(Shape.CHAT, strip_usage=True)
        assert run(meter, chunks) == expected
        assert meter.usage == Usage(12, 34)


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_strip_random_multi_splits_are_byte_exact(newline: bytes) -> None:
    events, at = openai_events(newline)
    data = b"".join(events)
    expected = b"".join(events[:at] + events[at + 1 :])
    for chunks in random_splits(data):
        meter = StreamTracker(Shape.CHAT, strip_usage=True)
        assert run(meter, chunks) == expected
        assert meter.usage == Usage(12, 34)


# --- Gemini -----------------------------------------------------------------------------

GEMINI_BODY = {
    "candidates": [{"content": {"role": "model", "parts": [{"text": "hi"}]},
                    "finishReason": "STOP", "index": 0}],
    "usageMetadata": {"promptTokenCount": 40, "candidatesTokenCount": 7, "thoughtsTokenCount": 9,
                      "cachedContentTokenCount": 30, "toolUsePromptTokenCount": 2,
                      "totalTokenCount": 58},
    "modelVersion": "gemini-2.5-flash",
}  # fmt: skip


def test_gemini_body() -> None:
    # Cached tokens are part of promptTokenCount already; thinking is billed as output.
    assert usage_from_body("gemini", orjson.dumps(GEMINI_BODY)) == Usage(42, 16)


def test_gemini_body_pretty_printed_as_google_sends_it() -> None:
    body = orjson.dumps(GEMINI_BODY, option=orjson.OPT_INDENT_2)
    assert usage_from_body("gemini", body) == Usage(42, 16)


def test_gemini_body_without_thoughts() -> None:
    body = {"usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 4}}
    assert usage_from_body("gemini", orjson.dumps(body)) == Usage(3, 4)


@pytest.mark.parametrize(
    "body",
    [
        b'{"totalTokens": 31}',  # countTokens
        b'{"embedding": {"values": [0.1]}}',  # embedContent without usage
        b'{"usageMetadata": "x"}',
        b'{"usageMetadata": {',
        b"[]",
        orjson.dumps({"usage": {"prompt_tokens": 3}}),  # another format's usage
    ],
)
def test_gemini_body_without_usage(body: bytes) -> None:
    assert usage_from_body("gemini", body) is None


def test_gemini_usage_is_not_read_as_another_format() -> None:
    assert usage_from_body("openai", orjson.dumps(GEMINI_BODY)) is None


def test_gemini_garbage_counts_are_zero() -> None:
    body = {"usageMetadata": {"promptTokenCount": "3", "candidatesTokenCount": True,
                              "thoughtsTokenCount": -1}}  # fmt: skip
    assert usage_from_body("gemini", orjson.dumps(body)) == Usage(0, 0)


def test_gemini_usage_from_tail() -> None:
    body = orjson.dumps(GEMINI_BODY, option=orjson.OPT_INDENT_2)
    tail = body[body.index(b'"usageMetadata"') - 40 :]
    assert usage_from_tail("gemini", tail) == Usage(42, 16)
    assert usage_from_tail("gemini", b'"usage": {"prompt_tokens": 1}}') is None
