"""Anthropic Messages <-> pivot translation (sidecar/translate/anthropic.py).

Pure unit tests on recorded-style fixtures written here; the stream tests feed what the
translator emits through the official SDKs' own stream accumulators (no network: an
in-memory transport), so "the SDK assembles the same answer" is checked by the SDK.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import anthropic as anthropic_sdk
import httpx2
import openai as openai_sdk
import orjson
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from sidecar.translate import anthropic as tr
from sidecar.translate.base import Unsupported

PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAcCBlCwAAAABJRU5ErkJggg=="
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}

# -- fixtures: a full tool-call round trip in both formats --------------------------------

#: What the Anthropic SDK sends for a second turn of a tool-using conversation.
ANTHROPIC_TOOL_REQUEST: dict[str, Any] = {
    "model": "claude-haiku-4-5",
    "max_tokens": 512,
    "system": "You are terse.",
    "messages": [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Checking."},
                {
                    "type": "tool_use",
                    "id": "toolu_01A",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
                {
                    "type": "tool_use",
                    "id": "toolu_01B",
                    "name": "get_weather",
                    "input": {"city": "Rome"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01A", "content": "18C"},
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_01B",
                    "content": [
                        {"type": "text", "text": "22C"},
                        {"type": "text", "text": "sunny"},
                    ],
                },
                {"type": "text", "text": "Thanks"},
            ],
        },
    ],
    "tools": [
        {"name": "get_weather", "description": "Weather by city", "input_schema": WEATHER_SCHEMA}
    ],
    "tool_choice": {"type": "auto"},
}

#: The same conversation as an OpenAI chat request (the pivot).
PIVOT_TOOL_REQUEST: dict[str, Any] = {
    "model": "claude-haiku-4-5",
    "max_tokens": 512,
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "toolu_01A",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                },
                {
                    "id": "toolu_01B",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_01A", "content": "18C"},
        {
            "role": "tool",
            "tool_call_id": "toolu_01B",
            "content": [{"type": "text", "text": "22C"}, {"type": "text", "text": "sunny"}],
        },
        {"role": "user", "content": "Thanks"},
    ],
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather by city",
                "parameters": WEATHER_SCHEMA,
            },
        }
    ],
    "tool_choice": "auto",
}

#: A recorded Anthropic answer with text and a tool call.
ANTHROPIC_MESSAGE: dict[str, Any] = {
    "id": "msg_01XYZ",
    "type": "message",
    "role": "assistant",
    "model": "claude-haiku-4-5-20251001",
    "content": [
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": {"city": "Paris"}},
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 20,
        "cache_creation_input_tokens": 5,
        "cache_read_input_tokens": 100,
        "output_tokens": 30,
    },
}

#: A recorded OpenAI answer with text and two tool calls.
PIVOT_COMPLETION: dict[str, Any] = {
    "id": "chatcmpl-abc",
    "object": "chat.completion",
    "created": 1764200000,
    "model": "gpt-4o-2024-08-06",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Checking both.",
                "refusal": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    },
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
                    },
                ],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        }
    ],
    "usage": {
        "prompt_tokens": 50,
        "completion_tokens": 12,
        "total_tokens": 62,
        "prompt_tokens_details": {"cached_tokens": 32},
    },
}


def anthropic_stream() -> list[tuple[str, dict[str, Any]]]:
    """A recorded Anthropic stream: text, then a tool call with its input in pieces."""
    return [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_01XYZ",
                    "type": "message",
                    "role": "assistant",
                    "model": "claude-haiku-4-5-20251001",
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {
                        "input_tokens": 20,
                        "cache_creation_input_tokens": 5,
                        "cache_read_input_tokens": 100,
                        "output_tokens": 1,
                    },
                },
            },
        ),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        ("ping", {"type": "ping"}),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "Let me"},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": " check."},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 1,
                "content_block": {
                    "type": "tool_use",
                    "id": "toolu_01A",
                    "name": "get_weather",
                    "input": {},
                },
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": ""},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": '{"city": "Pa'},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": 'ris"}'},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 1}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                "usage": {"output_tokens": 30},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]


def pivot_stream() -> list[dict[str, Any] | None]:
    """A recorded OpenAI stream: text, two tool calls with arguments in pieces, usage, [DONE]."""
    base = {"id": "chatcmpl-abc", "object": "chat.completion.chunk", "created": 1764200000}
    base["model"] = "gpt-4o-2024-08-06"

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {**base, "choices": [choice], "usage": None}

    def call(i: int, args: str, **first: Any) -> dict[str, Any]:
        return chunk({"tool_calls": [{"index": i, **first, "function": {"arguments": args}}]})

    return [
        chunk({"role": "assistant", "content": "", "refusal": None}),
        chunk({"content": "Checking"}),
        chunk({"content": " both."}),
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": ""},
                    }
                ]
            }
        ),
        call(0, '{"city":'),
        call(0, ' "Paris"}'),
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 1,
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
                    }
                ]
            }
        ),
        chunk({}, "tool_calls"),
        {**base, "choices": [], "usage": PIVOT_COMPLETION["usage"]},
        None,
    ]


def run_to_pivot(events: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any] | None]:
    to_pivot = tr.ToPivot("claude-haiku-4-5")
    return [out for name, data in events for out in to_pivot.event(name, data)]


def run_from_pivot(chunks: list[dict[str, Any] | None]) -> list[tuple[str | None, dict[str, Any]]]:
    from_pivot = tr.FromPivot("claude-haiku-4-5")
    return [event for chunk in chunks for event in from_pivot.chunk(chunk)]


def anthropic_sse(events: list[tuple[str | None, dict[str, Any]]]) -> bytes:
    return b"".join(
        b"event: " + str(name).encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
        for name, data in events
    )


def openai_sse(chunks: list[dict[str, Any] | None]) -> bytes:
    return b"".join(
        b"data: [DONE]\n\n" if c is None else b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks
    )


def sse_transport(body: bytes) -> httpx2.MockTransport:
    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    return httpx2.MockTransport(handler)


# -- requests: Anthropic -> pivot ----------------------------------------------------------


def test_request_to_pivot_carries_a_tool_round_trip() -> None:
    assert tr.request_to_pivot(copy.deepcopy(ANTHROPIC_TOOL_REQUEST)) == PIVOT_TOOL_REQUEST


def test_request_to_pivot_carries_sampling_stop_user_and_stream() -> None:
    body = {
        "model": "claude-haiku-4-5",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "hi"}],
        "stop_sequences": ["END", "STOP"],
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 40,
        "metadata": {"user_id": "u-1"},
        "stream": True,
        "thinking": {"type": "disabled"},
    }
    pivot = tr.request_to_pivot(body)
    assert pivot == {
        "model": "claude-haiku-4-5",
        "stream": True,
        "max_tokens": 100,
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 40,
        "stop": ["END", "STOP"],
        "user": "u-1",
        "messages": [{"role": "user", "content": "hi"}],
    }


def test_request_to_pivot_system_blocks_ignore_cache_control() -> None:
    body = {
        "max_tokens": 10,
        "system": [
            {"type": "text", "text": "Rule one.", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "Rule two."},
        ],
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}],
            }
        ],
        "cache_control": {"type": "ephemeral"},
    }
    assert tr.request_to_pivot(body)["messages"] == [
        {
            "role": "system",
            "content": [
                {"type": "text", "text": "Rule one."},
                {"type": "text", "text": "Rule two."},
            ],
        },
        {"role": "user", "content": "hi"},
    ]


def test_request_to_pivot_keeps_a_mid_conversation_system_message() -> None:
    body = {
        "max_tokens": 10,
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "system", "content": "Be brief now."},
            {"role": "user", "content": "b"},
        ],
    }
    roles = [m["role"] for m in tr.request_to_pivot(body)["messages"]]
    assert roles == ["user", "system", "user"]


def test_request_to_pivot_images_base64_and_url() -> None:
    body = {
        "max_tokens": 10,
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64},
                    },
                    {
                        "type": "image",
                        "source": {"type": "url", "url": "https://example.com/cat.jpg"},
                    },
                    {"type": "text", "text": "Same animal?"},
                ],
            }
        ],
    }
    assert tr.request_to_pivot(body)["messages"][0]["content"] == [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
        {"type": "text", "text": "Same animal?"},
    ]


def test_request_to_pivot_tool_result_error_is_prefixed() -> None:
    body = {
        "max_tokens": 10,
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "content": "no such city",
                        "is_error": True,
                    },
                    {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True},
                ],
            }
        ],
    }
    assert tr.request_to_pivot(body)["messages"] == [
        {"role": "tool", "tool_call_id": "toolu_1", "content": "Error: no such city"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: "},
    ]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, {"tool_choice": "auto"}),
        ({"type": "any"}, {"tool_choice": "required"}),
        ({"type": "none"}, {"tool_choice": "none"}),
        (
            {"type": "tool", "name": "get_weather"},
            {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
        ),
        (
            {"type": "auto", "disable_parallel_tool_use": True},
            {"tool_choice": "auto", "parallel_tool_calls": False},
        ),
    ],
)
def test_request_to_pivot_tool_choice(choice: dict[str, Any], expected: dict[str, Any]) -> None:
    body = {"max_tokens": 10, "messages": [], "tool_choice": choice}
    pivot = tr.request_to_pivot(body)
    assert {
        k: v for k, v in pivot.items() if k in ("tool_choice", "parallel_tool_calls")
    } == expected


def test_request_to_pivot_tool_without_schema_and_strict() -> None:
    body = {
        "max_tokens": 10,
        "messages": [],
        "tools": [{"name": "now", "input_schema": {}, "strict": True, "type": "custom"}],
    }
    assert tr.request_to_pivot(body)["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "now",
                "parameters": {"type": "object", "properties": {}},
                "strict": True,
            },
        }
    ]


def test_request_to_pivot_accepts_what_carries_nothing() -> None:
    """What the SDK's `to_param()` echoes back (nulls, empty citations) and a lone stop string."""
    body = {
        "max_tokens": 10,
        "stop_sequences": "END",
        "messages": [
            {"role": "user", "content": "a"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "b", "citations": []},
                    {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "f",
                        "input": {},
                        "caller": {"type": "direct"},
                    },
                ],
            },
        ],
    }
    pivot = tr.request_to_pivot(body)
    assert pivot["stop"] == ["END"]
    assert pivot["messages"][1] == {
        "role": "assistant",
        "content": "b",
        "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ],
    }


def _with_message(content: Any) -> dict[str, Any]:
    return {
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": content}],
    }


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (
            {
                "max_tokens": 10,
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                    {
                        "role": "user",
                        "content": [{"type": "document", "source": {"type": "text", "data": "x"}}],
                    },
                ],
            },
            "messages[2].content[0].type=document",
        ),
        (
            _with_message([{"type": "thinking", "thinking": "hmm", "signature": "s"}]),
            "messages[1].content[0].type=thinking",
        ),
        (
            _with_message([{"type": "redacted_thinking", "data": "x"}]),
            "messages[1].content[0].type=redacted_thinking",
        ),
        (
            {
                "max_tokens": 10,
                "messages": [],
                "thinking": {"type": "enabled", "budget_tokens": 1024},
            },
            "thinking",
        ),
        ({"max_tokens": 10, "messages": [], "output_config": {"effort": "low"}}, "output_config"),
        ({"max_tokens": 10, "messages": [], "service_tier": "auto"}, "service_tier"),
        ({"max_tokens": 10, "messages": [], "frobnicate": 1}, "frobnicate"),
        (
            {"max_tokens": 10, "messages": [], "metadata": {"user_id": "u", "team": "t"}},
            "metadata.team",
        ),
        (
            {
                "max_tokens": 10,
                "messages": [],
                "tools": [{"type": "web_search_20250305", "name": "web_search"}],
            },
            "tools[0].type=web_search_20250305",
        ),
        (
            {
                "max_tokens": 10,
                "messages": [],
                "tools": [{"name": "t", "input_schema": {}, "defer_loading": True}],
            },
            "tools[0].defer_loading",
        ),
        (
            {
                "max_tokens": 10,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "tool_result",
                                "tool_use_id": "toolu_1",
                                "content": [
                                    {
                                        "type": "image",
                                        "source": {"type": "url", "url": "https://x/y.png"},
                                    }
                                ],
                            }
                        ],
                    }
                ],
            },
            "messages[0].content[0].content[0].type=image",
        ),
        (
            {
                "max_tokens": 10,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}],
                    }
                ],
            },
            "messages[0].content[0].source.type=file",
        ),
        (
            {
                "max_tokens": 10,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "x", "citations": [{"type": "char_location"}]}
                        ],
                    }
                ],
            },
            "messages[0].content[0].citations",
        ),
        (
            {"max_tokens": 10, "messages": [], "system": [{"type": "image", "source": {}}]},
            "system[0].type=image",
        ),
        (
            {"max_tokens": 10, "messages": [], "tool_choice": {"type": "maybe"}},
            "tool_choice.type=maybe",
        ),
    ],
)
def test_request_to_pivot_refuses_and_names_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(Unsupported) as caught:
        tr.request_to_pivot(body)
    assert caught.value.field == field


# -- requests: pivot -> Anthropic ----------------------------------------------------------


def test_request_from_pivot_carries_a_tool_round_trip() -> None:
    body = tr.request_from_pivot(copy.deepcopy(PIVOT_TOOL_REQUEST), "claude-haiku-4-5", False)
    assert body == ANTHROPIC_TOOL_REQUEST


def test_round_trip_anthropic_pivot_anthropic_is_identity() -> None:
    pivot = tr.request_to_pivot(copy.deepcopy(ANTHROPIC_TOOL_REQUEST))
    pivot.pop("model")
    assert tr.request_from_pivot(pivot, "claude-haiku-4-5", False) == ANTHROPIC_TOOL_REQUEST


def test_request_from_pivot_several_tool_messages_make_one_user_turn() -> None:
    pivot = {
        "messages": [
            {"role": "user", "content": "go"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "a", "arguments": "{}"},
                    },
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "b", "arguments": ""},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "one"},
            {
                "role": "tool",
                "tool_call_id": "call_2",
                "content": [{"type": "text", "text": "two"}],
            },
        ]
    }
    messages = tr.request_from_pivot(pivot, "claude-x", False)["messages"]
    assert messages == [
        {"role": "user", "content": "go"},
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "call_1", "name": "a", "input": {}},
                {"type": "tool_use", "id": "call_2", "name": "b", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "one"},
                {
                    "type": "tool_result",
                    "tool_use_id": "call_2",
                    "content": [{"type": "text", "text": "two"}],
                },
            ],
        },
    ]


def test_request_from_pivot_tool_call_ids_are_made_anthropic_safe_alike() -> None:
    pivot = {
        "messages": [
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "functions.get:0",
                        "type": "function",
                        "function": {"name": "get", "arguments": "{}"},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "functions.get:0", "content": "ok"},
        ]
    }
    messages = tr.request_from_pivot(pivot, "claude-x", False)["messages"]
    assert messages[0]["content"][0]["id"] == "functions_get_0"
    assert messages[1]["content"][0]["tool_use_id"] == "functions_get_0"


def test_request_from_pivot_systems_merges_and_defaults() -> None:
    pivot = {
        "model": "gpt-4o",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [
            {"role": "system", "content": "Rule one."},
            {"role": "developer", "content": [{"type": "text", "text": "Rule two."}]},
            {"role": "user", "content": "a"},
            {"role": "user", "content": [{"type": "text", "text": "b"}]},
            {"role": "system", "content": "Rule three."},
        ],
        "stop": "END",
        "user": "u-1",
        "temperature": 0.5,
        "top_p": 0.8,
        "top_k": 3,
        "n": 1,
        "presence_penalty": 0,
        "response_format": {"type": "text"},
        "seed": None,
    }
    assert tr.request_from_pivot(pivot, "claude-x", True) == {
        "model": "claude-x",
        "max_tokens": tr.DEFAULT_MAX_TOKENS,
        "stream": True,
        "system": [
            {"type": "text", "text": "Rule one."},
            {"type": "text", "text": "Rule two."},
            {"type": "text", "text": "Rule three."},
        ],
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            }
        ],
        "stop_sequences": ["END"],
        "metadata": {"user_id": "u-1"},
        "temperature": 0.5,
        "top_p": 0.8,
        "top_k": 3,
    }
    assert tr.DEFAULT_MAX_TOKENS == 4096


def test_request_from_pivot_max_tokens_forms() -> None:
    messages = [{"role": "user", "content": "a"}]
    assert (
        tr.request_from_pivot({"messages": messages, "max_tokens": 7}, "m", False)["max_tokens"]
        == 7
    )
    body = tr.request_from_pivot({"messages": messages, "max_completion_tokens": 9}, "m", False)
    assert body["max_tokens"] == 9
    assert "stream" not in body


def test_request_from_pivot_images_base64_and_url() -> None:
    pivot = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Same?"},
                    {
                        "type": "image_url",
                        "image_url": {"url": f"data:image/png;base64,{PNG_B64}", "detail": "auto"},
                    },
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                ],
            }
        ]
    }
    assert tr.request_from_pivot(pivot, "m", False)["messages"][0]["content"] == [
        {"type": "text", "text": "Same?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]


def test_request_from_pivot_tools_and_choices() -> None:
    tools = [
        {"type": "function", "function": {"name": "now"}},
        {
            "type": "function",
            "function": {"name": "w", "parameters": {"properties": {}}, "strict": True},
        },
    ]
    base = {"messages": [{"role": "user", "content": "a"}], "tools": tools}
    body = tr.request_from_pivot(base, "m", False)
    assert body["tools"] == [
        {"name": "now", "input_schema": {"type": "object", "properties": {}}},
        {"name": "w", "input_schema": {"type": "object", "properties": {}}, "strict": True},
    ]
    assert "tool_choice" not in body

    def choice(**extra: Any) -> Any:
        return tr.request_from_pivot({**base, **extra}, "m", False).get("tool_choice")

    assert choice(tool_choice="auto") == {"type": "auto"}
    assert choice(tool_choice="required") == {"type": "any"}
    assert choice(tool_choice="none") == {"type": "none"}
    assert choice(tool_choice={"type": "function", "function": {"name": "w"}}) == {
        "type": "tool",
        "name": "w",
    }
    assert choice(parallel_tool_calls=False) == {"type": "auto", "disable_parallel_tool_use": True}
    assert choice(tool_choice="required", parallel_tool_calls=False) == {
        "type": "any",
        "disable_parallel_tool_use": True,
    }
    assert choice(tool_choice="none", parallel_tool_calls=False) == {"type": "none"}


def test_request_from_pivot_identity_and_cache_hints() -> None:
    base = {"messages": [{"role": "user", "content": "a"}]}
    body = tr.request_from_pivot(
        {**base, "safety_identifier": "hash-1", "prompt_cache_key": "k", "store": False}, "m", False
    )
    assert body == {
        "model": "m",
        "max_tokens": 4096,
        "messages": [{"role": "user", "content": "a"}],
        "metadata": {"user_id": "hash-1"},
    }
    body = tr.request_from_pivot({**base, "user": "u", "safety_identifier": "hash-1"}, "m", False)
    assert body["metadata"] == {"user_id": "u"}


def test_request_from_pivot_drops_empty_text_that_anthropic_refuses() -> None:
    pivot = {
        "messages": [
            {"role": "system", "content": ""},
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": "b"},
        ]
    }
    body = tr.request_from_pivot(pivot, "m", False)
    assert "system" not in body
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]


def _user(content: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}]}


@pytest.mark.parametrize(
    ("pivot", "field"),
    [
        ({**_user("a"), "n": 2}, "n"),
        ({**_user("a"), "seed": 7}, "seed"),
        ({**_user("a"), "presence_penalty": 0.5}, "presence_penalty"),
        ({**_user("a"), "frequency_penalty": 0.5}, "frequency_penalty"),
        ({**_user("a"), "logprobs": True}, "logprobs"),
        ({**_user("a"), "audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({**_user("a"), "response_format": {"type": "json_object"}}, "response_format"),
        (
            {
                **_user("a"),
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {}},
                },
            },
            "response_format",
        ),
        ({**_user("a"), "logit_bias": {"1": 2}}, "logit_bias"),
        (
            _user([{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]),
            "messages[0].content[0].type=input_audio",
        ),
        (_user([{"type": "file", "file": {"file_id": "f"}}]), "messages[0].content[0].type=file"),
        (
            _user([{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]),
            "messages[0].content[0].image_url.url",
        ),
        (
            _user(
                [{"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}}]
            ),
            "messages[0].content[0].image_url.detail",
        ),
        (
            _user(
                [
                    {"type": "text", "text": "a"},
                    {
                        "type": "image_url",
                        "image_url": {"url": "https://x/y.png", "detail": "high"},
                    },
                ]
            ),
            "messages[0].content[1].image_url.detail",
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c",
                                "type": "function",
                                "function": {"name": "f", "arguments": "{oops"},
                            }
                        ],
                    }
                ]
            },
            "messages[0].tool_calls[0].function.arguments",
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c",
                                "type": "function",
                                "function": {"name": "f", "arguments": "[1]"},
                            }
                        ],
                    }
                ]
            },
            "messages[0].tool_calls[0].function.arguments",
        ),
        ({"messages": [{"role": "user", "content": "a", "name": "bob"}]}, "messages[0].name"),
        (
            {"messages": [{"role": "function", "name": "f", "content": "x"}]},
            "messages[0].role=function",
        ),
        (
            {**_user("a"), "tools": [{"type": "custom", "custom": {"name": "x"}}]},
            "tools[0].type=custom",
        ),
        (
            {
                **_user("a"),
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "allowed_tools"},
            },
            "tool_choice.type=allowed_tools",
        ),
    ],
)
def test_request_from_pivot_refuses_and_names_the_field(pivot: dict[str, Any], field: str) -> None:
    with pytest.raises(Unsupported) as caught:
        tr.request_from_pivot(pivot, "claude-x", False)
    assert caught.value.field == field


# -- answers -------------------------------------------------------------------------------


def test_response_to_pivot_text_tool_call_and_usage() -> None:
    assert tr.response_to_pivot(ANTHROPIC_MESSAGE) == {
        "id": "msg_01XYZ",
        "object": "chat.completion",
        "created": 0,
        "model": "claude-haiku-4-5-20251001",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Let me check.",
                    "tool_calls": [
                        {
                            "id": "toolu_01A",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                        }
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {
            "prompt_tokens": 125,
            "completion_tokens": 30,
            "total_tokens": 155,
            "prompt_tokens_details": {"cached_tokens": 100},
        },
    }


def test_response_to_pivot_parses_as_an_openai_completion() -> None:
    completion = openai_sdk.types.chat.ChatCompletion.model_validate(
        tr.response_to_pivot(ANTHROPIC_MESSAGE)
    )
    call = completion.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert orjson.loads(call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("stop", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("pause_turn", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
    ],
)
def test_stop_reasons_to_pivot(stop: str, finish: str) -> None:
    body = {**ANTHROPIC_MESSAGE, "content": [], "stop_reason": stop}
    pivot = tr.response_to_pivot(body)
    assert pivot["choices"][0]["finish_reason"] == finish
    assert pivot["choices"][0]["message"]["content"] is None


@pytest.mark.parametrize(
    ("finish", "stop"),
    [
        ("stop", "end_turn"),
        ("length", "max_tokens"),
        ("tool_calls", "tool_use"),
        ("content_filter", "refusal"),
    ],
)
def test_finish_reasons_from_pivot(finish: str, stop: str) -> None:
    pivot = copy.deepcopy(PIVOT_COMPLETION)
    pivot["choices"][0]["finish_reason"] = finish
    assert tr.response_from_pivot(pivot, "claude-x")["stop_reason"] == stop


def test_response_from_pivot_text_tool_calls_and_usage() -> None:
    assert tr.response_from_pivot(copy.deepcopy(PIVOT_COMPLETION), "claude-haiku-4-5") == {
        "id": "chatcmpl-abc",
        "type": "message",
        "role": "assistant",
        "model": "claude-haiku-4-5",
        "content": [
            {"type": "text", "text": "Checking both."},
            {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"city": "Rome"}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 18,
            "output_tokens": 12,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 32,
        },
    }


def test_response_from_pivot_parses_as_an_anthropic_message() -> None:
    message = anthropic_sdk.types.Message.model_validate(
        tr.response_from_pivot(PIVOT_COMPLETION, "claude-x")
    )
    assert [block.type for block in message.content] == ["text", "tool_use", "tool_use"]
    assert message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0) == 50


def test_response_from_pivot_invents_stable_ids_when_there_are_none() -> None:
    pivot = copy.deepcopy(PIVOT_COMPLETION)
    del pivot["id"]
    del pivot["choices"][0]["message"]["tool_calls"][0]["id"]
    first = tr.response_from_pivot(copy.deepcopy(pivot), "claude-x")
    again = tr.response_from_pivot(copy.deepcopy(pivot), "claude-x")
    assert first["id"].startswith("msg_")
    assert first["content"][1]["id"].startswith("toolu_")
    assert first == again


@pytest.mark.parametrize("finish", ["tool_calls", "stop"])
def test_response_from_pivot_malformed_arguments_names_them(finish: str) -> None:
    pivot = copy.deepcopy(PIVOT_COMPLETION)
    pivot["choices"][0]["message"]["tool_calls"][1]["function"]["arguments"] = '{"city": '
    pivot["choices"][0]["finish_reason"] = finish
    with pytest.raises(Unsupported) as caught:
        tr.response_from_pivot(pivot, "claude-x")
    assert caught.value.field == "choices[0].message.tool_calls[1].function.arguments"


@pytest.mark.parametrize("cut", ['{"city": ', '{"city": "Ro', "", "[1", "7"])
def test_response_from_pivot_tool_call_cut_by_max_tokens_has_empty_input(cut: str) -> None:
    pivot = copy.deepcopy(PIVOT_COMPLETION)
    pivot["choices"][0]["message"]["tool_calls"][1]["function"]["arguments"] = cut
    pivot["choices"][0]["finish_reason"] = "length"
    answer = tr.response_from_pivot(pivot, "claude-x")
    assert answer["stop_reason"] == "max_tokens"
    assert answer["content"][1:] == [
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {}},
    ]
    message = anthropic_sdk.types.Message.model_validate(answer)
    assert message.stop_reason == "max_tokens"


def test_response_from_pivot_cut_by_max_tokens_still_refuses_a_non_string() -> None:
    pivot = copy.deepcopy(PIVOT_COMPLETION)
    pivot["choices"][0]["message"]["tool_calls"][1]["function"]["arguments"] = {"city": "Rome"}
    pivot["choices"][0]["finish_reason"] = "length"
    with pytest.raises(Unsupported) as caught:
        tr.response_from_pivot(pivot, "claude-x")
    assert caught.value.field == "choices[0].message.tool_calls[1].function.arguments"


def test_response_round_trip_keeps_ids_and_input() -> None:
    back = tr.response_from_pivot(
        tr.response_to_pivot(ANTHROPIC_MESSAGE), "claude-haiku-4-5-20251001"
    )
    assert back["id"] == ANTHROPIC_MESSAGE["id"]
    assert back["content"] == ANTHROPIC_MESSAGE["content"]
    assert back["stop_reason"] == "tool_use"
    usage = back["usage"]
    assert usage["input_tokens"] + usage["cache_read_input_tokens"] == 125


# -- errors --------------------------------------------------------------------------------


def test_error_to_pivot_reads_anthropic_errors() -> None:
    body = orjson.dumps(
        {
            "type": "error",
            "error": {"type": "overloaded_error", "message": "Overloaded"},
            "request_id": "req_1",
        }
    )
    assert tr.error_to_pivot(529, body) == {
        "error": {"message": "Overloaded", "type": "overloaded_error", "code": None},
        "status": 529,
    }


@pytest.mark.parametrize(
    ("status", "body", "kind", "message"),
    [
        (
            502,
            b"<html><body>Bad   gateway</body></html>",
            "api_error",
            "<html><body>Bad gateway</body></html>",
        ),
        (429, b"", "rate_limit_error", "upstream answered HTTP 429"),
        (413, b"[1, 2]", "request_too_large", "upstream answered HTTP 413"),
        (404, b'{"error": "no such model"}', "not_found_error", "no such model"),
        (401, b'{"error": {"message": "bad key"}}', "authentication_error", "bad key"),
        (418, b"{}", "invalid_request_error", "upstream answered HTTP 418"),
    ],
)
def test_error_to_pivot_any_body(status: int, body: bytes, kind: str, message: str) -> None:
    pivot = tr.error_to_pivot(status, body)
    assert pivot["status"] == status
    assert pivot["error"]["type"] == kind
    assert pivot["error"]["message"] == message


@pytest.mark.parametrize(
    ("status", "given", "kind"),
    [
        (400, "invalid_request_error", "invalid_request_error"),
        (429, "insufficient_quota", "rate_limit_error"),
        (401, None, "authentication_error"),
        (403, None, "permission_error"),
        (404, None, "not_found_error"),
        (413, None, "request_too_large"),
        (529, None, "overloaded_error"),
        (503, "server_error", "api_error"),
        (402, None, "billing_error"),
        (422, None, "invalid_request_error"),
    ],
)
def test_error_from_pivot_shapes_anthropic_errors(
    status: int, given: str | None, kind: str
) -> None:
    pivot = {"error": {"message": "boom", "type": given, "code": None}, "status": status}
    assert tr.error_from_pivot(pivot) == {
        "type": "error",
        "error": {"type": kind, "message": "boom"},
    }


def test_error_from_pivot_with_a_bare_message() -> None:
    assert tr.error_from_pivot({"error": "gone", "status": 404}) == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "gone"},
    }
    assert tr.error_from_pivot({"error": {}})["error"] == {
        "type": "api_error",
        "message": "upstream answered HTTP 500",
    }


def test_error_from_pivot_raises_the_sdk_exception_for_the_status() -> None:
    body = orjson.dumps(
        tr.error_from_pivot({"error": {"message": "slow down", "type": "x"}, "status": 429})
    )

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(429, headers={"content-type": "application/json"}, content=body)

    with httpx2.Client(transport=httpx2.MockTransport(handler)) as http:
        client = anthropic_sdk.Anthropic(
            api_key="test", base_url="http://upstream.test", http_client=http, max_retries=0
        )
        with pytest.raises(anthropic_sdk.RateLimitError) as caught:
            client.messages.create(
                model="m", max_tokens=1, messages=[{"role": "user", "content": "a"}]
            )
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "slow down"},
    }


# -- streams: Anthropic -> pivot -----------------------------------------------------------


def test_to_pivot_stream_chunks() -> None:
    chunks = run_to_pivot(anthropic_stream())
    assert chunks[-1] is None
    deltas = [c["choices"][0]["delta"] for c in chunks[:-2] if c is not None]
    assert deltas == [
        {"role": "assistant", "content": ""},
        {"content": "Let me"},
        {"content": " check."},
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "toolu_01A",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ]
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Pa'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": 'ris"}'}}]},
        {},
    ]
    finish = chunks[-3]
    assert finish is not None
    assert finish["choices"][0]["finish_reason"] == "tool_calls"
    usage = chunks[-2]
    assert usage is not None
    assert usage["choices"] == []
    assert usage["usage"] == {
        "prompt_tokens": 125,
        "completion_tokens": 30,
        "total_tokens": 155,
        "prompt_tokens_details": {"cached_tokens": 100},
    }
    assert {c["id"] for c in chunks if c is not None} == {"msg_01XYZ"}


def test_to_pivot_stream_accumulates_in_openai_sdk_like_the_answer() -> None:
    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState()
    for chunk in run_to_pivot(anthropic_stream()):
        if chunk is not None:
            state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    final = state.get_final_completion()
    expected = tr.response_to_pivot(ANTHROPIC_MESSAGE)
    message = final.choices[0].message
    assert message.content == expected["choices"][0]["message"]["content"]
    calls = message.tool_calls or []
    assert [(c.id, c.function.name, orjson.loads(c.function.arguments)) for c in calls] == [  # type: ignore[union-attr]
        ("toolu_01A", "get_weather", {"city": "Paris"})
    ]
    assert final.choices[0].finish_reason == "tool_calls"
    assert final.usage is not None
    assert final.usage.model_dump(
        exclude_none=True, include={"prompt_tokens", "completion_tokens", "total_tokens"}
    ) == {
        "prompt_tokens": 125,
        "completion_tokens": 30,
        "total_tokens": 155,
    }


def test_to_pivot_stream_through_the_openai_client() -> None:
    body = openai_sse(run_to_pivot(anthropic_stream()))
    with httpx2.Client(transport=sse_transport(body)) as http:
        client = openai_sdk.OpenAI(
            api_key="test", base_url="http://upstream.test/v1", http_client=http
        )
        with client.chat.completions.stream(
            model="m", messages=[{"role": "user", "content": "a"}]
        ) as stream:
            final = stream.get_final_completion()
    assert final.id == "msg_01XYZ"
    assert final.choices[0].message.content == "Let me check."
    assert final.choices[0].message.tool_calls[0].function.arguments == '{"city": "Paris"}'  # type: ignore[index,union-attr]


def test_to_pivot_stream_text_only_and_stop_without_delta() -> None:
    events = [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_2",
                    "model": "claude-x",
                    "usage": {"input_tokens": 3, "output_tokens": 0},
                },
            },
        ),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "thinking", "thinking": ""},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "thinking_delta", "thinking": "hm"},
            },
        ),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 1,
                "content_block": {"type": "text", "text": "Hi"},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    first, finish, usage, end = run_to_pivot(events)
    assert first is not None
    assert first["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": "Hi"}, "finish_reason": None}
    ]
    assert finish is not None
    assert finish["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert usage is not None
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3}
    assert end is None


def test_to_pivot_stream_error_event_is_a_pivot_error() -> None:
    to_pivot = tr.ToPivot("claude-x")
    assert to_pivot.event("ping", {"type": "ping"}) == []
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    assert to_pivot.event("error", error) == [
        {
            "error": {"message": "Overloaded", "type": "overloaded_error", "code": None},
            "status": 529,
        }
    ]


# -- streams: pivot -> Anthropic -----------------------------------------------------------


def test_from_pivot_stream_events() -> None:
    events = run_from_pivot(pivot_stream())
    names = [name for name, _ in events]
    assert names == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(name == data["type"] for name, data in events)
    assert events[0][1]["message"]["id"] == "chatcmpl-abc"
    assert events[0][1]["message"]["usage"] == {"input_tokens": 0, "output_tokens": 0}
    assert events[5][1]["content_block"] == {
        "type": "tool_use",
        "id": "call_1",
        "name": "get_weather",
        "input": {},
    }
    assert events[-2][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {
            "input_tokens": 18,
            "output_tokens": 12,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 32,
        },
    }


def test_from_pivot_stream_accumulates_in_anthropic_sdk_like_the_answer() -> None:
    expected = anthropic_sdk.types.Message.model_validate(
        tr.response_from_pivot(PIVOT_COMPLETION, "claude-haiku-4-5")
    )
    body = anthropic_sse(run_from_pivot(pivot_stream()))
    with httpx2.Client(transport=sse_transport(body)) as http:
        client = anthropic_sdk.Anthropic(
            api_key="test", base_url="http://upstream.test", http_client=http
        )
        with client.messages.stream(
            model="claude-haiku-4-5", max_tokens=10, messages=[{"role": "user", "content": "a"}]
        ) as stream:
            final = stream.get_final_message()
    assert final.model_dump(exclude_none=True) == expected.model_dump(exclude_none=True)


def test_from_pivot_stream_plain_iterator_of_the_anthropic_sdk() -> None:
    """`stream=True` hands out the raw events; the SDK's own accumulator makes the Message."""
    expected = anthropic_sdk.types.Message.model_validate(
        tr.response_from_pivot(PIVOT_COMPLETION, "claude-haiku-4-5")
    )
    body = anthropic_sse(run_from_pivot(pivot_stream()))
    with httpx2.Client(transport=sse_transport(body)) as http:
        client = anthropic_sdk.Anthropic(
            api_key="test", base_url="http://upstream.test", http_client=http
        )
        stream = client.messages.create(
            model="claude-haiku-4-5",
            max_tokens=10,
            messages=[{"role": "user", "content": "a"}],
            stream=True,
        )
        snapshot = None
        json_bufs: dict[int, bytes] = {}
        texts: list[str] = []
        for event in stream:
            snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=json_bufs)
            if event.type == "content_block_delta" and event.delta.type == "text_delta":
                texts.append(event.delta.text)
    assert "".join(texts) == "Checking both."
    assert snapshot is not None
    assert snapshot.model_dump(exclude_none=True) == expected.model_dump(exclude_none=True)


def test_from_pivot_text_only_stream_without_usage() -> None:
    chunks: list[dict[str, Any] | None] = [
        {
            "id": "x1",
            "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            ],
        },
        {
            "id": "x1",
            "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": "length"}],
        },
        None,
    ]
    events = run_from_pivot(chunks)
    assert [data for _, data in events][1:] == [
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
            "usage": {
                "input_tokens": 0,
                "output_tokens": 0,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
        },
        {"type": "message_stop"},
    ]


def test_from_pivot_empty_stream_still_is_a_message() -> None:
    events = run_from_pivot([None])
    assert [name for name, _ in events] == ["message_start", "message_delta", "message_stop"]
    assert events[0][1]["message"]["id"] == run_from_pivot([None])[0][1]["message"]["id"]


def test_from_pivot_error_chunk_is_the_anthropic_error_event() -> None:
    from_pivot = tr.FromPivot("claude-x")
    first = from_pivot.chunk(pivot_stream()[1])
    error = {
        "error": {"message": "upstream failed", "type": "server_error", "code": None},
        "status": 500,
    }
    assert from_pivot.chunk(error) == [
        ("error", {"type": "error", "error": {"type": "api_error", "message": "upstream failed"}})
    ]
    assert from_pivot.chunk(None) == []
    assert first[0][0] == "message_start"


def test_from_pivot_error_event_raises_in_the_anthropic_sdk() -> None:
    chunks: list[dict[str, Any] | None] = [
        pivot_stream()[1],
        {
            "error": {"message": "overloaded", "type": "overloaded_error", "code": None},
            "status": 529,
        },
    ]
    body = anthropic_sse(run_from_pivot(chunks))
    with httpx2.Client(transport=sse_transport(body)) as http:
        client = anthropic_sdk.Anthropic(
            api_key="test", base_url="http://upstream.test", http_client=http
        )
        stream = client.messages.stream(
            model="m", max_tokens=10, messages=[{"role": "user", "content": "a"}]
        )
        with pytest.raises(anthropic_sdk.APIStatusError, match="overloaded") as caught, stream as s:
            s.get_final_message()
    assert caught.value.status_code == 200  # the stream had started; the error is in-band


def test_streams_compose_both_ways() -> None:
    """Anthropic upstream -> pivot -> Anthropic caller: the SDK sees the upstream's answer."""
    chunks = run_to_pivot(anthropic_stream())
    body = anthropic_sse(run_from_pivot(chunks))
    with httpx2.Client(transport=sse_transport(body)) as http:
        client = anthropic_sdk.Anthropic(
            api_key="test", base_url="http://upstream.test", http_client=http
        )
        with client.messages.stream(
            model="m", max_tokens=10, messages=[{"role": "user", "content": "a"}]
        ) as s:
            final = s.get_final_message()
    assert final.id == "msg_01XYZ"
    assert [b.model_dump(exclude_none=True) for b in final.content] == ANTHROPIC_MESSAGE["content"]
    assert final.stop_reason == "tool_use"
    assert final.usage.input_tokens + (final.usage.cache_read_input_tokens or 0) == 125
    assert final.usage.output_tokens == 30


def _final_message(events: list[tuple[str | None, dict[str, Any]]]) -> Any:
    """What the Anthropic SDK's stream helper assembles from `events`."""
    with httpx2.Client(transport=sse_transport(anthropic_sse(events))) as http:
        client = anthropic_sdk.Anthropic(
            api_key="test", base_url="http://upstream.test", http_client=http
        )
        with client.messages.stream(
            model="claude-haiku-4-5", max_tokens=10, messages=[{"role": "user", "content": "a"}]
        ) as stream:
            return stream.get_final_message()


def _calls_chunk(calls: list[dict[str, Any]], finish: str | None = None) -> dict[str, Any]:
    choice = {"index": 0, "delta": {"tool_calls": calls}, "finish_reason": finish}
    return {"id": "c", "object": "chat.completion.chunk", "model": "m", "choices": [choice]}


def _tool_inputs(chunks: list[dict[str, Any] | None]) -> list[tuple[str, str, Any]]:
    final = _final_message(run_from_pivot(chunks))
    return [(block.id, block.name, block.input) for block in final.content]


def test_from_pivot_whole_tool_calls_without_index_stay_apart() -> None:
    """Some OpenAI-compatible upstreams omit `index`: a new id starts a new call."""
    paris = {"id": "call_a", "type": "function"}
    paris["function"] = {"name": "get_weather", "arguments": '{"city":"Paris"}'}
    cet = {"id": "call_b", "type": "function"}
    cet["function"] = {"name": "get_time", "arguments": '{"tz":"CET"}'}
    chunks = [_calls_chunk([paris]), _calls_chunk([cet], "tool_calls"), None]
    assert _tool_inputs(chunks) == [
        ("call_a", "get_weather", {"city": "Paris"}),
        ("call_b", "get_time", {"tz": "CET"}),
    ]
    both = [_calls_chunk([paris, cet], "tool_calls"), None]
    assert _tool_inputs(both) == _tool_inputs(chunks)


def test_from_pivot_pieces_without_index_continue_the_latest_call() -> None:
    chunks: list[dict[str, Any] | None] = [
        _calls_chunk([{"id": "call_a", "function": {"name": "get_weather", "arguments": ""}}]),
        _calls_chunk([{"function": {"arguments": '{"city":'}}]),
        _calls_chunk([{"id": "call_a", "function": {"arguments": '"Paris"}'}}]),  # id repeated
        _calls_chunk([{"function": {"name": "get_time", "arguments": '{"tz":'}}]),  # new name
        _calls_chunk([{"function": {"arguments": '"CET"}'}}], "tool_calls"),
        None,
    ]
    inputs = _tool_inputs(chunks)
    assert [(name, given) for _, name, given in inputs] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"tz": "CET"}),
    ]
    assert inputs[0][0] == "call_a"
    assert inputs[1][0].startswith("toolu_")


def test_from_pivot_indexed_calls_are_unchanged_by_the_index_less_rule() -> None:
    """With `index`, a repeated name or a later id does not split a call."""
    chunks: list[dict[str, Any] | None] = [
        _calls_chunk([{"index": 0, "id": "call_a", "function": {"name": "f", "arguments": "{"}}]),
        _calls_chunk(
            [{"index": 0, "id": "call_a", "function": {"name": "f", "arguments": '"a":'}}]
        ),
        _calls_chunk([{"index": 0, "function": {"name": "f", "arguments": "1}"}}]),
        _calls_chunk([{"index": 1, "id": "call_b", "function": {"name": "f", "arguments": "{}"}}]),
        _calls_chunk([], "tool_calls"),
        None,
    ]
    assert _tool_inputs(chunks) == [("call_a", "f", {"a": 1}), ("call_b", "f", {})]


# -- robustness: a request raises Unsupported or nothing -----------------------------------


def _nested(depth: int) -> dict[str, Any]:
    """A JSON-schema-like object nested `depth` levels (built without recursion)."""
    value: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        value = {"type": "object", "properties": {"a": value}}
    return value


@pytest.mark.parametrize("depth", [300, 1000, 5000])
def test_request_deeply_nested_schemas_pass_through_without_recursion(depth: int) -> None:
    schema = _nested(depth)
    body = {
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "a"}],
        "tools": [{"name": "f", "input_schema": schema}],
    }
    pivot = tr.request_to_pivot(body)
    assert pivot["tools"][0]["function"]["parameters"] is schema
    assert tr.request_from_pivot(pivot, "m", False)["tools"][0]["input_schema"] is schema


def test_request_deeply_nested_tool_result_content_is_refused_by_name() -> None:
    content = [{"type": "text", "text": "x", "extra": _nested(5000)}]
    result = {"type": "tool_result", "tool_use_id": "t", "content": content}
    with pytest.raises(Unsupported) as caught:
        tr.request_to_pivot({"max_tokens": 1, "messages": [{"role": "user", "content": [result]}]})
    assert caught.value.field == "messages[0].content[0].content[0].extra"


@pytest.mark.parametrize("given", [_nested(300), {"big": 2**70}, {"s": "\ud800"}])
def test_request_to_pivot_tool_use_input_orjson_cannot_write_is_still_carried(
    given: dict[str, Any],
) -> None:
    body = _with_message([{"type": "tool_use", "id": "t", "name": "f", "input": given}])
    arguments = tr.request_to_pivot(body)["messages"][1]["tool_calls"][0]["function"]["arguments"]
    assert json.loads(arguments) == given


def test_request_to_pivot_tool_use_input_too_deep_to_write_is_unsupported() -> None:
    body = _with_message([{"type": "tool_use", "id": "t", "name": "f", "input": _nested(5000)}])
    with pytest.raises(Unsupported) as caught:
        tr.request_to_pivot(body)
    assert caught.value.field == "messages[1].content[0].input"
    assert caught.value.why == "nested too deeply"


def test_request_from_pivot_deep_arguments_are_unsupported_by_name() -> None:
    arguments = '{"a":' * 2000 + "1" + "}" * 2000
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}
    pivot = {"messages": [{"role": "assistant", "content": None, "tool_calls": [call]}]}
    with pytest.raises(Unsupported) as caught:
        tr.request_from_pivot(pivot, "m", False)
    assert caught.value.field == "messages[0].tool_calls[0].function.arguments"


_HOSTILE: list[Any] = [None, 0, 7, -1, 1.5, True, "", "x", [], [None], [7], ["x"], {}, {"a": 1}]
_HOSTILE.append(_nested(2000))


def _paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON value (the root excluded)."""
    out: list[tuple[Any, ...]] = [path] if path else []
    if isinstance(value, (dict, list)):
        for key, inner in value.items() if isinstance(value, dict) else enumerate(value):
            out += _paths(inner, (*path, key))
    return out


def _replaced(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    doc = copy.deepcopy(doc)
    inner = doc
    for key in path[:-1]:
        inner = inner[key]
    inner[path[-1]] = value
    return doc


def _only_unsupported(function: Any, doc: Any) -> None:
    escaped = []
    for path in _paths(doc):
        for value in _HOSTILE:
            try:
                function(_replaced(doc, path, value))
            except Unsupported:
                pass
            except Exception as exc:  # the test's point: name the inputs that escaped
                shown = value if isinstance(value, (str, int, float)) else type(value).__name__
                escaped.append(f"{path} = {shown}: {type(exc).__name__}: {str(exc)[:80]}")
    assert escaped == []


def test_request_to_pivot_raises_only_unsupported_whatever_the_values() -> None:
    full = copy.deepcopy(ANTHROPIC_TOOL_REQUEST)
    full["metadata"] = {"user_id": "u"}
    full["stop_sequences"] = ["x"]
    full["tool_choice"] = {"type": "tool", "name": "get_weather"}
    full["messages"][0]["content"] = [
        {"type": "text", "text": "a"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA"}},
        {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}},
    ]
    _only_unsupported(tr.request_to_pivot, full)


def test_request_from_pivot_raises_only_unsupported_whatever_the_values() -> None:
    full = tr.request_to_pivot(copy.deepcopy(ANTHROPIC_TOOL_REQUEST))
    full["messages"].append(
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "a"},
                {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "auto"}},
            ],
        }
    )
    full.update(stop=["x"], user="u", response_format={"type": "text"}, n=1, seed=None)
    full["tool_choice"] = {"type": "function", "function": {"name": "get_weather"}}
    full["parallel_tool_calls"] = False
    _only_unsupported(lambda pivot: tr.request_from_pivot(pivot, "m", True), full)


def test_invented_ids_survive_what_orjson_cannot_write() -> None:
    pivot = copy.deepcopy(PIVOT_COMPLETION)
    del pivot["id"]
    for extra in (_nested(2000), 2**70, "\ud800"):
        first = tr.response_from_pivot({**pivot, "system_fingerprint": extra}, "claude-x")["id"]
        assert first == tr.response_from_pivot({**pivot, "system_fingerprint": extra}, "m")["id"]
        assert first.startswith("msg_")
        chunk = {"choices": [{"index": 0, "delta": {"content": "a"}}], "x": extra}
        assert tr.FromPivot("m").chunk(chunk)[0][1]["message"]["id"].startswith("msg_")
