"""Unit tests of sidecar.resume: the prefill request and the splice of a continuation stream."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import anthropic
import orjson
import pytest
from openai._streaming import SSEDecoder

from sidecar.resume import Splice, prefill_body
from sidecar.streams import Shape, StreamTracker
from tests.test_streams import (
    DONE,
    MESSAGE_STOP,
    PING,
    SPLITS,
    _openai,
    _transport,
    block_start,
    block_stop,
    chat_chunk,
    message_delta,
    message_start,
    relay,
    splits,
    sse,
    text_delta,
)

# --- prefill_body ------------------------------------------------------------------------


def chat_body(*messages: dict[str, Any]) -> dict[str, Any]:
    return {"model": "gpt-4o", "stream": True, "messages": list(messages)}


USER = {"role": "user", "content": "Tell me a story."}


@pytest.mark.parametrize("shape", [Shape.CHAT, Shape.MESSAGES])
def test_prefill_appends_an_assistant_message(shape: Shape) -> None:
    data = chat_body(USER)
    before = copy.deepcopy(data)
    built = prefill_body(shape, data, "Once upon a time")
    assert built is not None
    body, trimmed = built
    assert body["messages"] == [USER, {"role": "assistant", "content": "Once upon a time"}]
    assert trimmed == ""
    assert body["model"] == "gpt-4o"
    assert body["stream"] is True
    assert data == before


@pytest.mark.parametrize("shape", [Shape.CHAT, Shape.MESSAGES])
def test_prefill_trims_trailing_whitespace(shape: Shape) -> None:
    built = prefill_body(shape, chat_body(USER), "Once upon a time,\n\n ")
    assert built is not None
    body, trimmed = built
    assert body["messages"][-1] == {"role": "assistant", "content": "Once upon a time,"}
    assert trimmed == "\n\n "


def test_prefill_extends_the_callers_own_string_prefill() -> None:
    own = {"role": "assistant", "content": "Once"}
    data = chat_body(USER, own)
    before = copy.deepcopy(data)
    built = prefill_body(Shape.MESSAGES, data, " upon a time ")
    assert built is not None
    body, trimmed = built
    assert body["messages"] == [USER, {"role": "assistant", "content": "Once upon a time"}]
    assert trimmed == " "
    assert data == before
    assert data["messages"][-1] is own


def test_prefill_extends_the_callers_own_block_prefill() -> None:
    own = {"role": "assistant", "content": [{"type": "text", "text": "{"}]}
    data = chat_body(USER, own)
    before = copy.deepcopy(data)
    built = prefill_body(Shape.MESSAGES, data, '"name": "x"')
    assert built is not None
    assert built[0]["messages"][-1] == {
        "role": "assistant",
        "content": [{"type": "text", "text": "{"}, {"type": "text", "text": '"name": "x"'}],
    }
    assert data == before


def test_prefill_prefix_flag_for_openai_style_providers() -> None:
    built = prefill_body(Shape.CHAT, chat_body(USER), "Once", prefix_flag=True)
    assert built is not None
    assert built[0]["messages"][-1] == {"role": "assistant", "content": "Once", "prefix": True}
    built = prefill_body(Shape.MESSAGES, chat_body(USER), "Once", prefix_flag=True)
    assert built is not None
    assert "prefix" not in built[0]["messages"][-1]


@pytest.mark.parametrize(
    ("shape", "data", "text"),
    [
        (Shape.CHAT, chat_body(USER), ""),
        (Shape.CHAT, chat_body(USER), " \n"),  # nothing worth keeping: retry instead
        (Shape.COMPLETIONS, {"prompt": "x"}, "text"),
        (Shape.RESPONSES, {"input": "x"}, "text"),
        (Shape.OTHER, chat_body(USER), "text"),
        (Shape.CHAT, {"model": "gpt-4o"}, "text"),
        (Shape.MESSAGES, {"messages": "nope"}, "text"),
    ],
)
def test_prefill_impossible(shape: Shape, data: dict[str, Any], text: str) -> None:
    assert prefill_body(shape, data, text) is None


# --- helpers: a broken stream, then its continuation --------------------------------------


def feed_all(tracker: StreamTracker, events: Iterable[bytes], how: str) -> bytes:
    return relay(tracker, splits(b"".join(events), how))


def decode(data: bytes) -> list[tuple[str | None, Any]]:
    return [
        (e.event, None if e.data == "[DONE]" else orjson.loads(e.data))
        for e in SSEDecoder().iter_bytes(iter([data]))
    ]


def chat_text(data: bytes) -> str:
    return "".join(
        (obj["choices"][0]["delta"].get("content") or "")
        for _, obj in decode(data)
        if obj and obj.get("choices")
    )


def resume(
    shape: Shape, broken: StreamTracker, continuation: list[bytes], how: str
) -> tuple[StreamTracker, bytes]:
    built = prefill_body(shape, chat_body(USER), broken.text)
    assert built is not None
    tracker = StreamTracker(shape, splice=Splice(shape, broken, built[1]))
    assert tracker.started
    assert tracker.text == broken.text
    return tracker, feed_all(tracker, continuation, how)


def chat_continuation(*pieces: str) -> list[bytes]:
    events = [sse(chat_chunk({"role": "assistant", "content": ""}))]
    events += [sse(chat_chunk({"content": p})) for p in pieces]
    return [*events, sse(chat_chunk({}, "stop")), DONE]


# --- CHAT splice -------------------------------------------------------------------------------


@pytest.mark.parametrize("how", SPLITS)
def test_chat_splice_continues_the_answer(how: str) -> None:
    original = [sse(chat_chunk({"role": "assistant", "content": ""}))]
    original += [sse(chat_chunk({"content": p})) for p in ["Once", " upon"]]
    broken = StreamTracker(Shape.CHAT)
    first = feed_all(broken, original, how)
    assert broken.complete_on_eof() is None
    assert broken.resumable

    tracker, rest = resume(Shape.CHAT, broken, chat_continuation(" a", " time."), how)
    caller = first + rest
    events = decode(caller)
    # one role chunk, the text in order, one finish, one [DONE]
    roles = [o for _, o in events if o and o["choices"][0]["delta"].get("role")]
    assert len(roles) == 1
    assert chat_text(caller) == "Once upon a time."
    assert tracker.text == "Once upon a time."
    assert tracker.content_seen
    assert tracker.terminated
    assert tracker.finished
    assert tracker.complete_on_eof() == b""
    # events after the role chunk go through byte for byte
    assert rest == b"".join(chat_continuation(" a", " time.")[1:])


@pytest.mark.parametrize(
    ("said", "continued", "expected"),
    [
        ("Once upon a time,\n\n", ["\n\nthere", " was"], "Once upon a time,\n\nthere was"),
        ("Once upon a time,\n\n", ["\n", "\nthere", " was"], "Once upon a time,\n\nthere was"),
        ("Once upon a time, ", ["there", " was"], "Once upon a time, there was"),
        ("Once upon a time, ", [" ", "there", " was"], "Once upon a time, there was"),
    ],
)
def test_chat_splice_does_not_repeat_trimmed_whitespace(
    said: str, continued: list[str], expected: str
) -> None:
    broken = StreamTracker(Shape.CHAT)
    first = feed_all(broken, [sse(chat_chunk({"content": said}))], "whole")
    tracker, rest = resume(Shape.CHAT, broken, chat_continuation(*continued), "seed-4")
    assert chat_text(first + rest) == expected == tracker.text


def test_chat_splice_meters_the_continuation_and_strips_its_usage() -> None:
    broken = StreamTracker(Shape.CHAT, strip_usage=True)
    feed_all(broken, [sse(chat_chunk({"content": "Once"}))], "whole")
    usage = {**chat_chunk({}), "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3}}
    continuation = chat_continuation(" upon", " a time")
    continuation.insert(-1, sse(usage))
    built = prefill_body(Shape.CHAT, chat_body(USER), broken.text)
    assert built is not None
    tracker = StreamTracker(Shape.CHAT, strip_usage=True, splice=Splice(Shape.CHAT, broken, ""))
    rest = feed_all(tracker, continuation, "bytes")
    assert b'"usage":{' not in rest
    assert (tracker.usage.input_tokens, tracker.usage.output_tokens) == (9, 3)


def test_chat_splice_error_before_continuation_content() -> None:
    broken = StreamTracker(Shape.CHAT)
    feed_all(broken, [sse(chat_chunk({"content": "Once"}))], "whole")
    tracker = StreamTracker(Shape.CHAT, splice=Splice(Shape.CHAT, broken, ""))
    err = sse({"error": {"message": "overloaded", "type": "server_error", "code": None}})
    assert tracker.feed(sse(chat_chunk({"role": "assistant", "content": ""}))) == b""
    assert tracker.started
    assert not tracker.content_seen
    out = tracker.feed(err)
    assert out == b""
    assert tracker.error is not None
    assert tracker.error.status == 500


def test_chat_second_break_resumes_with_all_the_text() -> None:
    broken = StreamTracker(Shape.CHAT)
    first = feed_all(broken, [sse(chat_chunk({"content": "One"}))], "whole")
    second, middle = resume(Shape.CHAT, broken, chat_continuation(" two", " ")[:-2], "whole")
    assert second.complete_on_eof() is None
    assert second.text == "One two "
    third, last = resume(Shape.CHAT, second, chat_continuation(" three."), "whole")
    assert chat_text(first + middle + last) == "One two three." == third.text


def test_openai_sdk_reads_the_spliced_stream() -> None:
    broken = StreamTracker(Shape.CHAT)
    first = feed_all(broken, [sse(chat_chunk({"role": "assistant", "content": ""})),
                              sse(chat_chunk({"content": "Hello "}))], "whole")  # fmt: skip
    _, rest = resume(Shape.CHAT, broken, chat_continuation(" world!"), "whole")
    stream = _openai(first + rest).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == "Hello world!"


# --- MESSAGES splice -------------------------------------------------------------------------


def messages_continuation(*pieces: str, first_block: dict[str, Any] | None = None) -> list[bytes]:
    events = [message_start(30), block_start(0, first_block), PING]
    events += [text_delta(0, p) for p in pieces]
    return [*events, block_stop(0), message_delta(output=len(pieces)), MESSAGE_STOP]


def check_indices(data: bytes) -> list[str]:
    """Every block index used is started once, in order, and stopped once; the text per block."""
    blocks: list[str] = []
    open_index: int | None = None
    for name, obj in decode(data):
        assert name == obj["type"]
        index = obj.get("index")
        if name == "content_block_start":
            assert open_index is None
            assert index == len(blocks)
            blocks.append(obj["content_block"].get("text", ""))
            open_index = index
        elif name == "content_block_delta":
            assert index == open_index
            blocks[index] += obj["delta"].get("text", "")
        elif name == "content_block_stop":
            assert index == open_index
            open_index = None
    assert open_index is None
    assert [n for n, _ in decode(data)].count("message_start") == 1
    return blocks


def anthropic_final_text(data: bytes) -> list[str]:
    client = anthropic.Anthropic(api_key="k", base_url="http://sidecar.test",
                                 http_client=_transport(data), max_retries=0)  # fmt: skip
    with client.messages.stream(
        model="claude-haiku-test", max_tokens=50, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        message = stream.get_final_message()
    return [b.text for b in message.content if b.type == "text"]


@pytest.mark.parametrize("how", SPLITS)
def test_messages_splice_into_an_open_text_block(how: str) -> None:
    broken = StreamTracker(Shape.MESSAGES)
    first = feed_all(broken, [message_start(), block_start(0), PING, text_delta(0, "Once"),
                              text_delta(0, " upon")], how)  # fmt: skip
    assert broken.open_index == 0
    assert broken.complete_on_eof() is None

    tracker, rest = resume(Shape.MESSAGES, broken, messages_continuation(" a", " time."), how)
    caller = first + rest
    assert check_indices(caller) == ["Once upon a time."]
    assert anthropic_final_text(caller) == ["Once upon a time."]
    assert tracker.text == "Once upon a time."
    assert tracker.terminated
    assert tracker.finished
    assert (tracker.usage.input_tokens, tracker.usage.output_tokens) == (30, 2)


@pytest.mark.parametrize("how", SPLITS)
def test_messages_splice_after_a_closed_block(how: str) -> None:
    broken = StreamTracker(Shape.MESSAGES)
    first = feed_all(broken, [message_start(), block_start(0), text_delta(0, "Part one."),
                              block_stop(0)], how)  # fmt: skip
    assert broken.open_index is None
    assert broken.next_index == 1

    tracker, rest = resume(Shape.MESSAGES, broken, messages_continuation("Part", " two."), how)
    caller = first + rest
    assert check_indices(caller) == ["Part one.", "Part two."]
    assert anthropic_final_text(caller) == ["Part one.", "Part two."]
    assert tracker.text == "Part one.Part two."


def test_messages_splice_later_blocks_are_shifted() -> None:
    broken = StreamTracker(Shape.MESSAGES)
    original = [message_start(), block_start(0), text_delta(0, "Hi"), block_stop(0),
                block_start(1), text_delta(1, " there")]  # fmt: skip
    first = feed_all(broken, original, "whole")
    continuation = messages_continuation(" you.")
    continuation[-2:-2] = [block_start(1), text_delta(1, "More."), block_stop(1)]
    tracker, rest = resume(Shape.MESSAGES, broken, continuation, "seed-5")
    assert check_indices(first + rest) == ["Hi", " there you.", "More."]
    assert tracker.next_index == 3


@pytest.mark.parametrize(
    ("said", "continued", "expected"),
    [
        ("Once upon a time,\n\n", ["\n\nthere", " was"], "Once upon a time,\n\nthere was"),
        ("Once upon a time,\n\n", ["\n", "\nthere", " was"], "Once upon a time,\n\nthere was"),
        ("Once upon a time, ", ["there", " was"], "Once upon a time, there was"),
    ],
)
def test_messages_splice_does_not_repeat_trimmed_whitespace(
    said: str, continued: list[str], expected: str
) -> None:
    broken = StreamTracker(Shape.MESSAGES)
    first = feed_all(broken, [message_start(), block_start(0), text_delta(0, said)], "whole")
    tracker, rest = resume(Shape.MESSAGES, broken, messages_continuation(*continued), "bytes")
    assert check_indices(first + rest) == [expected]
    assert tracker.text == expected


def test_messages_splice_continuation_starting_with_text_in_its_block_start() -> None:
    broken = StreamTracker(Shape.MESSAGES)
    first = feed_all(broken, [message_start(), block_start(0), text_delta(0, "Once ")], "whole")
    continuation = messages_continuation(" a time", first_block={"type": "text", "text": " upon"})
    tracker, rest = resume(Shape.MESSAGES, broken, continuation, "whole")
    assert check_indices(first + rest) == ["Once upon a time"] == [tracker.text]


def test_messages_splice_continuation_starting_with_a_tool_block() -> None:
    broken = StreamTracker(Shape.MESSAGES)
    first = feed_all(broken, [message_start(), block_start(0), text_delta(0, "Let me")], "whole")
    tool = {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}
    continuation = [message_start(), block_start(0, tool), block_stop(0),
                    message_delta("tool_use"), MESSAGE_STOP]  # fmt: skip
    tracker, rest = resume(Shape.MESSAGES, broken, continuation, "whole")
    assert check_indices(first + rest) == ["Let me", ""]
    assert not tracker.resumable


def test_messages_second_break_resumes_with_all_the_text() -> None:
    broken = StreamTracker(Shape.MESSAGES)
    first = feed_all(broken, [message_start(), block_start(0), text_delta(0, "One")], "whole")
    second, middle = resume(Shape.MESSAGES, broken, messages_continuation(" two")[:4], "whole")
    assert second.complete_on_eof() is None
    assert second.text == "One two"
    assert second.open_index == 0
    third, last = resume(Shape.MESSAGES, second, messages_continuation(" three."), "whole")
    assert check_indices(first + middle + last) == ["One two three."]
    assert third.text == "One two three."


def test_splice_without_text_resends_the_original_request() -> None:
    """Content seen but no text (a closed empty block): no prefill, the original body again,
    still spliced because the caller already has the stream's preamble."""
    broken = StreamTracker(Shape.MESSAGES)
    first = feed_all(broken, [message_start(), block_start(0), block_stop(0)], "whole")
    assert broken.started
    assert broken.resumable
    assert prefill_body(Shape.MESSAGES, chat_body(USER), broken.text) is None
    tracker = StreamTracker(Shape.MESSAGES, splice=Splice(Shape.MESSAGES, broken, ""))
    rest = feed_all(tracker, messages_continuation("Hello", " there."), "seed-6")
    assert check_indices(first + rest) == ["", "Hello there."]
    assert anthropic_final_text(first + rest) == ["", "Hello there."]
