"""sidecar.streams on its cheap paths: however a stream is cut into chunks, the tracker forwards
the same bytes and ends in the same state, and it reads each event once, without keeping the
tracker alive in a reference cycle."""

from __future__ import annotations

import collections
import gc
import random
from collections.abc import Callable, Iterator
from typing import Any, Final

import orjson
import pytest

from sidecar import streams
from sidecar.streams import Shape, StreamTracker
from tests.test_streams import (
    CHAT_USAGE,
    DONE,
    PIECES,
    chat_chunk,
    chat_events,
    completions_events,
    gemini_events,
    messages_events,
    responses_events,
    sse,
)

# --- streams, as providers send them and as a hostile upstream might ------------------------

STREAMS: dict[str, tuple[Shape, Callable[[], list[bytes]]]] = {
    "chat": (Shape.CHAT, chat_events),
    "completions": (Shape.COMPLETIONS, completions_events),
    "responses": (Shape.RESPONSES, responses_events),
    "messages": (Shape.MESSAGES, messages_events),
    "gemini": (Shape.GEMINI, gemini_events),
}
ERRORS = {
    Shape.CHAT: sse({"error": {"message": "boom", "type": "server_error"}}),
    Shape.COMPLETIONS: sse({"error": {"message": "boom", "type": "server_error"}}),
    Shape.RESPONSES: sse({"type": "error", "code": "server_error", "message": "boom"}, "error"),
    Shape.MESSAGES: sse({"type": "error", "error": {"type": "overloaded_error"}}, "error"),
    Shape.GEMINI: b'data: {"error":{"code":503,"message":"x","status":"UNAVAILABLE"}}\r\n\r\n',
}


def variants(shape: Shape, events: list[bytes]) -> Iterator[tuple[str, bytes]]:
    """The stream, and the same stream with what the careful path exists for."""
    raw = b"".join(events)
    mid = len(events) // 2
    head, tail = b"".join(events[:mid]), b"".join(events[mid:])
    lf = raw.replace(b"\r\n", b"\n")
    yield "as sent", raw
    yield "lf", lf
    yield "crlf", lf.replace(b"\n", b"\r\n")
    yield (
        "mixed line ends",
        b"".join(
            e.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            if i % 2
            else e.replace(b"\r\n", b"\n")
            for i, e in enumerate(events)
        ),
    )
    yield "comments", b": keep-alive\n\n" + b"".join(e + b": c\n\n" for e in events)
    yield "data without a space", raw.replace(b"data: ", b"data:")
    yield "an empty line", head + b"\n" + tail
    yield "an empty line first", b"\n" + raw
    yield "multi-line data", b"".join(e.replace(b',"', b',\ndata: "', 1) for e in events)
    yield "a lone cr", b"".join(e.replace(b',"', b',\r"', 1) for e in events)
    yield "malformed", head + b'data: {"choices": [\n\n' + tail
    yield "empty data", head + b"data: \n\n" + tail
    yield "not an object", head + b"data: 5\n\ndata: []\n\n" + tail
    yield "in-band error", head + ERRORS[shape] + tail
    yield "cut", raw[:-7]
    yield "junk after the end", raw + b"data: junk\n\n"
    if shape is Shape.CHAT:
        usage = sse(CHAT_USAGE)
        yield "two usage chunks", raw.replace(DONE, usage + DONE)
        yield "usage in the middle", head + usage + tail


def chunkings(data: bytes, events: int) -> Iterator[list[bytes]]:
    """Whole, event by event, cut at sampled offsets (every offset for `events` == 0)."""
    yield [data]
    yield [e + b"\n\n" for e in data.split(b"\n\n")[:-1]] + (
        [] if data.endswith(b"\n\n") else [data.rpartition(b"\n\n")[2]]
    )
    step = 1 if events == 0 else 13
    for i in range(1, len(data), step):
        yield [data[:i], data[i:]]
    rng = random.Random(len(data))
    for _ in range(10):
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(2, 20))))
        yield [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def outcome(shape: Shape, chunks: list[bytes], **kwargs: Any) -> dict[str, object]:
    """Everything the proxy can see of a relayed stream."""
    tracker = StreamTracker(shape, **kwargs)
    out = b"".join(tracker.feed(c) for c in chunks) + tracker.finish()
    error = tracker.error
    return {
        "out": out,
        "error": None if error is None else (error.status, error.body, error.message),
        "malformed": tracker.malformed,
        "content_seen": tracker.content_seen,
        "events": tracker.events,
        "usage": tracker.usage,
        "terminated": tracker.terminated,
        "cut": tracker.cut,
        "complete_on_eof": tracker.complete_on_eof(),
        "terminator": tracker.terminator(),
        "text": tracker.text,
        "resumable": tracker.resumable,
        "finished": tracker.finished,
    }


CASES = [
    (name, shape, label, data)
    for name, (shape, make) in STREAMS.items()
    for label, data in variants(shape, make())
]


@pytest.mark.parametrize(("name", "shape", "label", "data"), CASES,
                         ids=[f"{c[0]}-{c[2]}" for c in CASES])  # fmt: skip
def test_any_chunking_gives_what_one_chunk_gives(
    name: str, shape: Shape, label: str, data: bytes
) -> None:
    expected = outcome(shape, [data], strip_usage=True)
    for chunks in chunkings(data, 1):
        assert outcome(shape, chunks, strip_usage=True) == expected, (name, label, chunks)


@pytest.mark.parametrize("name", ["chat", "gemini", "messages"])
def test_every_split_point_of_a_real_stream(name: str) -> None:
    shape, make = STREAMS[name]
    data = b"".join(make())
    expected = outcome(shape, [data], strip_usage=True)
    assert expected["out"]
    assert expected["complete_on_eof"] == b""
    for chunks in chunkings(data, 0):
        assert outcome(shape, chunks, strip_usage=True) == expected, chunks


# --- the cheap paths relay what came, as it came --------------------------------------------


def test_a_live_chat_stream_is_relayed_chunk_for_chunk() -> None:
    events = chat_events(usage=False)
    tracker = StreamTracker(Shape.CHAT)
    for event in events:
        assert tracker.feed(event) is event
    assert tracker.terminated
    assert tracker.text == "Hello from the mock provider."


@pytest.mark.parametrize("how", ["whole", "events"])
def test_a_gemini_stream_with_crlf_is_relayed_as_it_came(how: str) -> None:
    events = gemini_events()
    chunks = [b"".join(events)] if how == "whole" else events
    tracker = StreamTracker(Shape.GEMINI)
    for chunk in chunks:
        assert tracker.feed(chunk) is chunk
    assert tracker.finished
    assert tracker.usage.output_tokens > 0


# --- each event is read once ---------------------------------------------------------------


def count_parses(monkeypatch: pytest.MonkeyPatch, *lane: str) -> list[bytes]:
    """What the tracker parses, in order: with orjson (the careful path, and reading later
    what the lane kept), and with each of sidecar.streams' msgspec decoders named in `lane`
    (`_read_event`, `_read_opening`, `_read_choices`)."""
    parsed: list[bytes] = []

    def counted(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def counting(data: Any) -> Any:
            parsed.append(bytes(data))
            return parse(data)

        return counting

    monkeypatch.setattr(orjson, "loads", counted(orjson.loads))  # the module streams calls
    for name in lane:
        monkeypatch.setattr(streams, name, counted(getattr(streams, name)))
    return parsed



@pytest.mark.parametrize("how", ["whole", "events", "pairs", "bytes"])
@pytest.mark.parametrize("name", list(STREAMS))
def test_each_event_is_parsed_once(name: str, how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    shape, make = STREAMS[name]
    events = make()
    json_events = sum(1 for e in events if b"[DONE]" not in e)
    data = b"".join(events)
    if how == "whole":
        chunks = [data]
    elif how == "events":
        chunks = events
    elif how == "pairs":
        chunks = [b"".join(events[i : i + 2]) for i in range(0, len(events), 2)]
    else:
        chunks = [data[i : i + 1] for i in range(len(data))]
    # The lane's parse, the same before any content, and a usage chunk's `choices`.
    parsed = count_parses(monkeypatch, "_read_event", "_read_opening", "_read_choices")
    tracker = StreamTracker(shape, strip_usage=True)
    for chunk in chunks:
        tracker.feed(chunk)
    tracker.finish()
    assert tracker.complete_on_eof() == b""
    # Each event once; on the fast lane, the usage chunk the sidecar strips is read once more
    # for its `choices` (the lane's parse reads only `error` and `usage`).
    again = [data for data in set(parsed) if parsed.count(data) > 1]
    laned = shape is Shape.CHAT and how != "bytes"
    assert again == ([orjson.dumps(CHAT_USAGE)] if laned else [])
    assert len(parsed) == json_events + laned


def test_a_tracker_is_freed_without_the_cycle_collector() -> None:
    gc.collect()
    gc.disable()
    try:
        for shape, make in STREAMS.values():
            tracker = StreamTracker(shape, strip_usage=True)
            for event in make():
                tracker.feed(event)
            del tracker
        assert gc.collect() == 0
    finally:
        gc.enable()


# --- the fast lane reads what the careful path reads ----------------------------------------


def content(text: str) -> bytes:
    return sse(chat_chunk({"content": text}))


@pytest.mark.parametrize("how", ["apart", "together"])
def test_an_error_key_spelled_with_an_escape_stops_the_lane(how: str) -> None:
    error = b'data: {"\\u0065rror": {"message": "boom", "type": "server_error"}}\n\n'
    tracker = StreamTracker(Shape.CHAT)
    assert tracker.feed(content("a")) == content("a")
    chunks = [content("b"), error] if how == "apart" else [content("b") + error]
    out = b"".join(tracker.feed(c) for c in chunks)
    assert out == content("b")
    assert tracker.error is not None
    assert tracker.error.message == "boom"


@pytest.mark.parametrize("how", ["apart", "together"])
def test_usage_spelled_with_a_space_is_metered_in_the_lane(how: str) -> None:
    usage = b'data: {"choices": [], "usage" : {"prompt_tokens": 3, "completion_tokens": 4}}\n\n'
    tracker = StreamTracker(Shape.CHAT, strip_usage=True)
    tracker.feed(content("a"))
    chunks = [content("b"), usage, DONE] if how == "apart" else [content("b") + usage + DONE]
    out = b"".join(tracker.feed(c) for c in chunks)
    assert out == content("b") + DONE
    assert (tracker.usage.input_tokens, tracker.usage.output_tokens) == (3, 4)


@pytest.mark.parametrize("how", ["apart", "together", "right after the first content"])
def test_an_empty_data_event_in_the_lane_is_malformed(how: str) -> None:
    tracker = StreamTracker(Shape.CHAT)
    if how != "right after the first content":  # else the lane starts at the empty event
        tracker.feed(content("a"))
    chunks = [content("b"), b"data: \n\n"] if how == "apart" else [content("b") + b"data: \n\n"]
    assert b"".join(tracker.feed(c) for c in chunks) == content("b")
    assert tracker.malformed


_EMPTY_THEN_DONE = b"data: \n\n" + DONE


@pytest.mark.parametrize(
    "chunks",
    [
        [_EMPTY_THEN_DONE],
        [sse(chat_chunk({"role": "assistant", "content": ""})), _EMPTY_THEN_DONE],
        [sse(chat_chunk({"role": "assistant", "content": ""})) + _EMPTY_THEN_DONE],
        [content("a") + _EMPTY_THEN_DONE],
        [content("a"), _EMPTY_THEN_DONE],
        [content("a"), content("b") + _EMPTY_THEN_DONE],
    ],
)
def test_an_empty_data_event_before_done_is_malformed_on_every_path(chunks: list[bytes]) -> None:
    data = b"".join(chunks)
    careful = outcome(Shape.CHAT, [data[i : i + 5] for i in range(0, len(data), 5)])
    assert careful["malformed"]
    assert outcome(Shape.CHAT, chunks) == careful


@pytest.mark.parametrize("how", ["one chunk", "an event a chunk"])
def test_many_small_events_kept_unread_are_read_before_they_pile_up(
    how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lane's bound on what it keeps unread counts each kept event's own cost, not only
    its bytes: 20,000 events of 2 bytes (40 kB) are read, and let go, before the stream ends."""
    tracker = StreamTracker(Shape.CHAT)
    tracker.feed(content("a"))
    read = count_parses(monkeypatch)  # orjson only: reading what the lane kept
    events = [b"data: {}\n\n"] * 20_000
    for chunk in [b"".join(events)] if how == "one chunk" else events:
        tracker.feed(chunk)
    assert len(read) >= 10_000  # read on the way (without the count of objects: none)
    assert tracker.content_seen
    assert not tracker.malformed


@pytest.mark.parametrize("split_every", [0, 500])
def test_a_long_stream_leaves_the_lane_and_parses_each_later_event_once(
    monkeypatch: pytest.MonkeyPatch, split_every: int
) -> None:
    """Past 1 MiB kept by the lane over the stream, what it kept is read, and the rest of
    the stream goes the careful way: each later event is parsed once, not kept and read
    again. Also when now and then an event comes split (the careful path reads it, and what
    the lane kept before it first)."""
    parsed = count_parses(monkeypatch, "_read_event")
    events = [content(f"w{i} ") for i in range(8000)]  # about 1.6 MiB
    tracker = StreamTracker(Shape.CHAT)
    for i, event in enumerate(events):
        if split_every and i % split_every == split_every - 1:
            assert tracker.feed(event[:10]) + tracker.feed(event[10:]) == event
        else:
            assert tracker.feed(event) is event
    assert tracker.text == "".join(f"w{i} " for i in range(8000))
    times = collections.Counter(parsed)
    assert all(times[e[6:-2]] == 1 for e in events[-2000:])
    assert all(times[events[i][6:-2]] == 2 for i in (1, 100, 1000))  # kept, then read


def test_the_lane_strips_every_usage_chunk_the_sidecar_asked_for() -> None:
    usage = sse(CHAT_USAGE)
    data = content("a") + content("b") + usage + usage + DONE
    for chunks in ([data], [content("a"), data[len(content("a")) :]]):
        tracker = StreamTracker(Shape.CHAT, strip_usage=True)
        assert b"".join(tracker.feed(c) for c in chunks) == content("a") + content("b") + DONE
        assert tracker.usage.output_tokens == 5


_USAGE_SPELLINGS = {
    # (the event's JSON after `data: `, whether it is the usage chunk to strip)
    "as openai writes it": (b'{"choices":[],"usage":' + orjson.dumps(CHAT_USAGE["usage"]) + b"}", True),
    "spaces in the list": (b'{"choices": [ ],"usage":{"completion_tokens":5}}', True),
    "the last of repeated keys is empty": (
        b'{"choices":[{"index":0,"delta":{"content":"x"}}],"choices":[],"usage":{}}', True),
    "the last of repeated keys has content": (
        b'{"choices":[],"choices":[{"index":0,"delta":{"content":"x"}}],"usage":{}}', False),
    "no choices": (b'{"usage":{"completion_tokens":5}}', False),
    "choices null": (b'{"choices":null,"usage":{"completion_tokens":5}}', False),
    "an escaped key": (b'{"ch\\u006fices":[],"usage":{"completion_tokens":5}}', True),
}  # fmt: skip


@pytest.mark.parametrize("label", list(_USAGE_SPELLINGS))
def test_a_usage_chunk_is_stripped_alike_on_both_paths(label: str) -> None:
    event, stripped = _USAGE_SPELLINGS[label]
    usage = b"data: " + event + b"\n\n"
    lane = content("a") + content("b") + usage + DONE  # content first: the lane reads it
    careful = usage + content("a") + DONE  # before any content: the careful path reads it
    for data, kept in ((lane, content("a") + content("b") + DONE), (careful, content("a") + DONE)):
        for chunks in ([data], [e + b"\n\n" for e in data.split(b"\n\n")[:-1]]):
            tracker = StreamTracker(Shape.CHAT, strip_usage=True)
            out = b"".join(tracker.feed(c) for c in chunks) + tracker.finish()
            assert out == (kept if stripped else data), (label, chunks)


# --- what the lane's parse (msgspec) accepts is what the careful path (orjson) accepts ---------

_CONTENT = content("x")  # a lane event to change, as `variants` would not
_ODD_EVENTS = {
    # msgspec skips strings it does not read without checking their UTF-8; orjson checks
    "invalid utf-8": _CONTENT.replace(b'"x"', b'"\xff"'),
    "an encoded surrogate": _CONTENT.replace(b'"x"', b'"\xed\xa0\x80"'),
    "an overlong encoding": _CONTENT.replace(b'"x"', b'"\xc0\xaf"'),
    "valid utf-8": _CONTENT.replace(b'"x"', "\"h\u00e9llo \u4e16\u754c\"".encode()),
    # orjson refuses it, and so does msgspec
    "an escaped lone surrogate": _CONTENT.replace(b'"x"', b'"\\ud800"'),
    "a number near the limit": _CONTENT.replace(b'"created":', b'"created":1.5e308,"c":'),
    "a long number in a string": _CONTENT.replace(b'"x"', b'"e100 ' + b"7" * 300 + b'"'),
    # deeper than msgspec reads, not than orjson: the careful path reads it
    "deeper than msgspec reads": _CONTENT.replace(
        b'"id":', b'"deep":' + b"[" * 1010 + b"]" * 1010 + b',"id":'
    ),
    "too deep for any": _CONTENT.replace(b'"id":', b'"deep":' + b"[" * 1100 + b"]" * 1100 + b',"id":'),
    # a bare CR ends the line for a caller's SSE parser: it would get `{...,` only
    "a bare cr in the data": _CONTENT.replace(b',"', b',\r"', 1),
    "a cr before a crlf line end": _CONTENT.replace(b"\n\n", b"\r\r\n\r\n"),
    "a cr before a crlf line end, no space": _CONTENT.replace(b"\n\n", b"\r\r\n\r\n").replace(
        b"data: ", b"data:"
    ),
    # line ends may mix: a CRLF data line, then an LF blank line
    "a crlf line then an lf one": _CONTENT.replace(b"\n\n", b"\r\n\n"),
    "crlf line ends": _CONTENT.replace(b"\n\n", b"\r\n\r\n"),
    # a line break inside the data: JSON to msgspec, but SSE ends the data at the line
    "a line break in the data": _CONTENT.replace(b',"', b',\n"', 1),
    "not an object": b"data: [1, 2]\n\n",
    "not json": b"data: {nope}\n\n",
    "NaN": _CONTENT.replace(b'"created":', b'"created":NaN,"c":'),
}


@pytest.mark.parametrize("label", list(_ODD_EVENTS))
def test_the_lane_and_the_careful_path_agree_on_an_odd_event(label: str) -> None:
    """The same stream as whole events (the fast lane reads the odd one) and cut one byte at a
    time (the careful path does): the same bytes out, the same verdict."""
    odd = _ODD_EVENTS[label]
    data = content("a") + content("b") + odd + content("c") + DONE
    lane = outcome(Shape.CHAT, [content("a"), content("b"), odd, content("c"), DONE])
    together = outcome(Shape.CHAT, [content("a"), data[len(content("a")) :]])
    careful = outcome(Shape.CHAT, [data[i : i + 1] for i in range(len(data))])
    assert lane == careful
    assert together == careful


@pytest.mark.parametrize(
    ("label", "relayed"),
    [("invalid utf-8", False), ("an encoded surrogate", False),
     ("an escaped lone surrogate", False), ("a number near the limit", True),
     ("a long number in a string", True), ("deeper than msgspec reads", True),
     ("too deep for any", False), ("a line break in the data", False),
     ("a bare cr in the data", False), ("a cr before a crlf line end", False),
     ("a cr before a crlf line end, no space", False), ("a crlf line then an lf one", True),
     ("crlf line ends", True), ("NaN", False), ("not an object", True),
     ("valid utf-8", True)],
)  # fmt: skip
def test_an_odd_event_is_relayed_only_if_it_is_json(label: str, relayed: bool) -> None:
    odd = _ODD_EVENTS[label]
    tracker = StreamTracker(Shape.CHAT)
    out = b"".join(tracker.feed(c) for c in (content("a"), content("b"), odd, content("c")))
    if relayed:
        assert out == content("a") + content("b") + odd + content("c")
        assert not tracker.malformed
    else:
        assert out == content("a") + content("b")
        assert tracker.malformed


_OUT_OF_RANGE = {
    "an exponent": _CONTENT.replace(b'"created":', b'"created":1e999,"c":'),
    "a two-digit exponent": _CONTENT.replace(b'"created":', b'"created":1' + b"0" * 250 + b'e99,"c":'),
    "an int of 400 digits": _CONTENT.replace(b'"created":', b'"created":' + b"9" * 400 + b',"c":'),
}


@pytest.mark.parametrize("label", list(_OUT_OF_RANGE))
def test_a_number_out_of_a_doubles_range_is_relayed_by_the_lane_only(label: str) -> None:
    """The one known difference (`_lane_event`): valid JSON to msgspec, which skips it, and an
    error to orjson. The lane relays the event and cannot read it again later (so the stream
    is no longer resumed); the careful path finds it malformed. Nothing raises."""
    odd = _OUT_OF_RANGE[label]
    events = [content("a"), content("b"), odd, content("c"), DONE]
    lane = outcome(Shape.CHAT, events)
    assert lane["out"] == b"".join(events)
    assert not lane["malformed"]
    assert lane["resumable"] is False
    data = b"".join(events)
    careful = outcome(Shape.CHAT, [data[i : i + 1] for i in range(len(data))])
    assert careful["out"] == content("a") + content("b")
    assert careful["malformed"]


def test_text_read_later_includes_an_event_the_careful_way_read() -> None:
    odd = _ODD_EVENTS["a long number in a string"]
    tracker = StreamTracker(Shape.CHAT)
    for chunk in (content("a"), content("b") + odd + content("c")):
        tracker.feed(chunk)
    assert tracker.text == "ab" + "e100 " + "7" * 300 + "c"
    assert tracker.resumable


@pytest.mark.parametrize("how", ["apart", "together"])
def test_reading_the_lane_later_does_not_rewind_the_usage(how: str) -> None:
    """Usage is metered as the events are relayed; the text read later must not set it back
    to an earlier event's."""
    early = sse({**chat_chunk({"content": "b"}), "usage": {"prompt_tokens": 1, "completion_tokens": 2}})
    late = sse({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 50}})
    tracker = StreamTracker(Shape.CHAT, strip_usage=True)
    tracker.feed(content("a"))
    chunks = [early, late] if how == "apart" else [early + late]
    assert b"".join(tracker.feed(c) for c in chunks) == early
    assert tracker.usage.output_tokens == 50
    assert tracker.resumable
    assert tracker.text == "ab"
    assert tracker.usage.output_tokens == 50


@pytest.mark.parametrize(
    ("shape", "event"),
    [
        (Shape.CHAT, {"choices": [{"index": [], "delta": {"content": "x"}}]}),
        (Shape.CHAT, {"choices": [{"index": {}, "delta": {}, "finish_reason": "stop"}]}),
        (Shape.COMPLETIONS, {"choices": [{"index": [1], "text": "x"}]}),
        (Shape.RESPONSES, {"type": ["response.completed"]}),
        (Shape.MESSAGES, {"type": {"a": 1}}),
        (Shape.GEMINI, {"candidates": [{"index": {}, "content": {"parts": [{"text": "x"}]}}]}),
    ],
)
def test_an_unhashable_index_or_type_is_no_index_and_raises_nothing(
    shape: Shape, event: dict[str, Any]
) -> None:
    tracker = StreamTracker(shape)
    line_end = b"\r\n\r\n" if shape is Shape.GEMINI else b"\n\n"
    data = b"data: " + orjson.dumps(event) + line_end
    assert tracker.feed(data) == data
    for chunk in (data, data[:9], data[9:]):
        tracker.feed(chunk)
    tracker.finish()
    assert not tracker.malformed
    (tracker.text, tracker.resumable, tracker.finished, tracker.complete_on_eof())


#: Bytes that matter to JSON, UTF-8 and SSE.
_ALPHABET: Final = b'{}[]",:\\0123456789.eE+-truefalsn \t\r\n\x01\x7f\xff\xc3\xa9\xed\xa0\x80'


def mutated(rng: random.Random, event: bytes) -> bytes:
    """`event` with one to three bytes deleted or inserted, after its `data: `."""
    out = bytearray(event)
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(6, len(out) - 2)
        if rng.random() < 0.5:
            del out[at]
        else:
            out.insert(at, rng.choice(_ALPHABET))
    return bytes(out)


def test_mutated_events_get_one_verdict_whichever_path_reads_them() -> None:
    """Random edits of a lane event (bytes that matter to JSON, UTF-8 and SSE): the lane and the
    careful path relay the same bytes and stop for the same reasons."""
    rng = random.Random(1405)
    base = content("h\u00e9") + sse(CHAT_USAGE)
    for _ in range(300):
        odd = mutated(rng, base)
        data = content("a") + content("b") + odd + DONE
        lane = outcome(Shape.CHAT, [content("a"), data[len(content("a")) :]], strip_usage=True)
        careful = outcome(Shape.CHAT, [data[i : i + 7] for i in range(0, len(data), 7)],
                          strip_usage=True)  # fmt: skip
        assert lane == careful, odd


# --- before the first content the lane also tells content, as `_chat` does ------------------


def opening(choices: object, **fields: object) -> bytes:
    return sse({"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": choices, **fields})


def delta_of(delta: object, finish: object = None) -> bytes:
    return opening([{"index": 0, "delta": delta, "finish_reason": finish}])


_OPENINGS = {
    # (the event before any content, whether `_chat` finds content in it)
    "the role": (delta_of({"role": "assistant", "content": ""}), False),
    "the role, no content key": (delta_of({"role": "assistant"}), False),
    "text": (delta_of({"content": "hi"}), True),
    "text that is not ascii": (delta_of({"content": "h\u00e9llo \u4e16\u754c"}), True),
    "a tool call": (delta_of({"tool_calls": [{"index": 0, "id": "c", "function": {}}]}), True),
    "no tool calls": (delta_of({"content": "", "tool_calls": []}), False),
    "a function call": (delta_of({"function_call": {"name": "f"}}), True),
    "an empty function call": (delta_of({"function_call": {}}), False),
    "a refusal": (delta_of({"refusal": "no"}), True),
    "an empty refusal": (delta_of({"refusal": ""}), False),
    "reasoning": (delta_of({"reasoning_content": "hmm"}), True),
    "a finish reason": (delta_of({}, "stop"), True),
    "a finish reason that is not a string": (delta_of({}, 0), True),
    "content zero": (delta_of({"content": 0}), False),
    "content one": (delta_of({"content": 1}), True),
    "content false": (delta_of({"content": False}), False),
    "content true": (delta_of({"content": True}), True),
    "content an empty list": (delta_of({"content": []}), False),
    "content a list": (delta_of({"content": [1]}), True),
    "content an object": (delta_of({"content": {"a": 1}}), True),
    "a null delta": (delta_of(None), False),
    "a delta that is a string": (delta_of("hi"), False),
    "a delta that is a list": (delta_of(["hi"]), False),
    "no delta": (opening([{"index": 0}]), False),
    "a null choice": (opening([None, {"index": 1, "delta": {"content": ""}}]), False),
    "a choice that is a number, then text": (opening([5, {"delta": {"content": "x"}}]), True),
    "text in the second choice": (
        opening([{"index": 0, "delta": {}}, {"index": 1, "delta": {"content": "x"}}]), True),
    "choices null": (opening(None), False),
    "choices an object": (opening({"delta": {"content": "x"}}), False),
    "choices a string": (opening("x"), False),
    "no choices": (sse({"id": "chatcmpl-1"}), False),
    "usage, no choices": (opening([], usage={"prompt_tokens": 3, "completion_tokens": 0}), False),
    "usage that is not an object": (opening([], usage=5), False),
    "an error that is null": (delta_of({"content": "x"})[:-3] + b',"error":null}\n\n', True),
    "an error": (opening([], error={"message": "boom", "type": "server_error"}), False),
    "the last of repeated contents is empty": (
        b'data: {"choices":[{"delta":{"content":"a","content":""}}]}\n\n', False),
    "the last of repeated contents is text": (
        b'data: {"choices":[{"delta":{"content":"","content":"a"}}]}\n\n', True),
    "the last of repeated deltas is null": (
        b'data: {"choices":[{"delta":{"content":"a"},"delta":null}]}\n\n', False),
    "an escaped key": (b'data: {"choices":[{"delta":{"\\u0063ontent":"a"}}]}\n\n', True),
    "a long number": (delta_of({"content": ""})[:-3] + b',"n":' + b"9" * 40 + b"}\n\n", False),
    "a comment line": (b": hello\n\n", False),
    "an event name": (b"event: x\n" + delta_of({"content": "x"}), True),
    "not json": (b"data: {nope}\n\n", False),
    "not an object": (b"data: [1]\n\n", False),
}  # fmt: skip


def _seen_after_each(chunks: list[bytes], ends: list[int]) -> list[bool]:
    """`content_seen` after the chunk that ends at each of `ends` (offsets in the stream)."""
    tracker = StreamTracker(Shape.CHAT, strip_usage=True)
    seen, at = [], 0
    for chunk in chunks:
        tracker.feed(chunk)
        at += len(chunk)
        if at in ends:
            seen.append(tracker.content_seen)
    return seen


@pytest.mark.parametrize("label", list(_OPENINGS))
def test_before_any_content_the_lane_finds_content_where_the_careful_path_does(label: str) -> None:
    """An odd event first, then the role, text and the end; fed an event a chunk (the lane
    reads each), whole (the lane reads the chunk), and in cuts of 7 bytes or each event in two
    (the careful path): the same bytes out, the same verdicts, and content seen after the same
    events."""
    odd, is_content = _OPENINGS[label]
    events = [odd, delta_of({"role": "assistant", "content": ""}), content("a"), DONE]
    data = b"".join(events)
    ends = [sum(map(len, events[: i + 1])) for i in range(len(events))]
    cuts = [data[i : i + 7] for i in range(0, len(data), 7)]
    careful = outcome(Shape.CHAT, cuts, strip_usage=True)
    for chunks in (events, [data], [odd, data[len(odd) :]]):
        assert outcome(Shape.CHAT, chunks, strip_usage=True) == careful, chunks
    halves = [half for e in events for half in (e[:7], e[7:])]  # the careful path, by event
    seen = _seen_after_each(events, ends)
    assert seen == _seen_after_each(halves, ends)
    stopped = careful["malformed"] or careful["error"] is not None
    assert seen[0] is (is_content and not stopped)


def test_usage_before_any_content_is_stripped_by_the_lane() -> None:
    usage = sse(CHAT_USAGE)
    events = [delta_of({"role": "assistant", "content": ""}), usage, content("a"), DONE]
    for chunks in (events, [b"".join(events)]):
        tracker = StreamTracker(Shape.CHAT, strip_usage=True)
        out = b"".join(tracker.feed(c) for c in chunks) + tracker.finish()
        assert out == events[0] + content("a") + DONE
        assert tracker.usage.output_tokens == 5
        assert tracker.text == "a"
        assert tracker.finished is False  # no finish_reason came


def test_the_lane_reads_the_opening_once_and_the_careful_path_never(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A whole chat stream (as the mock sends it, one chunk): no event is parsed by orjson
    while it is relayed; asked later, `text` reads them all (once)."""
    events = chat_events()
    tracker = StreamTracker(Shape.CHAT, strip_usage=True)
    data = b"".join(events)
    calls = count_parses(monkeypatch)  # orjson only
    assert tracker.feed(data) == data.replace(sse(CHAT_USAGE), b"")
    assert tracker.content_seen
    assert tracker.terminated
    assert calls == []
    assert tracker.text == "".join(PIECES)
    assert len(calls) == len(events) - 1  # every event but [DONE] (the chunk kept whole)


@pytest.mark.parametrize("label", list(_OUT_OF_RANGE))
def test_a_number_out_of_a_doubles_range_in_the_opening_is_relayed_by_the_lane_only(
    label: str,
) -> None:
    """`_lane_event`'s one known difference, before the first content as after it: the lane
    relays the event; the careful path finds it malformed."""
    odd = _OUT_OF_RANGE[label]
    events = [odd, content("b"), DONE]
    lane = outcome(Shape.CHAT, events)
    assert lane["out"] == b"".join(events)
    assert not lane["malformed"]
    data = b"".join(events)
    careful = outcome(Shape.CHAT, [data[i : i + 1] for i in range(len(data))])
    assert careful["out"] == b""
    assert careful["malformed"]


def test_mutated_openings_get_one_verdict_whichever_path_reads_them() -> None:
    """Random edits of events before any content (bytes that matter to JSON, UTF-8 and SSE):
    the lane and the careful path relay the same bytes, stop for the same reasons and see the
    content start after the same chunk."""
    rng = random.Random(1406)
    bases = [
        delta_of({"role": "assistant", "content": ""}),
        delta_of({"content": "", "tool_calls": [{"index": 0, "function": {"name": "f"}}]}),
        delta_of({"refusal": None, "content": "h\u00e9"}, None),
        opening([{"index": 0, "delta": {}, "finish_reason": "stop"}], usage=CHAT_USAGE["usage"]),
    ]
    for _ in range(400):
        odd = mutated(rng, rng.choice(bases))
        events = [odd, content("b"), DONE]
        data = b"".join(events)
        careful = outcome(Shape.CHAT, [data[i : i + 7] for i in range(0, len(data), 7)],
                          strip_usage=True)  # fmt: skip
        for chunks in ([data], events):
            assert outcome(Shape.CHAT, chunks, strip_usage=True) == careful, odd
        ends = [len(odd), len(odd) + len(content("b")), len(data)]
        halves = [half for e in events for half in (e[:7], e[7:])]
        assert _seen_after_each(events, ends) == _seen_after_each(halves, ends), odd


_KINDS: dict[str, bytes] = {
    "role": delta_of({"role": "assistant", "content": ""}),
    "text": content("x"),
    "empty text": delta_of({"content": ""}),
    "tool call": delta_of({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}),
    "finish": delta_of({}, "stop"),
    "usage": sse(CHAT_USAGE),
    "done": DONE,
    "empty data": b"data: \n\n",
    "comment": b": ping\n\n",
    "error": opening([], error={"message": "boom", "type": "server_error"}),
    "not json": b"data: {nope}\n\n",
    "named": b"event: x\n" + content("y"),
    "crlf": content("z").replace(b"\n", b"\r\n"),
}


def test_random_streams_get_one_verdict_however_they_are_chunked() -> None:
    """Streams of random event kinds, in chunks cut at random event boundaries (the lane
    reads what it can) and in cuts of 5 bytes (the careful path): one outcome, and content
    seen after the same events."""
    rng = random.Random(1407)
    names = list(_KINDS)
    for _ in range(400):
        events = [_KINDS[rng.choice(names)] for _ in range(rng.randint(1, 8))]
        data = b"".join(events)
        bounds = sorted(rng.sample(range(1, len(events)), rng.randint(0, len(events) - 1)))
        chunks = [b"".join(events[a:b]) for a, b in zip([0, *bounds], [*bounds, len(events)], strict=True)]
        strip = rng.random() < 0.5
        careful = outcome(Shape.CHAT, [data[i : i + 5] for i in range(0, len(data), 5)],
                          strip_usage=strip)  # fmt: skip
        assert outcome(Shape.CHAT, chunks, strip_usage=strip) == careful, chunks
        ends = [sum(map(len, events[: i + 1])) for i in range(len(events))]
        halves = [half for e in events for half in (e[:5], e[5:])]
        assert _seen_after_each(events, ends) == _seen_after_each(halves, ends), events


_DEEP = b"[" * 300 + b"]" * 300  # orjson reads 1,024 levels but writes 254


@pytest.mark.parametrize(
    ("shape", "event"),
    [
        (Shape.CHAT, b'data: {"error": {"message": "m", "x": ' + _DEEP + b"}}\n\n"),
        (Shape.COMPLETIONS, b'data: {"error": {"message": "m", "x": ' + _DEEP + b"}}\n\n"),
        (Shape.RESPONSES, b'event: error\ndata: {"type": "error", "message": "m", "x": '
         + _DEEP + b"}\n\n"),
        (Shape.MESSAGES, b'event: error\ndata: {"type": "error", "error": {"type": '
         b'"overloaded_error", "message": "m", "x": ' + _DEEP + b"}}\n\n"),
        (Shape.GEMINI, b'data: {"error": {"code": 503, "message": "m", "x": ' + _DEEP
         + b"}}\r\n\r\n"),
        (Shape.CHAT, b'data: {"error": {"message": "m", "x": ' + b"[" * 1000 + b"]" * 1000
         + b"}}\n\n"),
    ],
)  # fmt: skip
def test_an_in_band_error_nested_deeper_than_orjson_writes_is_still_an_error(
    shape: Shape, event: bytes
) -> None:
    tracker = StreamTracker(shape)
    assert tracker.feed(event) == b""
    assert tracker.error is not None
    assert tracker.error.message == "m"
    body = orjson.loads(tracker.error.body)
    assert body["error"]["message"] == "m"


def test_an_index_that_is_a_float_or_a_bool_still_names_its_choice() -> None:
    for index in (0.0, False):
        finish = sse({"choices": [{"index": index, "delta": {}, "finish_reason": "stop"}]})
        tracker = StreamTracker(Shape.CHAT)
        for chunk in (content("a"), finish):
            tracker.feed(chunk)
        assert tracker.finished
        assert tracker.complete_on_eof() == DONE
