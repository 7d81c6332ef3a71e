"""Unit tests of sidecar.streams: the SSE event tracker on the relay's hot path."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import anthropic
import httpx2
import openai
import orjson
import pytest
from openai._streaming import SSEDecoder

from sidecar.streams import (
    MAX_EVENT,
    InbandError,
    Shape,
    StreamTracker,
    Translator,
    error_event,
    shape_for,
)
from sidecar.usage import Usage

# --- real-shaped streams (as sidecar/mock_provider.py and the providers send them) ---------


def sse(obj: object, event: str | None = None) -> bytes:
    head = b"" if event is None else b"event: " + event.encode() + b"\n"
    return head + b"data: " + orjson.dumps(obj) + b"\n\n"


DONE = b"data: [DONE]\n\n"


def chat_chunk(
    delta: dict[str, Any], finish: str | None = None, *, index: int = 0, usage: bool = True
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt-4o-mini",
        "system_fingerprint": "fp_1",
        "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if usage:
        obj["usage"] = None
    return obj


CHAT_USAGE = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "created": 1700000000,
    "model": "gpt-4o-mini",
    "choices": [],
    "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
}
PIECES = ["Hello", " from", " the", " mock", " provider."]


def chat_events(pieces: Iterable[str] = PIECES, *, usage: bool = True) -> list[bytes]:
    events = [sse(chat_chunk({"role": "assistant", "content": ""}))]
    events += [sse(chat_chunk({"content": p})) for p in pieces]
    events.append(sse(chat_chunk({}, "stop")))
    if usage:
        events.append(sse(CHAT_USAGE))
    events.append(DONE)
    return events


def completion(text: str, finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "gpt-3.5-turbo-instruct",
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
        "usage": None,
    }


def completions_events() -> list[bytes]:
    events = [sse(completion(p)) for p in PIECES]
    events.append(sse(completion("", "stop")))
    events.append(
        sse(
            {**completion(""), "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5}}
        )
    )
    events.append(DONE)
    return events


def responses_events(*, end: str = "response.completed") -> list[bytes]:
    text = "".join(PIECES)
    where = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    part = {"type": "output_text", "text": text, "annotations": []}
    item = {"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
            "content": [part]}  # fmt: skip
    usage = {"input_tokens": 9, "output_tokens": 5, "total_tokens": 14}
    full = {"id": "resp_1", "object": "response", "created_at": 1, "model": "gpt-4o",
            "status": "completed", "output": [item], "usage": usage}  # fmt: skip
    start = {**full, "status": "in_progress", "output": [], "usage": None}
    events: list[tuple[str, dict[str, Any]]] = [
        ("response.created", {"response": start}),
        ("response.in_progress", {"response": start}),
        ("response.output_item.added", {"output_index": 0, "item": {**item, "content": []}}),
        ("response.content_part.added", {**where, "part": {**part, "text": ""}}),
    ]
    events += [("response.output_text.delta", {**where, "delta": p}) for p in PIECES]
    events += [
        ("response.output_text.done", {**where, "text": text}),
        ("response.content_part.done", {**where, "part": part}),
        ("response.output_item.done", {"output_index": 0, "item": item}),
        (end, {"response": full}),
    ]
    return [
        sse({"type": name, "sequence_number": seq, **data}, name)
        for seq, (name, data) in enumerate(events)
    ]


def message_start(input_tokens: int = 20, **extra: int) -> bytes:
    message = {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": 1, **extra},
    }  # fmt: skip
    return sse({"type": "message_start", "message": message}, "message_start")


def block_start(index: int, block: dict[str, Any] | None = None) -> bytes:
    block = block if block is not None else {"type": "text", "text": ""}
    obj = {"type": "content_block_start", "index": index, "content_block": block}
    return sse(obj, "content_block_start")


def text_delta(index: int, text: str) -> bytes:
    delta = {"type": "text_delta", "text": text}
    return sse(
        {"type": "content_block_delta", "index": index, "delta": delta}, "content_block_delta"
    )


def block_stop(index: int) -> bytes:
    return sse({"type": "content_block_stop", "index": index}, "content_block_stop")


def message_delta(stop: str | None = "end_turn", output: int = 5) -> bytes:
    obj = {
        "type": "message_delta",
        "delta": {"stop_reason": stop, "stop_sequence": None},
        "usage": {"output_tokens": output},
    }
    return sse(obj, "message_delta")


PING = sse({"type": "ping"}, "ping")
MESSAGE_STOP = sse({"type": "message_stop"}, "message_stop")


def messages_events(pieces: Iterable[str] = PIECES) -> list[bytes]:
    events = [message_start(20, cache_read_input_tokens=7), block_start(0), PING]
    events += [text_delta(0, p) for p in pieces]
    events += [block_stop(0), message_delta(), MESSAGE_STOP]
    return events


STREAMS: dict[Shape, Callable[[], list[bytes]]] = {
    Shape.CHAT: chat_events,
    Shape.COMPLETIONS: completions_events,
    Shape.RESPONSES: responses_events,
    Shape.MESSAGES: messages_events,
}
# Index of the first content event in each stream above.
FIRST_CONTENT = {Shape.CHAT: 1, Shape.COMPLETIONS: 0, Shape.RESPONSES: 4, Shape.MESSAGES: 3}


# --- feeding ---------------------------------------------------------------------


def crlf(events: list[bytes]) -> list[bytes]:
    return [e.replace(b"\n", b"\r\n") for e in events]


def splits(data: bytes, how: str) -> Iterator[bytes]:
    if how == "whole":
        yield data
    elif how == "bytes":
        for i in range(len(data)):
            yield data[i : i + 1]
    else:
        rng = random.Random(how)
        i = 0
        while i < len(data):
            n = rng.randint(1, 120)
            yield data[i : i + n]
            i += n


SPLITS = ["whole", "bytes", "seed-1", "seed-2", "seed-3"]


def relay(tracker: StreamTracker, chunks: Iterable[bytes]) -> bytes:
    out = b"".join(tracker.feed(c) for c in chunks)
    return out + tracker.finish()


# --- shape_for ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "path", "shape"),
    [
        ("openai", "/v1/chat/completions", Shape.CHAT),
        ("openai", "/chat/completions", Shape.CHAT),
        ("openai", "/v1/completions", Shape.COMPLETIONS),
        ("openai", "/v1/responses", Shape.RESPONSES),
        ("openai", "/v1/embeddings", Shape.OTHER),
        ("anthropic", "/v1/messages", Shape.MESSAGES),
        ("anthropic", "/v1/messages/count_tokens", Shape.OTHER),
        ("anthropic", "/v1/chat/completions", Shape.OTHER),
        ("openai", "/v1/messages", Shape.OTHER),
        ("gemini", "/v1/chat/completions", Shape.OTHER),
        ("gemini", "/v1beta/models/gemini-2.5-flash:streamGenerateContent", Shape.GEMINI),
        ("gemini", "/v1beta/models/gemini-2.5-flash:generateContent", Shape.OTHER),
        ("gemini", "/v1beta/models/gemini-2.5-flash:countTokens", Shape.OTHER),
        ("openai", "/v1beta/models/gemini-2.5-flash:streamGenerateContent", Shape.OTHER),
    ],
)
def test_shape_for(fmt: str, path: str, shape: Shape) -> None:
    assert shape_for(fmt, path) is shape


# --- relaying unchanged ------------------------------------------------------------


@pytest.mark.parametrize("shape", list(STREAMS))
@pytest.mark.parametrize("how", SPLITS)
@pytest.mark.parametrize("newline", ["lf", "crlf"])
def test_complete_stream_is_relayed_byte_for_byte(shape: Shape, how: str, newline: str) -> None:
    events = STREAMS[shape]()
    if newline == "crlf":
        events = crlf(events)
    data = b"".join(events)
    tracker = StreamTracker(shape)
    assert relay(tracker, splits(data, how)) == data
    assert tracker.started
    assert tracker.terminated
    assert tracker.finished
    assert tracker.error is None
    assert not tracker.malformed
    assert tracker.complete_on_eof() == b""


def test_whole_chunk_without_changes_is_the_same_object() -> None:
    data = b"".join(chat_events())
    assert StreamTracker(Shape.CHAT).feed(data) is data


@pytest.mark.parametrize("how", SPLITS)
@pytest.mark.parametrize("shape", [Shape.CHAT, Shape.COMPLETIONS])
def test_strip_usage_drops_only_the_usage_chunk(how: str, shape: Shape) -> None:
    events = STREAMS[shape]()
    usage_at = len(events) - 2
    data = b"".join(events)
    tracker = StreamTracker(shape, strip_usage=True)
    out = relay(tracker, splits(data, how))
    assert out == b"".join(events[:usage_at] + events[usage_at + 1 :])
    assert tracker.usage.input_tokens > 0
    assert tracker.usage.output_tokens == 5


def test_strip_usage_keeps_a_chunk_with_choices_and_usage() -> None:
    events = [sse({**chat_chunk({"content": "hi"}, "stop"), "usage": CHAT_USAGE["usage"]}), DONE]
    data = b"".join(events)
    assert relay(StreamTracker(Shape.CHAT, strip_usage=True), [data]) == data


def test_strip_usage_is_ignored_for_other_shapes() -> None:
    data = b"".join(messages_events())
    assert relay(StreamTracker(Shape.MESSAGES, strip_usage=True), [data]) == data


def test_comments_and_events_without_data_are_forwarded() -> None:
    events = [b": keep-alive\n\n", b"retry: 3000\n\n", b"event: ping\n\n", *chat_events()]
    data = b"".join(events)
    for how in SPLITS:
        tracker = StreamTracker(Shape.CHAT)
        assert relay(tracker, splits(data, how)) == data
        assert tracker.events == len(chat_events())


def test_data_split_over_several_lines_is_joined() -> None:
    obj = orjson.dumps(chat_chunk({"content": "hi"}))
    half = obj.index(b'"choices"')  # between two members
    event = b"data: " + obj[:half] + b"\ndata: " + obj[half:] + b"\n\n"
    # SSE joins data lines with "\n": inside JSON whitespace, so still the same object.
    tracker = StreamTracker(Shape.CHAT)
    assert relay(tracker, [event]) == event
    assert tracker.started
    assert tracker.text == "hi"


def test_data_after_the_terminator_is_forwarded_unread() -> None:
    tail = b"data: not json\n\n" + sse({"error": {"message": "late"}})
    for shape, stop in [(Shape.CHAT, DONE), (Shape.MESSAGES, MESSAGE_STOP)]:
        events = STREAMS[shape]()
        assert events[-1] == stop
        data = b"".join(events) + tail
        for how in SPLITS:
            tracker = StreamTracker(shape)
            assert relay(tracker, splits(data, how)) == data
            assert tracker.error is None
            assert not tracker.malformed
            assert tracker.complete_on_eof() == b""


def test_other_shape_is_a_passthrough() -> None:
    data = b"data: hello\n\ndata: not json {\n\n"
    for how in SPLITS:
        tracker = StreamTracker(Shape.OTHER)
        assert relay(tracker, splits(data, how)) == data
        assert tracker.started
        assert not tracker.malformed
        assert tracker.complete_on_eof() == b""


# --- started -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", list(STREAMS))
@pytest.mark.parametrize("newline", ["lf", "crlf"])
def test_started_flips_exactly_at_the_first_content_event(shape: Shape, newline: str) -> None:
    events = STREAMS[shape]()
    if newline == "crlf":
        events = crlf(events)
    tracker = StreamTracker(shape)
    held = b""
    for i, event in enumerate(events):
        # Byte by byte: not before the content event's last byte.
        for b in range(len(event)):
            held += tracker.feed(event[b : b + 1])
            at = FIRST_CONTENT[shape]
            assert tracker.started == (i > at or (i == at and b == len(event) - 1))
    assert held == b"".join(events)


@pytest.mark.parametrize(
    ("delta", "finish"),
    [
        ({"content": "x"}, None),
        ({"refusal": "no"}, None),
        ({"reasoning_content": "hmm"}, None),
        (
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "c",
                        "type": "function",
                        "function": {"name": "f", "arguments": ""},
                    }
                ]
            },
            None,
        ),
        ({"function_call": {"name": "f", "arguments": ""}}, None),
        ({}, "length"),
    ],
)
def test_chat_content_events(delta: dict[str, Any], finish: str | None) -> None:
    tracker = StreamTracker(Shape.CHAT)
    tracker.feed(sse(chat_chunk({"role": "assistant", "content": ""})))
    tracker.feed(sse(chat_chunk({"content": None})))
    assert not tracker.started
    tracker.feed(sse(chat_chunk(delta, finish)))
    assert tracker.started


@pytest.mark.parametrize(
    ("block", "content"),
    [
        ({"type": "text", "text": ""}, False),
        ({"type": "text", "text": "Hi"}, True),
        ({"type": "tool_use", "id": "t", "name": "f", "input": {}}, True),
        ({"type": "thinking", "thinking": ""}, True),
    ],
)
def test_messages_block_start_is_content_unless_empty_text(
    block: dict[str, Any], content: bool
) -> None:
    tracker = StreamTracker(Shape.MESSAGES)
    tracker.feed(message_start() + PING + block_start(0, block))
    assert tracker.started is content


def test_messages_preamble_is_not_content() -> None:
    tracker = StreamTracker(Shape.MESSAGES)
    out = tracker.feed(message_start() + PING + block_start(0))
    assert not tracker.started
    assert out == message_start() + PING + block_start(0)


# --- in-band errors and malformed events -----------------------------------------------


def openai_error(code: str, kind: str, message: str = "bad things") -> bytes:
    return sse({"error": {"message": message, "type": kind, "code": code, "param": None}})


def anthropic_error(kind: str, message: str = "Overloaded") -> bytes:
    return sse({"type": "error", "error": {"type": kind, "message": message}}, "error")


@pytest.mark.parametrize(
    ("code", "kind", "status"),
    [
        ("rate_limit_exceeded", "requests", 429),
        ("insufficient_quota", "insufficient_quota", 429),
        ("server_error", "server_error", 500),
        (None, "overloaded", 500),
        ("something_new", "weird", 500),
        ("invalid_api_key", "invalid_request_error", 401),
        ("context_length_exceeded", "invalid_request_error", 400),
        (None, "invalid_request_error", 400),
        ("model_not_found", "invalid_request_error", 404),
    ],
)
def test_openai_inband_error_status(code: str | None, kind: str, status: int) -> None:
    err = {"message": "bad things", "type": kind, "code": code, "param": None}
    tracker = StreamTracker(Shape.CHAT)
    assert tracker.feed(sse({"error": err})) == b""
    assert tracker.error == InbandError(status, orjson.dumps({"error": err}), "bad things")


def test_quota_error_body_keeps_insufficient_quota() -> None:
    tracker = StreamTracker(Shape.CHAT)
    tracker.feed(openai_error("insufficient_quota", "insufficient_quota"))
    assert tracker.error is not None
    assert orjson.loads(tracker.error.body)["error"]["code"] == "insufficient_quota"


@pytest.mark.parametrize(
    ("kind", "status"),
    [
        ("overloaded_error", 529),
        ("rate_limit_error", 429),
        ("api_error", 500),
        ("authentication_error", 401),
        ("permission_error", 403),
        ("not_found_error", 404),
        ("request_too_large", 413),
        ("invalid_request_error", 400),
        ("timeout_error", 504),
        ("brand_new_error", 500),
    ],
)
def test_anthropic_inband_error_status(kind: str, status: int) -> None:
    tracker = StreamTracker(Shape.MESSAGES)
    tracker.feed(anthropic_error(kind, "nope"))
    body = {"type": "error", "error": {"type": kind, "message": "nope"}}
    assert tracker.error == InbandError(status, orjson.dumps(body), "nope")


def test_responses_error_events() -> None:
    tracker = StreamTracker(Shape.RESPONSES)
    obj = {"type": "error", "code": "rate_limit_exceeded", "message": "slow down", "param": None,
           "sequence_number": 3}  # fmt: skip
    tracker.feed(sse(obj, "error"))
    assert tracker.error is not None
    assert tracker.error.status == 429
    assert tracker.error.message == "slow down"
    body = orjson.loads(tracker.error.body)
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert body["error"]["message"] == "slow down"

    tracker = StreamTracker(Shape.RESPONSES)
    failed = {"type": "response.failed", "sequence_number": 5, "response": {
        "id": "resp_1", "status": "failed",
        "error": {"code": "server_error", "message": "The model crashed"}}}  # fmt: skip
    tracker.feed(responses_events()[0] + sse(failed, "response.failed"))
    assert tracker.error is not None
    assert tracker.error.status == 500
    assert tracker.error.message == "The model crashed"
    assert orjson.loads(tracker.error.body)["error"]["code"] == "server_error"


@pytest.mark.parametrize("how", SPLITS)
@pytest.mark.parametrize("shape", list(STREAMS))
def test_error_stops_the_output(shape: Shape, how: str) -> None:
    events = STREAMS[shape]()
    err = anthropic_error("overloaded_error") if shape is Shape.MESSAGES else \
        openai_error("server_error", "server_error")  # fmt: skip
    if shape is Shape.RESPONSES:
        err = sse({"type": "error", "code": "server_error", "message": "bad things"}, "error")
    at = FIRST_CONTENT[shape] + 2
    data = b"".join(events[:at]) + err + b"".join(events[at:])
    tracker = StreamTracker(shape)
    assert relay(tracker, splits(data, how)) == b"".join(events[:at])
    assert tracker.error is not None
    assert tracker.error.status >= 500
    assert tracker.feed(b"".join(events)) == b""
    assert not tracker.terminated
    assert tracker.complete_on_eof() is None


def test_error_before_content_leaves_started_false() -> None:
    tracker = StreamTracker(Shape.MESSAGES)
    out = tracker.feed(message_start() + PING + anthropic_error("overloaded_error"))
    assert out == message_start() + PING
    assert not tracker.started
    assert tracker.error is not None
    assert tracker.error.status == 529


@pytest.mark.parametrize("how", SPLITS)
@pytest.mark.parametrize("shape", list(STREAMS))
def test_malformed_event_stops_the_output(shape: Shape, how: str) -> None:
    events = STREAMS[shape]()
    at = FIRST_CONTENT[shape] + 1
    bad = b'data: {"choices": [{"delta": {"content": "x"\n\n'
    data = b"".join(events[:at]) + bad + b"".join(events[at:])
    tracker = StreamTracker(shape)
    assert relay(tracker, splits(data, how)) == b"".join(events[:at])
    assert tracker.malformed
    assert tracker.error is None
    assert tracker.feed(DONE) == b""
    assert tracker.complete_on_eof() is None


@pytest.mark.parametrize("limit", [MAX_EVENT, 1 << 20])
def test_oversized_incomplete_event_is_malformed(limit: int) -> None:
    tracker = StreamTracker(Shape.CHAT, max_event=limit)
    head = sse(chat_chunk({"content": "a"}))
    assert tracker.feed(head + b'data: {"x": "') == head
    piece = b"y" * 65536
    for _ in range(limit // len(piece) - 1):
        assert tracker.feed(piece) == b""
    assert not tracker.malformed
    assert tracker.feed(piece) == b""
    assert tracker.malformed
    assert tracker.feed(b'"}\n\n' + DONE) == b""
    assert tracker.complete_on_eof() is None


def test_large_complete_event_is_fine() -> None:
    big = sse(chat_chunk({"content": "z" * 3_000_000}))  # a base64 image, say
    tracker = StreamTracker(Shape.CHAT)
    data = big + DONE
    chunks = [data[i : i + 100_000] for i in range(0, len(data), 100_000)]
    assert relay(tracker, chunks) == data
    assert not tracker.malformed
    assert tracker.terminated


# --- end of stream --------------------------------------------------------------------


@pytest.mark.parametrize("how", SPLITS)
def test_chat_finished_without_done_gets_a_terminator(how: str) -> None:
    events = chat_events()[:-1]  # finish_reason and usage, no [DONE]
    tracker = StreamTracker(Shape.CHAT)
    relay(tracker, splits(b"".join(events), how))
    assert tracker.finished
    assert not tracker.terminated
    assert tracker.complete_on_eof() == DONE


def test_completions_finished_without_done_gets_a_terminator() -> None:
    tracker = StreamTracker(Shape.COMPLETIONS)
    relay(tracker, [b"".join(completions_events()[:-2])])
    assert tracker.finished
    assert tracker.complete_on_eof() == DONE


def test_messages_finished_without_message_stop_gets_one() -> None:
    tracker = StreamTracker(Shape.MESSAGES)
    relay(tracker, [b"".join(messages_events()[:-1])])
    assert tracker.finished
    assert not tracker.terminated
    stop = tracker.complete_on_eof()
    assert stop is not None
    assert [e.event for e in SSEDecoder().iter_bytes(iter([stop]))] == ["message_stop"]
    assert orjson.loads(stop.split(b"data: ")[1]) == {"type": "message_stop"}


@pytest.mark.parametrize("shape", list(STREAMS))
def test_truncated_stream_is_a_break(shape: Shape) -> None:
    events = STREAMS[shape]()
    tracker = StreamTracker(shape)
    data = b"".join(events[: FIRST_CONTENT[shape] + 2])
    assert relay(tracker, [data]) == data
    assert tracker.started
    assert not tracker.finished
    assert not tracker.terminated
    assert tracker.complete_on_eof() is None


def test_responses_without_completed_is_a_break() -> None:
    tracker = StreamTracker(Shape.RESPONSES)
    relay(tracker, [b"".join(responses_events()[:-1])])
    assert tracker.complete_on_eof() is None


def test_responses_incomplete_is_a_terminator() -> None:
    tracker = StreamTracker(Shape.RESPONSES)
    relay(tracker, [b"".join(responses_events(end="response.incomplete"))])
    assert tracker.terminated
    assert tracker.finished
    assert tracker.complete_on_eof() == b""


def test_a_cut_after_the_finish_reason_still_completes_the_answer() -> None:
    events = chat_events()[:-2]  # finished, then no usage chunk or [DONE]
    tracker = StreamTracker(Shape.CHAT)
    out = tracker.feed(b"".join(events) + b'data: {"id": "chatcmpl-1", "cho')
    assert out == b"".join(events)
    assert tracker.finish() == b""
    assert tracker.finished
    assert tracker.complete_on_eof() == DONE  # the answer is whole: only its tail was lost


def test_missing_final_blank_line_after_the_finish_is_completed() -> None:
    tracker = StreamTracker(Shape.CHAT)
    relay(tracker, [b"".join(chat_events())[:-1]])  # `data: [DONE]\n`
    assert not tracker.terminated
    assert tracker.complete_on_eof() == DONE


def test_a_cut_before_the_finish_reason_is_a_break() -> None:
    events = chat_events()[:3]  # role and two content chunks, no finish_reason
    tracker = StreamTracker(Shape.CHAT)
    relay(tracker, [b"".join(events) + b'data: {"id": "chatcmpl-1", "cho'])
    assert not tracker.finished
    assert tracker.complete_on_eof() is None
    assert tracker.terminator() is None


def test_cut_after_terminator_is_still_complete() -> None:
    tracker = StreamTracker(Shape.CHAT)
    data = b"".join(chat_events()) + b": trailing"
    assert relay(tracker, [data]) == data
    assert tracker.complete_on_eof() == b""


# --- usage -------------------------------------------------------------------------------


#: What each stream above reports: its usage fields, read as documented.
EXPECTED_USAGE = {
    Shape.CHAT: Usage(12, 5),  # usage.prompt_tokens, usage.completion_tokens
    Shape.COMPLETIONS: Usage(3, 5),
    Shape.RESPONSES: Usage(9, 5),  # response.usage input_tokens / output_tokens
    Shape.MESSAGES: Usage(20 + 7, 5),  # input + cache reads at message_start; message_delta output
}


@pytest.mark.parametrize("how", SPLITS)
@pytest.mark.parametrize("shape", list(STREAMS))
def test_usage_is_read_however_the_stream_is_split(shape: Shape, how: str) -> None:
    data = b"".join(STREAMS[shape]())
    tracker = StreamTracker(shape)
    relay(tracker, splits(data, how))
    assert tracker.usage == EXPECTED_USAGE[shape]


@pytest.mark.parametrize("shape", list(STREAMS))
def test_usage_with_crlf_line_ends(shape: Shape) -> None:
    data = b"".join(STREAMS[shape]()).replace(b"\n", b"\r\n")
    tracker = StreamTracker(shape)
    assert relay(tracker, splits(data, "seed-crlf")) == data
    assert tracker.usage == EXPECTED_USAGE[shape]


def test_token_counts_that_are_not_counts_are_zero() -> None:
    usage = {"prompt_tokens": True, "completion_tokens": -3}
    data = sse({"choices": [], "usage": usage}) + DONE
    tracker = StreamTracker(Shape.CHAT)
    relay(tracker, [data])
    assert tracker.usage == Usage(0, 0)


def test_anthropic_usage_latest_value_of_each_counter_wins() -> None:
    usage = {"input_tokens": 30, "cache_creation_input_tokens": 4, "output_tokens": 9}
    delta = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": usage}
    events = [message_start(20, cache_read_input_tokens=7, cache_creation_input_tokens=2),
              block_start(0), text_delta(0, "x"), block_stop(0),
              sse(delta, "message_delta"), MESSAGE_STOP]  # fmt: skip
    data = b"".join(events)
    tracker = StreamTracker(Shape.MESSAGES)
    relay(tracker, [data])
    assert tracker.usage == Usage(30 + 4 + 7, 9)


def test_estimate_keeps_what_was_reported_and_counts_events_for_the_rest() -> None:
    data = b"".join(chat_events(usage=False)[:4])
    tracker = StreamTracker(Shape.CHAT)
    relay(tracker, [data])
    assert tracker.events == 4
    assert tracker.estimate(400) == Usage(100, 4)  # 4 request bytes per token, 1 per event
    start = message_start(20)
    tracker = StreamTracker(Shape.MESSAGES)
    relay(tracker, [start + block_start(0) + text_delta(0, "a") + text_delta(0, "b")])
    assert tracker.estimate(400) == Usage(20, 4)  # the reported input is kept


# --- text and resumable ------------------------------------------------------------------


@pytest.mark.parametrize("how", SPLITS)
@pytest.mark.parametrize("shape", [Shape.CHAT, Shape.MESSAGES])
def test_text_is_the_relayed_answer(shape: Shape, how: str) -> None:
    tracker = StreamTracker(shape)
    relay(tracker, splits(b"".join(STREAMS[shape]()), how))
    assert tracker.text == "".join(PIECES)
    assert tracker.resumable


def test_keep_text_false_keeps_nothing() -> None:
    tracker = StreamTracker(Shape.CHAT, keep_text=False)
    relay(tracker, [b"".join(chat_events())])
    assert tracker.text == ""
    assert not tracker.resumable


@pytest.mark.parametrize("shape", [Shape.COMPLETIONS, Shape.RESPONSES, Shape.OTHER])
def test_only_chat_and_messages_are_resumable(shape: Shape) -> None:
    assert not StreamTracker(shape).resumable


def test_chat_tool_call_is_not_resumable() -> None:
    call = {"index": 0, "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": ""}}  # fmt: skip
    tracker = StreamTracker(Shape.CHAT)
    tracker.feed(sse(chat_chunk({"content": "Let me check."})))
    assert tracker.resumable
    tracker.feed(sse(chat_chunk({"tool_calls": [call]})))
    assert not tracker.resumable


def test_chat_several_choices_are_not_resumable() -> None:
    tracker = StreamTracker(Shape.CHAT)
    tracker.feed(sse(chat_chunk({"content": "A"})) + sse(chat_chunk({"content": "B"}, index=1)))
    assert tracker.started
    assert not tracker.resumable


@pytest.mark.parametrize(
    "block",
    [
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}},
        {"type": "thinking", "thinking": ""},
        {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}},
    ],
)
def test_messages_non_text_block_is_not_resumable(block: dict[str, Any]) -> None:
    tracker = StreamTracker(Shape.MESSAGES)
    tracker.feed(message_start() + block_start(0) + text_delta(0, "Hi") + block_stop(0))
    assert tracker.resumable
    assert tracker.text == "Hi"
    tracker.feed(block_start(1, block))
    assert not tracker.resumable


def test_messages_block_tracking() -> None:
    tracker = StreamTracker(Shape.MESSAGES)
    tracker.feed(message_start() + block_start(0) + text_delta(0, "Hi"))
    assert (tracker.open_index, tracker.open_is_text, tracker.next_index) == (0, True, 1)
    tracker.feed(block_stop(0))
    assert (tracker.open_index, tracker.open_is_text, tracker.next_index) == (None, False, 1)
    tracker.feed(block_start(1) + text_delta(1, " there"))
    assert (tracker.open_index, tracker.next_index) == (1, 2)
    assert tracker.text == "Hi there"


def test_text_over_the_limit_is_not_resumable() -> None:
    tracker = StreamTracker(Shape.CHAT)
    piece = sse(chat_chunk({"content": "w" * 100_000}))
    for _ in range(11):
        tracker.feed(piece)
    assert not tracker.resumable
    assert tracker.text == ""


# --- the error event the proxy sends --------------------------------------------------------


def test_error_event_decodes() -> None:
    for shape in (Shape.CHAT, Shape.COMPLETIONS, Shape.RESPONSES, Shape.OTHER):
        events = list(SSEDecoder().iter_bytes(iter([error_event(shape, "cut off")])))
        assert len(events) == 1
        err = events[0].json()["error"]
        assert err == {"message": "cut off", "type": "server_error",
                       "code": "stream_interrupted", "param": None}  # fmt: skip
    (event,) = SSEDecoder().iter_bytes(iter([error_event(Shape.MESSAGES, "cut off")]))
    assert event.event == "error"
    assert event.json() == {"type": "error", "error": {"type": "api_error", "message": "cut off",
                                                       "code": "stream_interrupted"}}  # fmt: skip


@pytest.mark.parametrize("shape", list(STREAMS))
def test_error_event_is_read_back_as_an_error(shape: Shape) -> None:
    tracker = StreamTracker(shape)
    tracker.feed(error_event(shape, "cut off", kind="overloaded_error", code="x"))
    assert tracker.error is not None
    assert tracker.error.message == "cut off"


def _transport(body: bytes) -> httpx2.Client:
    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, content=body, headers={"content-type": "text/event-stream"})

    return httpx2.Client(transport=httpx2.MockTransport(handler))


def _openai(body: bytes) -> openai.OpenAI:
    return openai.OpenAI(api_key="k", base_url="http://sidecar.test/v1",
                         http_client=_transport(body), max_retries=0)  # fmt: skip


def test_openai_sdk_raises_the_error_event() -> None:
    """The real SDK parses the exact bytes (its HTTP transport replaced by a canned response)."""
    body = b"".join(chat_events()[:3]) + error_event(Shape.CHAT, "upstream went away")
    stream = _openai(body).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    got = []

    def read() -> None:
        got.extend(chunk.choices[0].delta.content for chunk in stream)

    with pytest.raises(openai.APIError, match="upstream went away") as info:
        read()
    assert got == ["", "Hello", " from"]
    assert info.value.code == "stream_interrupted"

    body = b"".join(responses_events()[:6]) + error_event(Shape.RESPONSES, "upstream went away")
    events = _openai(body).responses.create(model="gpt-4o", input="hi", stream=True)
    with pytest.raises(openai.APIError, match="upstream went away"):
        list(events)

    body = b"".join(completions_events()[:2]) + error_event(Shape.COMPLETIONS, "gone")
    completions = _openai(body).completions.create(model="m", prompt="hi", stream=True)
    with pytest.raises(openai.APIError, match="gone"):
        list(completions)


def test_anthropic_sdk_raises_the_error_event() -> None:
    body = b"".join(messages_events()[:5]) + error_event(Shape.MESSAGES, "upstream went away")
    client = anthropic.Anthropic(api_key="k", base_url="http://sidecar.test",
                                 http_client=_transport(body), max_retries=0)  # fmt: skip
    text: list[str] = []

    def read() -> None:
        with client.messages.stream(
            model="claude-haiku-test", max_tokens=50, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            text.extend(stream.text_stream)

    with pytest.raises(anthropic.APIStatusError, match="upstream went away"):
        read()
    assert text == ["Hello", " from"]


def test_the_fast_lane_keeps_text_in_order_and_reads_it_only_when_asked() -> None:
    # Once content has started, whole chat chunks are validated in one parse and their
    # meaning read later; a later chunk read event by event must not jump the queue.
    def ev(obj: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    def delta(text: str, finish: str | None = None) -> bytes:
        return ev({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]})

    t = StreamTracker(Shape.CHAT, strip_usage=True)
    assert t.feed(delta("a")) == delta("a")
    lane = delta("b") + delta("c")
    assert t.feed(lane) is lane  # relayed as is
    usage = ev({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}})
    assert t.feed(delta("d", "stop") + usage) == delta("d", "stop")  # cut, read in order
    assert t.text == "abcd"
    assert t.finished
    assert (t.usage.input_tokens, t.usage.output_tokens) == (3, 4)
    assert t.feed(b"data: [DONE]\n\n") == b"data: [DONE]\n\n"
    assert t.terminated
    assert t.complete_on_eof() == b""


def test_the_fast_lane_leaves_a_malformed_or_error_chunk_to_the_careful_path() -> None:
    good = b'data: {"choices":[{"index":0,"delta":{"content":"a"},"finish_reason":null}]}\n\n'
    t = StreamTracker(Shape.CHAT)
    t.feed(good)
    assert t.feed(good + b'data: {"choices": [\n\n' + good) == good
    assert t.malformed
    t = StreamTracker(Shape.CHAT)
    t.feed(good)
    assert t.feed(good + b'data: {"error":{"message":"boom","type":"server_error"}}\n\n') == good
    assert t.error is not None
    assert t.text == "aa"


def test_with_several_choices_the_answer_finishes_when_every_choice_has() -> None:
    def ev(*choices: dict[str, Any]) -> bytes:
        return sse({"id": "x", "object": "chat.completion.chunk", "choices": list(choices)})

    tracker = StreamTracker(Shape.CHAT)
    relay(tracker, [ev({"index": 0, "delta": {"content": "a"}, "finish_reason": None},
                       {"index": 1, "delta": {"content": "b"}, "finish_reason": None}),
                    ev({"index": 0, "delta": {}, "finish_reason": "stop"})])  # fmt: skip
    assert not tracker.finished
    assert tracker.terminator() is None  # choice 1 is cut: a break
    relay(tracker, [ev({"index": 1, "delta": {}, "finish_reason": "length"})])
    assert tracker.finished
    assert tracker.terminator() == DONE


# --- Gemini streamGenerateContent?alt=sse ---------------------------------------------------


def gemini_sse(obj: object, sep: bytes = b"\r\n\r\n") -> bytes:
    return b"data: " + orjson.dumps(obj) + sep


def gemini_chunk(
    parts: list[dict[str, Any]] | None = None,
    finish: str | None = None,
    *,
    index: int = 0,
    usage: dict[str, int] | None = None,
) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts or []}, "index": index}
    if finish is not None:
        candidate["finishReason"] = finish
    obj: dict[str, Any] = {"candidates": [candidate], "modelVersion": "gemini-2.5-flash",
                           "responseId": "r1"}  # fmt: skip
    if usage is not None:
        obj["usageMetadata"] = usage
    return obj


GEMINI_USAGE = {"promptTokenCount": 11, "candidatesTokenCount": 5, "thoughtsTokenCount": 3,
                "totalTokenCount": 19}  # fmt: skip


def gemini_events(sep: bytes = b"\r\n\r\n") -> list[bytes]:
    """As Google sends them: usage in every chunk, the finish and the final usage last."""
    events = [gemini_sse(gemini_chunk([{"text": p}], usage={"promptTokenCount": 11}), sep)
              for p in PIECES]  # fmt: skip
    events.append(gemini_sse(gemini_chunk([{"text": ""}], "STOP", usage=GEMINI_USAGE), sep))
    return events


@pytest.mark.parametrize("how", SPLITS)
@pytest.mark.parametrize("sep", [b"\r\n\r\n", b"\n\n"])
def test_gemini_stream_is_relayed_and_read(how: str, sep: bytes) -> None:
    data = b"".join(gemini_events(sep))
    tracker = StreamTracker(Shape.GEMINI)
    assert relay(tracker, splits(data, how)) == data
    assert tracker.started
    assert tracker.finished
    assert not tracker.terminated  # Gemini sends no terminator
    assert tracker.usage == Usage(11, 8)  # thinking tokens are output
    assert tracker.complete_on_eof() == b""
    assert tracker.terminator() == b""
    assert tracker.error is None
    assert not tracker.malformed
    assert not tracker.cut


def test_gemini_is_not_resumable() -> None:
    tracker = StreamTracker(Shape.GEMINI)
    relay(tracker, gemini_events()[:2])
    assert tracker.started
    assert not tracker.resumable
    assert tracker.text == ""


def test_gemini_truncated_stream_is_a_break() -> None:
    tracker = StreamTracker(Shape.GEMINI)
    relay(tracker, gemini_events()[:3])
    assert tracker.started
    assert not tracker.finished
    assert tracker.complete_on_eof() is None
    assert tracker.terminator() is None


@pytest.mark.parametrize(
    ("parts", "content"),
    [
        ([{"text": "hi"}], True),
        ([{"functionCall": {"name": "f", "args": {}}}], True),
        ([{"inlineData": {"mimeType": "image/png", "data": "AA=="}}], True),
        ([{"text": "", "thoughtSignature": "c2ln"}], False),
        ([{"text": ""}], False),
        ([], False),
    ],
)
def test_gemini_content_parts(parts: list[dict[str, Any]], content: bool) -> None:
    tracker = StreamTracker(Shape.GEMINI)
    tracker.feed(gemini_sse(gemini_chunk(parts)))
    assert tracker.started is content


def test_gemini_usage_only_and_preamble_chunks_are_not_content() -> None:
    tracker = StreamTracker(Shape.GEMINI)
    tracker.feed(gemini_sse({"usageMetadata": {"promptTokenCount": 4}}) + b": keep-alive\r\n\r\n")
    assert not tracker.started
    assert tracker.usage == Usage(4, 0)


def test_gemini_every_candidate_must_finish() -> None:
    tracker = StreamTracker(Shape.GEMINI)
    tracker.feed(gemini_sse(gemini_chunk([{"text": "a"}], index=0)))
    tracker.feed(gemini_sse(gemini_chunk([{"text": "b"}], index=1)))
    tracker.feed(gemini_sse(gemini_chunk([{"text": "c"}], "STOP", index=0)))
    assert not tracker.finished
    assert tracker.complete_on_eof() is None
    tracker.feed(gemini_sse(gemini_chunk([], "MAX_TOKENS", index=1)))
    assert tracker.finished
    assert tracker.complete_on_eof() == b""


def test_gemini_blocked_prompt_is_a_complete_empty_answer() -> None:
    tracker = StreamTracker(Shape.GEMINI)
    tracker.feed(gemini_sse({"promptFeedback": {"blockReason": "SAFETY"},
                             "usageMetadata": {"promptTokenCount": 6}}))  # fmt: skip
    assert not tracker.started
    assert tracker.finished
    assert tracker.complete_on_eof() == b""


@pytest.mark.parametrize(
    ("error", "status"),
    [
        ({"code": 429, "message": "slow down", "status": "RESOURCE_EXHAUSTED"}, 429),
        ({"code": 500, "message": "boom", "status": "INTERNAL"}, 500),
        ({"message": "busy", "status": "UNAVAILABLE"}, 503),
        ({"message": "bad", "status": "INVALID_ARGUMENT"}, 400),
        ({"message": "odd", "status": "SOMETHING_NEW"}, 500),
        ({"message": "none"}, 500),
    ],
)
def test_gemini_inband_error(error: dict[str, Any], status: int) -> None:
    head = gemini_events()[0]
    after = gemini_events()[1]
    tracker = StreamTracker(Shape.GEMINI)
    assert relay(tracker, [head + gemini_sse({"error": error}) + after]) == head
    assert tracker.error == InbandError(status, orjson.dumps({"error": error}), error["message"])
    assert tracker.feed(after) == b""
    assert tracker.complete_on_eof() is None


def test_gemini_malformed_event_stops_the_output() -> None:
    head = gemini_events()[0]
    tracker = StreamTracker(Shape.GEMINI)
    assert tracker.feed(head + b'data: {"candidates": [\r\n\r\n' + head) == head
    assert tracker.malformed


@pytest.mark.parametrize(
    ("kind", "code", "rpc"),
    [
        ("api_error", 500, "INTERNAL"),
        ("overloaded_error", 503, "UNAVAILABLE"),
        ("rate_limit_error", 429, "RESOURCE_EXHAUSTED"),
        ("timeout_error", 504, "DEADLINE_EXCEEDED"),
        ("invalid_request_error", 400, "INVALID_ARGUMENT"),
        ("something_else", 500, "INTERNAL"),
    ],
)
def test_gemini_error_event(kind: str, code: int, rpc: str) -> None:
    event = error_event(Shape.GEMINI, "cut off", kind=kind, code="stream_interrupted")
    assert event.startswith(b"data: {")
    assert event.endswith(b"}\r\n\r\n")
    assert orjson.loads(event[6:]) == {"error": {
        "code": code, "message": "cut off", "status": rpc,
        "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                     "reason": "stream_interrupted", "domain": "ai-gateway-sidecar"}],
    }}  # fmt: skip
    tracker = StreamTracker(Shape.GEMINI)
    tracker.feed(event)
    assert tracker.error is not None
    assert (tracker.error.status, tracker.error.message) == (code, "cut off")


def _genai_stream(body: bytes) -> list[str]:
    """Read `body` as a streamGenerateContent answer with the real google-genai SDK (its HTTP
    transport replaced by a canned response); the texts it yielded before it raised."""
    from google import genai
    from google.genai import types

    seen: list[str] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(str(request.url))
        return httpx2.Response(200, content=body, headers={"content-type": "text/event-stream"})

    options = types.HttpOptions(
        base_url="http://sidecar.test",
        api_version="v1beta",
        httpx_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
    )
    client = genai.Client(api_key="k", http_options=options)
    got: list[str] = []
    try:
        for chunk in client.models.generate_content_stream(model="gemini-2.5-flash", contents="hi"):
            got.append(chunk.text or "")
    finally:
        assert seen == [
            "http://sidecar.test/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
        ]
    return got


def test_genai_sdk_reads_the_stream_and_raises_the_error_event() -> None:
    from google.genai import errors

    assert _genai_stream(b"".join(gemini_events())) == [*PIECES, ""]  # no error: it ends quietly

    body = b"".join(gemini_events()[:2]) + error_event(Shape.GEMINI, "upstream went away")
    got: list[str] = []
    with pytest.raises(errors.ServerError) as info:
        got.extend(_genai_stream(body))
    assert (info.value.code, info.value.status) == (500, "INTERNAL")
    assert info.value.message == "upstream went away"

    body = gemini_events()[0] + error_event(Shape.GEMINI, "slow down", kind="rate_limit_error")
    with pytest.raises(errors.ClientError) as client_info:
        _genai_stream(body)
    assert (client_info.value.code, client_info.value.status) == (429, "RESOURCE_EXHAUSTED")


# --- translated attempts (pre=) ----------------------------------------------------------------


class LinesToChat:
    """A toy upstream format: one text per line (`!` an error); EOF owes the finish chunk
    and [DONE]."""

    def __init__(self, tail: bytes | None = None) -> None:
        self.held = b""
        self.fed: list[bytes] = []
        self.tail = tail
        self.content_held = False

    def feed(self, chunk: bytes) -> bytes:
        self.fed.append(chunk)
        self.held += chunk
        *lines, self.held = self.held.split(b"\n")
        return b"".join(self._event(line) for line in lines)

    def _event(self, line: bytes) -> bytes:
        if line == b"!":
            return openai_error("server_error", "server_error", "upstream failed")
        return sse(chat_chunk({"content": line.decode()}))

    def finish(self) -> bytes:
        if self.tail is not None:
            return self.tail
        return sse(chat_chunk({}, "stop")) + sse(CHAT_USAGE) + DONE


def test_translator_protocol_is_met_by_the_toy() -> None:
    pre: Translator = LinesToChat()
    assert pre.feed(b"a\n") == sse(chat_chunk({"content": "a"}))


def test_pre_translates_every_chunk_and_finish_returns_what_it_owed() -> None:
    pre = LinesToChat()
    tracker = StreamTracker(Shape.CHAT, pre=pre, strip_usage=True)
    assert tracker.feed(b"Hel") == b""  # nothing complete yet
    assert not tracker.started
    out = tracker.feed(b"lo\nwor")
    assert out == sse(chat_chunk({"content": "Hello"}))
    assert tracker.started
    assert tracker.feed(b"ld\n") == sse(chat_chunk({"content": "world"}))
    assert pre.fed == [b"Hel", b"lo\nwor", b"ld\n"]
    assert not tracker.finished
    tail = tracker.finish()
    # The finish chunk and [DONE] relayed; the usage chunk the sidecar asked for is stripped.
    assert tail == sse(chat_chunk({}, "stop")) + DONE
    assert tracker.finished
    assert tracker.terminated
    assert tracker.usage == Usage(12, 5)
    assert tracker.text == "Helloworld"
    assert tracker.complete_on_eof() == b""


def test_pre_finish_that_owes_an_error_sets_it() -> None:
    tracker = StreamTracker(Shape.CHAT, pre=LinesToChat(tail=openai_error("server_error", "x")))
    tracker.feed(b"a\n")
    assert tracker.finish() == b""
    assert tracker.error is not None
    assert tracker.complete_on_eof() is None


def test_pre_finish_that_owes_nothing_leaves_a_break() -> None:
    tracker = StreamTracker(Shape.CHAT, pre=LinesToChat(tail=b""))
    tracker.feed(b"a\n")
    assert tracker.finish() == b""
    assert tracker.complete_on_eof() is None


def test_pre_is_not_asked_after_an_error() -> None:
    pre = LinesToChat()
    tracker = StreamTracker(Shape.CHAT, pre=pre)
    assert tracker.feed(b"") == b""
    assert tracker.feed(b"a\n!\n") == sse(chat_chunk({"content": "a"}))
    assert tracker.error is not None
    assert tracker.error.message == "upstream failed"
    assert tracker.feed(b"b\n") == b""
    assert pre.fed == [b"", b"a\n!\n"]


def test_finish_without_pre_returns_nothing() -> None:
    tracker = StreamTracker(Shape.CHAT)
    tracker.feed(b"".join(chat_events()[:2]))
    assert tracker.finish() == b""
