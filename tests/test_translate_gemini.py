"""The Gemini generateContent <-> pivot translator, on fixtures written here.

The SDK tests push what we emit through the parsers the official SDKs really
use (google-genai's client over an in-memory transport, openai's
`ChatCompletionStreamState`) and check they assemble the same answer.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import httpx2
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from sidecar.translate.base import Unsupported
from sidecar.translate.gemini import (
    FromPivot,
    ToPivot,
    error_from_pivot,
    error_to_pivot,
    request_from_pivot,
    request_to_pivot,
    response_from_pivot,
    response_to_pivot,
)

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}

# --- helpers ----------------------------------------------------------------------


def sdk_client(handler: Callable[[httpx2.Request], httpx2.Response]) -> genai.Client:
    """The real google-genai client, answered in memory by `handler` (no network)."""
    transport = httpx2.MockTransport(handler)
    options = types.HttpOptions(
        base_url="http://gemini.invalid",
        httpx_client=httpx2.Client(transport=transport),
        retry_options=types.HttpRetryOptions(attempts=1),
    )
    return genai.Client(api_key="test-key", http_options=options)


def sse(events: Iterable[tuple[str | None, dict[str, Any]]]) -> bytes:
    return b"".join(b"data: " + json.dumps(data).encode() + b"\n\n" for _, data in events)


def pivot_chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def usage_chunk(prompt: int, completion: int) -> dict[str, Any]:
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": [],
        "usage": usage,
    }


def refused(fn: Callable[[], object]) -> str:
    with pytest.raises(Unsupported) as caught:
        fn()
    return caught.value.field


def openai_final(chunks: list[Any]) -> Any:
    """What the openai SDK's stream accumulator makes of pivot chunks."""
    assert chunks[-1] is None
    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState()
    for chunk in chunks[:-1]:
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    return state.get_final_completion()


def gemini_stream(text_chunks: list[str], final: dict[str, Any]) -> list[dict[str, Any]]:
    """A Gemini SSE stream as the API sends it: usage on every chunk, the last one final."""
    out: list[dict[str, Any]] = [
        {
            "candidates": [{"content": {"role": "model", "parts": [{"text": t}]}, "index": 0}],
            "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9},
            "modelVersion": "gemini-2.5-flash",
            "responseId": "resp-1",
        }
        for t in text_chunks
    ]
    out.append({"modelVersion": "gemini-2.5-flash", "responseId": "resp-1", **final})
    return out


# --- requests: Gemini -> pivot ----------------------------------------------------


def test_request_to_pivot_text_system_and_settings() -> None:
    pivot = request_to_pivot(
        {
            "systemInstruction": {"role": "user", "parts": [{"text": "Be terse."}]},
            "contents": [
                {"role": "user", "parts": [{"text": "Hi"}]},
                {"role": "model", "parts": [{"text": "Hello"}, {"text": "!"}]},
                {"parts": [{"text": "Tell me a joke"}]},
            ],
            "generationConfig": {
                "temperature": 0.5,
                "topP": 0.9,
                "topK": 40.0,
                "maxOutputTokens": 100,
                "stopSequences": ["END"],
                "seed": 7,
                "presencePenalty": 0.1,
                "frequencyPenalty": 0.2,
                "candidateCount": 1,
            },
        }
    )
    assert pivot == {
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Tell me a joke"},
        ],
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 40,
        "max_tokens": 100,
        "stop": ["END"],
        "seed": 7,
        "presence_penalty": 0.1,
        "frequency_penalty": 0.2,
    }
    assert isinstance(pivot["top_k"], int)


def test_request_to_pivot_reads_snake_case_and_strips_the_model_prefix() -> None:
    pivot = request_to_pivot(
        {
            "model": "models/gemini-2.5-flash",
            "system_instruction": {"parts": [{"text": "sys"}]},
            "contents": [
                {
                    "role": "user",
                    "parts": [
                        {"text": "look"},
                        {"inline_data": {"mime_type": "image/png", "data": "iVBO"}},
                    ],
                }
            ],
            "generation_config": {"max_output_tokens": 5, "stop_sequences": ["x"]},
            "tool_config": {"function_calling_config": {"mode": "NONE"}},
        }
    )
    assert pivot["model"] == "gemini-2.5-flash"
    assert pivot["messages"] == [
        {"role": "system", "content": "sys"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}},
            ],
        },
    ]
    assert pivot["max_tokens"] == 5
    assert pivot["stop"] == ["x"]
    assert pivot["tool_choice"] == "none"


def test_request_to_pivot_tool_round_trip_invents_ids_and_matches_by_name() -> None:
    pivot = request_to_pivot(
        {
            "contents": [
                {"role": "user", "parts": [{"text": "Weather in Paris and Rome?"}]},
                {
                    "role": "model",
                    "parts": [
                        {"text": "Checking."},
                        {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
                        {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}},
                        {"functionCall": {"name": "get_time", "args": {}}},
                    ],
                },
                {
                    "role": "user",
                    "parts": [
                        {"functionResponse": {"name": "get_time", "response": {"hour": 9}}},
                        {
                            "functionResponse": {
                                "name": "get_weather",
                                "response": {"result": "sun"},
                            }
                        },
                        {
                            "functionResponse": {
                                "name": "get_weather",
                                "response": {"result": "rain"},
                            }
                        },
                    ],
                },
                {"role": "model", "parts": [{"functionCall": {"name": "get_time", "args": {}}}]},
                {
                    "role": "user",
                    "parts": [{"functionResponse": {"name": "get_time", "response": {}}}],
                },
            ],
            "tools": [
                {
                    "functionDeclarations": [
                        {
                            "name": "get_weather",
                            "description": "Weather now",
                            "parametersJsonSchema": WEATHER_SCHEMA,
                        },
                        {"name": "get_time"},
                    ]
                }
            ],
        }
    )
    call = pivot["messages"][1]
    assert call["content"] == "Checking."
    assert [(c["id"], c["function"]["name"]) for c in call["tool_calls"]] == [
        ("call_0", "get_weather"),
        ("call_1", "get_weather"),
        ("call_2", "get_time"),
    ]
    assert json.loads(call["tool_calls"][1]["function"]["arguments"]) == {"city": "Rome"}
    assert call["tool_calls"][0]["type"] == "function"
    assert pivot["messages"][2:5] == [
        {"role": "tool", "tool_call_id": "call_2", "content": '{"hour": 9}'},
        {"role": "tool", "tool_call_id": "call_0", "content": "sun"},
        {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
    ]
    assert pivot["messages"][5]["tool_calls"][0]["id"] == "call_3"
    assert pivot["messages"][6] == {"role": "tool", "tool_call_id": "call_3", "content": "{}"}
    assert pivot["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather now",
                "parameters": WEATHER_SCHEMA,
            },
        },
        {"type": "function", "function": {"name": "get_time"}},
    ]


def test_request_to_pivot_keeps_gemini_call_ids() -> None:
    pivot = request_to_pivot(
        {
            "contents": [
                {
                    "role": "model",
                    "parts": [
                        {"functionCall": {"id": "a", "name": "f", "args": {}}},
                        {"functionCall": {"id": "b", "name": "f", "args": {}}},
                    ],
                },
                {
                    "role": "user",
                    "parts": [
                        {"functionResponse": {"id": "b", "name": "f", "response": {"result": "B"}}},
                        {"functionResponse": {"name": "f", "response": {"result": "A"}}},
                    ],
                },
            ]
        }
    )
    assert [c["id"] for c in pivot["messages"][0]["tool_calls"]] == ["a", "b"]
    assert pivot["messages"][1:] == [
        {"role": "tool", "tool_call_id": "b", "content": "B"},
        {"role": "tool", "tool_call_id": "a", "content": "A"},
    ]


def test_request_to_pivot_images_base64_and_url() -> None:
    pivot = request_to_pivot(
        {
            "contents": [
                {
                    "role": "user",
                    "parts": [
                        {"inlineData": {"mimeType": "image/jpeg", "data": "ab-_cd=="}},
                        {"fileData": {"mimeType": "image/png", "fileUri": "https://x.test/a.png"}},
                        {"fileData": {"fileUri": "https://x.test/b.webp"}},
                        {"text": "what is this?"},
                    ],
                }
            ]
        }
    )
    assert pivot["messages"][0]["content"] == [
        # the SDK sends URL-safe base64; a data: URL carries the standard alphabet
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,ab+/cd=="}},
        {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}},
        {"type": "image_url", "image_url": {"url": "https://x.test/b.webp"}},
        {"type": "text", "text": "what is this?"},
    ]


def test_request_to_pivot_json_mode_and_schemas() -> None:
    def fmt(config: dict[str, Any]) -> Any:
        body = {"contents": [{"parts": [{"text": "x"}]}], "generationConfig": config}
        return request_to_pivot(body).get("response_format")

    assert fmt({"responseMimeType": "application/json"}) == {"type": "json_object"}
    assert fmt({"responseMimeType": "text/plain"}) is None
    assert fmt({"responseMimeType": "application/json", "responseJsonSchema": WEATHER_SCHEMA}) == {
        "type": "json_schema",
        "json_schema": {"name": "response", "schema": WEATHER_SCHEMA},
    }
    openapi = {
        "type": "OBJECT",
        "properties": {
            "b": {"type": "INTEGER", "nullable": True},
            "a": {"type": "ARRAY", "items": {"type": "STRING"}, "maxItems": "3"},
        },
        "propertyOrdering": ["a", "b"],
        "required": ["a"],
    }
    converted = fmt({"response_mime_type": "application/json", "response_schema": openapi})
    schema = converted["json_schema"]["schema"]
    assert schema == {
        "type": "object",
        "properties": {
            "a": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
            "b": {"type": ["integer", "null"]},
        },
        "required": ["a"],
    }
    assert list(schema["properties"]) == ["a", "b"]


def test_request_to_pivot_converts_openapi_parameters() -> None:
    pivot = request_to_pivot(
        {
            "contents": [{"parts": [{"text": "x"}]}],
            "tools": [
                {
                    "functionDeclarations": [
                        {
                            "name": "f",
                            "parameters": {
                                "type": "OBJECT",
                                "properties": {"unit": {"type": "STRING", "enum": ["c", "f"]}},
                            },
                        }
                    ]
                }
            ],
        }
    )
    assert pivot["tools"][0]["function"]["parameters"] == {
        "type": "object",
        "properties": {"unit": {"type": "string", "enum": ["c", "f"]}},
    }


@pytest.mark.parametrize(
    ("config", "choice"),
    [
        ({"mode": "AUTO"}, "auto"),
        ({"mode": "NONE"}, "none"),
        ({"mode": "ANY"}, "required"),
        ({"mode": "ANY", "allowedFunctionNames": ["f", "g"]}, "required"),
        (
            {"mode": "ANY", "allowedFunctionNames": ["g"]},
            {"type": "function", "function": {"name": "g"}},
        ),
    ],
)
def test_request_to_pivot_tool_config(config: dict[str, Any], choice: Any) -> None:
    pivot = request_to_pivot(
        {
            "contents": [{"parts": [{"text": "x"}]}],
            "tools": [{"functionDeclarations": [{"name": "f"}, {"name": "g"}]}],
            "toolConfig": {"functionCallingConfig": config},
        }
    )
    assert pivot["tool_choice"] == choice


def _with(**fields: Any) -> dict[str, Any]:
    return {"contents": [{"role": "user", "parts": [{"text": "hi"}]}], **fields}


def _part(part: dict[str, Any], role: str = "user") -> dict[str, Any]:
    return {"contents": [{"role": role, "parts": [part]}]}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (_with(safetySettings=[{"category": "HARM_CATEGORY_HATE_SPEECH"}]), "safetySettings"),
        (_with(safety_settings=[]), "safetySettings"),
        (_with(cachedContent="cachedContents/1"), "cachedContent"),
        (_with(labels={"a": "b"}), "labels"),
        (_with(frobnicate=1), "frobnicate"),
        (_with(generationConfig={"thinkingConfig": {"thinkingBudget": 0}}), "generationConfig.thinkingConfig"),
        (_with(generationConfig={"responseModalities": ["IMAGE"]}), "generationConfig.responseModalities"),
        (_with(generationConfig={"speechConfig": {}}), "generationConfig.speechConfig"),
        (_with(generationConfig={"candidateCount": 2}), "generationConfig.candidateCount"),
        (_with(generationConfig={"responseLogprobs": True}), "generationConfig.responseLogprobs"),
        (_with(generationConfig={"logprobs": 3}), "generationConfig.logprobs"),
        (_with(generationConfig={"wat": 1}), "generationConfig.wat"),
        (_with(generationConfig={"responseMimeType": "text/x.enum"}), "generationConfig.responseMimeType"),
        (_with(generationConfig={"responseMimeType": "application/json",
                                 "responseSchema": {"type": "ARRAY", "maxItems": "many"}}),
         "generationConfig.responseSchema.maxItems"),
        (_with(generationConfig={"responseSchema": {"type": "OBJECT"}}), "generationConfig.responseMimeType"),
        (_with(tools=[{"googleSearch": {}}]), "tools[0].googleSearch"),
        (_with(tools=[{"codeExecution": {}}]), "tools[0].codeExecution"),
        (_with(tools=[{"urlContext": {}}]), "tools[0].urlContext"),
        (_with(tools=[{"functionDeclarations": [{"name": "f", "behavior": "NON_BLOCKING"}]}]),
         "tools[0].functionDeclarations[0].behavior"),
        (_with(toolConfig={"functionCallingConfig": {"mode": "VALIDATED"}}),
         "toolConfig.functionCallingConfig.mode"),
        (_with(toolConfig={"retrievalConfig": {}}), "toolConfig.retrievalConfig"),
        (_with(tools=[{"functionDeclarations": [{"name": "f"}, {"name": "g"}, {"name": "h"}]}],
               toolConfig={"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["f", "g"]}}),
         "toolConfig.functionCallingConfig.allowedFunctionNames"),
        (_part({"executableCode": {"code": "1", "language": "PYTHON"}}, "model"),
         "contents[0].parts[0].executableCode"),
        (_part({"text": "hmm", "thought": True}, "model"), "contents[0].parts[0].thought"),
        (_part({"videoMetadata": {}, "fileData": {"fileUri": "https://x.test/a.png"}}),
         "contents[0].parts[0].videoMetadata"),
        (_part({"inlineData": {"mimeType": "application/pdf", "data": "JVBE"}}),
         "contents[0].parts[0].inlineData.mimeType"),
        (_part({"fileData": {"mimeType": "image/png",
                             "fileUri": "https://generativelanguage.googleapis.com/v1beta/files/x"}}),
         "contents[0].parts[0].fileData.fileUri"),
        (_part({"fileData": {"mimeType": "image/png", "fileUri": "gs://bucket/a.png"}}),
         "contents[0].parts[0].fileData.fileUri"),
        (_part({"functionResponse": {"name": "never_called", "response": {}}}),
         "contents[0].parts[0].functionResponse.name"),
        (_part({"functionCall": {"name": "f", "args": {}}}), "contents[0].parts[0].functionCall"),
        ({"contents": [{"role": "tool", "parts": [{"text": "x"}]}]}, "contents[0].role"),
        (_with(systemInstruction={"parts": [{"inlineData": {"mimeType": "image/png", "data": "x"}}]}),
         "systemInstruction.parts[0].inlineData"),
    ],
)  # fmt: skip
def test_request_to_pivot_refusals_name_the_field(body: dict[str, Any], field: str) -> None:
    assert refused(lambda: request_to_pivot(body)) == field


def test_request_to_pivot_text_only_modalities_and_an_empty_model_turn() -> None:
    pivot = request_to_pivot(
        {
            "contents": [{"role": "model", "parts": []}, {"parts": [{"text": "hi"}]}],
            "generationConfig": {"responseModalities": ["text"]},
        }
    )
    assert pivot == {
        "messages": [{"role": "assistant", "content": ""}, {"role": "user", "content": "hi"}]
    }


def test_request_to_pivot_ignores_thought_signatures_and_return_schemas() -> None:
    pivot = request_to_pivot(
        {
            "contents": [
                {
                    "role": "model",
                    "parts": [
                        {"functionCall": {"name": "f", "args": {}}, "thoughtSignature": "c2ln"}
                    ],
                },
            ],
            "tools": [
                {
                    "functionDeclarations": [
                        {"name": "f", "response_json_schema": {"type": "string"}}
                    ]
                }
            ],
        }
    )
    assert pivot["messages"][0]["tool_calls"][0]["function"]["name"] == "f"
    assert pivot["tools"] == [{"type": "function", "function": {"name": "f"}}]


def test_the_real_sdk_request_reads_as_the_pivot() -> None:
    """What `client.models.generate_content` really sends (a snake/camel mix) translates."""
    sent: list[dict[str, Any]] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        sent.append(json.loads(request.content))
        return httpx2.Response(200, json={"candidates": []})

    sdk_client(handler).models.generate_content(
        model="gemini-2.5-flash",
        contents=[
            types.Content(
                role="user",
                parts=[
                    types.Part.from_text(text="What is in these, and the weather?"),
                    types.Part.from_bytes(data=b"\x89PNG\xfb\xff", mime_type="image/png"),
                    types.Part.from_uri(file_uri="https://x.test/cat.jpg", mime_type="image/jpeg"),
                ],
            ),
            types.Content(
                role="model",
                parts=[
                    types.Part(
                        function_call=types.FunctionCall(name="get_weather", args={"city": "Paris"})
                    )
                ],
            ),
            types.Content(
                role="user",
                parts=[
                    types.Part.from_function_response(
                        name="get_weather", response={"result": "sun"}
                    )
                ],
            ),
        ],
        config=types.GenerateContentConfig(
            system_instruction="Be brief.",
            temperature=0.2,
            top_k=5,
            max_output_tokens=64,
            stop_sequences=["STOP"],
            response_mime_type="application/json",
            tools=[
                types.Tool(
                    function_declarations=[
                        types.FunctionDeclaration(
                            name="get_weather",
                            description="Weather",
                            parameters_json_schema=WEATHER_SCHEMA,
                        )
                    ]
                )
            ],
            tool_config=types.ToolConfig(
                function_calling_config=types.FunctionCallingConfig(
                    mode=types.FunctionCallingConfigMode.ANY
                )
            ),
        ),
    )
    pivot = request_to_pivot(sent[0])
    assert pivot["messages"] == [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in these, and the weather?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR/v/"}},
                {"type": "image_url", "image_url": {"url": "https://x.test/cat.jpg"}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_0",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_0", "content": "sun"},
    ]
    assert pivot["tools"][0]["function"]["parameters"] == WEATHER_SCHEMA
    assert pivot["tool_choice"] == "required"
    assert pivot["response_format"] == {"type": "json_object"}
    assert (pivot["temperature"], pivot["top_k"], pivot["max_tokens"], pivot["stop"]) == (
        0.2,
        5,
        64,
        ["STOP"],
    )


# --- requests: pivot -> Gemini ----------------------------------------------------

TOOL_CONVERSATION: dict[str, Any] = {
    "model": "gpt-4o",
    "stream": True,
    "stream_options": {"include_usage": True},
    "messages": [
        {"role": "system", "content": "Be terse."},
        {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_p",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {
                    "id": "call_t",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": ""},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_p", "content": '{"temp": 21}'},
        {"role": "tool", "tool_call_id": "call_t", "content": [{"type": "text", "text": "9am"}]},
        {"role": "assistant", "content": "21C at 9am."},
        {"role": "user", "content": "Thanks"},
    ],
    "tools": [
        {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER_SCHEMA, "strict": True}},
        {"type": "function", "function": {"name": "get_time"}},
    ],
    "tool_choice": "auto",
    "parallel_tool_calls": True,
    "temperature": 0.3,
    "top_p": 0.8,
    "top_k": 20,
    "max_completion_tokens": 256,
    "stop": "END",
    "seed": 3,
    "presence_penalty": 0.5,
    "frequency_penalty": 0.25,
    "n": 1,
}  # fmt: skip


def test_request_from_pivot_tool_conversation() -> None:
    body = request_from_pivot(TOOL_CONVERSATION, "gemini-2.5-flash", True)
    assert body == {
        "systemInstruction": {"parts": [{"text": "Be terse."}, {"text": "Use tools."}]},
        "contents": [
            {"role": "user", "parts": [{"text": "Weather in Paris and Rome?"}]},
            {
                "role": "model",
                "parts": [
                    {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}, "id": "call_p"}},
                    {"functionCall": {"name": "get_time", "args": {}, "id": "call_t"}},
                ],
            },
            {
                "role": "user",
                "parts": [
                    {"functionResponse": {"id": "call_p", "name": "get_weather", "response": {"temp": 21}}},
                    {"functionResponse": {"id": "call_t", "name": "get_time", "response": {"result": "9am"}}},
                ],
            },
            {"role": "model", "parts": [{"text": "21C at 9am."}]},
            {"role": "user", "parts": [{"text": "Thanks"}]},
        ],
        "tools": [
            {
                "functionDeclarations": [
                    {"name": "get_weather", "description": "Weather", "parametersJsonSchema": WEATHER_SCHEMA},
                    {"name": "get_time"},
                ]
            }
        ],
        "toolConfig": {"functionCallingConfig": {"mode": "AUTO"}},
        "generationConfig": {
            "temperature": 0.3,
            "topP": 0.8,
            "topK": 20,
            "presencePenalty": 0.5,
            "frequencyPenalty": 0.25,
            "seed": 3,
            "maxOutputTokens": 256,
            "stopSequences": ["END"],
        },
    }  # fmt: skip


def test_request_from_pivot_is_valid_for_the_sdk_types() -> None:
    """google-genai's own models (extra fields forbidden) accept every object we emit."""
    body = request_from_pivot(TOOL_CONVERSATION, "gemini-3-pro-preview", False)
    contents = [types.Content.model_validate(c) for c in body["contents"]]
    call = contents[1].parts[0].function_call  # type: ignore[index]
    assert call is not None
    assert call.args == {"city": "Paris"}
    assert call.id == "call_p"
    result = contents[2].parts[1].function_response  # type: ignore[index]
    assert result is not None
    assert result.name == "get_time"
    types.Content.model_validate(body["systemInstruction"])
    tool = types.Tool.model_validate(body["tools"][0])
    assert tool.function_declarations[0].parameters_json_schema == WEATHER_SCHEMA  # type: ignore[index]
    types.ToolConfig.model_validate(body["toolConfig"])
    config = types.GenerationConfig.model_validate(body["generationConfig"])
    assert config.max_output_tokens == 256
    assert config.stop_sequences == ["END"]


def test_request_from_pivot_signs_replayed_calls_for_gemini_3() -> None:
    def first_parts(model: str) -> list[dict[str, Any]]:
        contents = request_from_pivot(TOOL_CONVERSATION, model, False)["contents"]
        parts: list[dict[str, Any]] = contents[1]["parts"]
        return parts

    parts = first_parts("gemini-3-pro-preview")
    assert parts[0]["thoughtSignature"] == "skip_thought_signature_validator"
    assert "thoughtSignature" not in parts[1]  # only the first of parallel calls is signed
    assert all("thoughtSignature" not in p for p in first_parts("gemini-2.5-flash"))


def test_request_from_pivot_carries_an_assistant_refusal_as_its_text() -> None:
    pivot = {
        "messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": None, "refusal": "I can't help with that."},
            {"role": "assistant", "content": None},
        ]
    }
    assert request_from_pivot(pivot, "gemini-2.5-flash", False)["contents"] == [
        {"role": "user", "parts": [{"text": "x"}]},
        {"role": "model", "parts": [{"text": "I can't help with that."}]},
    ]


def test_request_from_pivot_images() -> None:
    body = request_from_pivot(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Compare"},
                        {
                            "type": "image_url",
                            "image_url": {"url": "data:image/webp;base64,UklGRg=="},
                        },
                        {
                            "type": "image_url",
                            "image_url": {"url": "https://x.test/p/cat.JPG?s=1", "detail": "auto"},
                        },
                        {"type": "image_url", "image_url": {"url": "http://x.test/dog.gif"}},
                    ],
                }
            ]
        },
        "gemini-2.5-flash",
        False,
    )
    assert body["contents"][0]["parts"] == [
        {"text": "Compare"},
        {"inlineData": {"mimeType": "image/webp", "data": "UklGRg=="}},
        {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://x.test/p/cat.JPG?s=1"}},
        {"fileData": {"mimeType": "image/gif", "fileUri": "http://x.test/dog.gif"}},
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("response_format", "config"),
    [
        ({"type": "text"}, None),
        ({"type": "json_object"}, {"responseMimeType": "application/json"}),
        (
            {
                "type": "json_schema",
                "json_schema": {"name": "w", "schema": WEATHER_SCHEMA, "strict": True},
            },
            {"responseMimeType": "application/json", "responseJsonSchema": WEATHER_SCHEMA},
        ),
    ],
)
def test_request_from_pivot_json_mode(response_format: dict[str, Any], config: Any) -> None:
    pivot = {"messages": [{"role": "user", "content": "x"}], "response_format": response_format}
    assert request_from_pivot(pivot, "gemini-2.5-flash", False).get("generationConfig") == config


@pytest.mark.parametrize(
    ("choice", "config"),
    [
        ("none", {"mode": "NONE"}),
        ("required", {"mode": "ANY"}),
        (
            {"type": "function", "function": {"name": "f"}},
            {"mode": "ANY", "allowedFunctionNames": ["f"]},
        ),
    ],
)
def test_request_from_pivot_tool_choice(choice: Any, config: dict[str, Any]) -> None:
    pivot = {
        "messages": [{"role": "user", "content": "x"}],
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "tool_choice": choice,
    }
    assert request_from_pivot(pivot, "gemini-2.5-flash", False)["toolConfig"] == {
        "functionCallingConfig": config
    }


def _msgs(*messages: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"messages": list(messages) or [{"role": "user", "content": "hi"}], **fields}


def _image(url: str, **extra: Any) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url, **extra}}]}


@pytest.mark.parametrize(
    ("pivot", "field"),
    [
        (_msgs(n=2), "n"),
        (_msgs(logprobs=True), "logprobs"),
        (_msgs(top_logprobs=2), "top_logprobs"),
        (_msgs(metadata={"a": "b"}), "metadata"),
        (_msgs(reasoning_effort="low"), "reasoning_effort"),
        (_msgs(parallel_tool_calls=False), "parallel_tool_calls"),
        (_msgs(tool_choice="sometimes"), "tool_choice"),
        (_msgs(response_format={"type": "xml"}), "response_format.type"),
        (_msgs(tools=[{"type": "custom", "custom": {"name": "x"}}]), "tools[0].type"),
        (_msgs({"role": "user", "content": "a"}, {"role": "system", "content": "late"}), "messages[1]"),
        (_msgs({"role": "user", "content": "a", "name": "bob"}), "messages[0].name"),
        (_msgs({"role": "function", "content": "a"}), "messages[0].role"),
        (_msgs({"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}),
         "messages[0].content[0].type"),
        (_msgs(_image("https://x.test/picture")), "messages[0].content[0].image_url.url"),
        (_msgs(_image("ftp://x.test/a.png")), "messages[0].content[0].image_url.url"),
        (_msgs(_image("https://x.test/a.png", detail="high")), "messages[0].content[0].image_url.detail"),
        (_msgs({"role": "tool", "tool_call_id": "nope", "content": "x"}), "messages[0].tool_call_id"),
        (_msgs({"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}),
         "messages[0].tool_calls[0].function.arguments"),
        (_msgs({"role": "assistant", "content": "a", "audio": {"id": "x"}}), "messages[0].audio"),
    ],
)  # fmt: skip
def test_request_from_pivot_refusals_name_the_field(pivot: dict[str, Any], field: str) -> None:
    assert refused(lambda: request_from_pivot(pivot, "gemini-2.5-flash", False)) == field


def test_request_from_pivot_ignores_the_end_user_id() -> None:
    """`user` changes nothing in an answer and Gemini has no such field: not sent, not refused."""
    body = request_from_pivot(_msgs(user="u-1"), "gemini-2.5-flash", False)
    assert body == request_from_pivot(_msgs(), "gemini-2.5-flash", False)
    assert "u-1" not in json.dumps(body)


def _nested_schema(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "STRING"}
    for _ in range(depth):
        schema = {"type": "OBJECT", "properties": {"a": schema}}
    return schema


def _nested(depth: int) -> Any:
    value: Any = {}
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.mark.parametrize("depth", [65, 505, 2000])
def test_request_to_pivot_refuses_a_schema_nested_too_deeply(depth: int) -> None:
    body = _with(
        tools=[{"functionDeclarations": [{"name": "f", "parameters": _nested_schema(depth)}]}]
    )
    with pytest.raises(Unsupported) as caught:
        request_to_pivot(body)
    assert caught.value.field.startswith("tools[0].functionDeclarations[0].parameters.properties.a")
    assert "nested too deeply" in str(caught.value)
    schema = {"responseMimeType": "application/json", "responseSchema": _nested_schema(depth)}
    assert refused(lambda: request_to_pivot(_with(generationConfig=schema))).startswith(
        "generationConfig.responseSchema.properties"
    )


def test_request_to_pivot_carries_a_schema_nested_within_the_cap() -> None:
    body = _with(
        tools=[{"functionDeclarations": [{"name": "f", "parameters": _nested_schema(63)}]}]
    )
    schema = request_to_pivot(body)["tools"][0]["function"]["parameters"]
    for _ in range(63):
        schema = schema["properties"]["a"]
    assert schema == {"type": "string"}


def test_deeply_nested_call_arguments_and_results_are_refused_not_crashed() -> None:
    deep = _nested(1020)  # what orjson still parses, beyond Python's recursion limit
    call = _with(
        contents=[{"role": "model", "parts": [{"functionCall": {"name": "f", "args": deep}}]}]
    )
    assert refused(lambda: request_to_pivot(call)) == "contents[0].parts[0].functionCall.args"
    result = _with(
        contents=[
            {"role": "model", "parts": [{"functionCall": {"name": "f", "args": {}}}]},
            {"role": "user", "parts": [{"functionResponse": {"name": "f", "response": deep}}]},
        ]
    )
    assert (
        refused(lambda: request_to_pivot(result))
        == "contents[1].parts[0].functionResponse.response"
    )
    answer = {
        "candidates": [{"content": {"parts": [{"functionCall": {"name": "f", "args": deep}}]}}]
    }
    assert refused(lambda: response_to_pivot(answer)).endswith("functionCall.args")
    assert refused(lambda: ToPivot("m").event(None, answer)).endswith("functionCall.args")


def test_deeply_nested_argument_strings_are_refused_not_crashed() -> None:
    deep = "[" * 100_000 + "]" * 100_000
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": deep}}
    pivot = _msgs(
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c", "content": deep},
    )
    assert refused(lambda: request_from_pivot(pivot, "gemini-2.5-flash", False)) == (
        "messages[0].tool_calls[0].function.arguments"
    )
    pivot["messages"][0]["tool_calls"][0]["function"]["arguments"] = "{}"
    body = request_from_pivot(pivot, "gemini-2.5-flash", False)
    assert body["contents"][1]["parts"][0]["functionResponse"]["response"] == {"result": deep}


def test_a_gemini_request_survives_the_round_trip() -> None:
    original = {
        "systemInstruction": {"parts": [{"text": "sys"}]},
        "contents": [
            {"role": "user", "parts": [{"text": "hi"}, {"inlineData": {"mimeType": "image/png", "data": "iVBO"}}]},
            {"role": "model", "parts": [{"functionCall": {"id": "c1", "name": "f", "args": {"a": 1}}}]},
            {"role": "user", "parts": [{"functionResponse": {"id": "c1", "name": "f", "response": {"ok": True}}}]},
        ],
        "tools": [{"functionDeclarations": [{"name": "f", "parametersJsonSchema": WEATHER_SCHEMA}]}],
        "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["f"]}},
        "generationConfig": {"temperature": 1, "maxOutputTokens": 9, "responseMimeType": "application/json"},
    }  # fmt: skip
    # one declared function: ANY-with-its-name reads as "required", which goes back as plain ANY
    expected = {**original, "toolConfig": {"functionCallingConfig": {"mode": "ANY"}}}
    assert request_from_pivot(request_to_pivot(original), "gemini-2.5-flash", False) == expected


# --- answers ----------------------------------------------------------------------

GEMINI_TOOL_ANSWER: dict[str, Any] = {
    "candidates": [
        {
            "content": {
                "role": "model",
                "parts": [
                    {"text": "Let me check", "thoughtSignature": "c2ln"},
                    {"text": "the weather.", "thought": False},
                    {"text": "secret reasoning", "thought": True},
                    {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
                    {"functionCall": {"id": "given", "name": "get_time", "args": {}}},
                ],
            },
            "finishReason": "STOP",
            "index": 0,
        }
    ],
    "usageMetadata": {
        "promptTokenCount": 20,
        "candidatesTokenCount": 8,
        "thoughtsTokenCount": 4,
        "cachedContentTokenCount": 6,
        "totalTokenCount": 32,
    },
    "modelVersion": "gemini-2.5-flash",
    "responseId": "r-1/x",
}


def test_response_to_pivot_tool_calls_and_usage() -> None:
    pivot = response_to_pivot(GEMINI_TOOL_ANSWER)
    assert pivot == {
        "id": "r-1/x",
        "object": "chat.completion",
        "created": 0,
        "model": "gemini-2.5-flash",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Let me checkthe weather.",
                    "tool_calls": [
                        {
                            "id": "call_r-1x_0",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                        },
                        {
                            "id": "given",
                            "type": "function",
                            "function": {"name": "get_time", "arguments": "{}"},
                        },
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {
            "prompt_tokens": 20,
            "completion_tokens": 12,
            "total_tokens": 32,
            "prompt_tokens_details": {"cached_tokens": 6},
            "completion_tokens_details": {"reasoning_tokens": 4},
        },
    }


@pytest.mark.parametrize(
    ("reason", "finish"),
    [
        ("STOP", "stop"),
        ("MAX_TOKENS", "length"),
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
        ("BLOCKLIST", "content_filter"),
        ("PROHIBITED_CONTENT", "content_filter"),
        ("SPII", "content_filter"),
        ("IMAGE_SAFETY", "content_filter"),
        ("MALFORMED_FUNCTION_CALL", "stop"),
        ("OTHER", "stop"),
    ],
)
def test_response_to_pivot_finish_reasons(reason: str, finish: str) -> None:
    body = {"candidates": [{"content": {"parts": [{"text": "x"}]}, "finishReason": reason}]}
    assert response_to_pivot(body)["choices"][0]["finish_reason"] == finish


def test_response_to_pivot_blocked_prompt_and_several_candidates() -> None:
    blocked = response_to_pivot(
        {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 3}}
    )
    assert blocked["choices"][0]["finish_reason"] == "content_filter"
    assert blocked["choices"][0]["message"] == {"role": "assistant", "content": None}
    assert blocked["usage"] == {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3}
    two = {
        "candidates": [
            {"content": {"parts": [{"text": "first"}]}},
            {"content": {"parts": [{"text": "second"}]}},
        ]
    }
    assert response_to_pivot(two)["choices"][0]["message"]["content"] == "first"  # fmt: skip


PIVOT_TOOL_ANSWER: dict[str, Any] = {
    "id": "chatcmpl-9",
    "object": "chat.completion",
    "created": 1,
    "model": "gpt-4o-2024",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [
                    {
                        "id": "call_abc",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            "finish_reason": "tool_calls",
        }
    ],
    "usage": {
        "prompt_tokens": 11,
        "completion_tokens": 7,
        "total_tokens": 18,
        "completion_tokens_details": {"reasoning_tokens": 2},
    },
}


def test_response_from_pivot() -> None:
    assert response_from_pivot(PIVOT_TOOL_ANSWER, "gemini-2.5-flash") == {
        "candidates": [
            {
                "content": {
                    "role": "model",
                    "parts": [
                        {"text": "Checking."},
                        {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}, "id": "call_abc"}},
                    ],
                },
                "finishReason": "STOP",
                "index": 0,
            }
        ],
        "usageMetadata": {
            "promptTokenCount": 11,
            "candidatesTokenCount": 5,
            "thoughtsTokenCount": 2,
            "totalTokenCount": 18,
        },
        "modelVersion": "gemini-2.5-flash",
        "responseId": "chatcmpl-9",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("finish", "reason"),
    [
        ("stop", "STOP"),
        ("tool_calls", "STOP"),
        ("length", "MAX_TOKENS"),
        ("content_filter", "SAFETY"),
    ],
)
def test_response_from_pivot_finish_reasons(finish: str, reason: str) -> None:
    pivot = {"id": "c", "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": finish}]}  # fmt: skip
    assert response_from_pivot(pivot, "m")["candidates"][0]["finishReason"] == reason


def test_the_sdk_parses_response_from_pivot() -> None:
    body = response_from_pivot(PIVOT_TOOL_ANSWER, "gemini-2.5-flash")
    client = sdk_client(lambda request: httpx2.Response(200, json=body))
    answer = client.models.generate_content(model="gemini-2.5-flash", contents="Weather?")
    assert answer.candidates is not None
    parts = answer.candidates[0].content.parts  # type: ignore[union-attr]
    assert parts is not None
    assert parts[0].text == "Checking."
    assert [(c.name, c.args, c.id) for c in answer.function_calls or []] == [
        ("get_weather", {"city": "Paris"}, "call_abc")
    ]
    assert answer.candidates[0].finish_reason == types.FinishReason.STOP
    usage = answer.usage_metadata
    assert usage is not None
    assert (usage.prompt_token_count, usage.candidates_token_count, usage.thoughts_token_count) == (
        11,
        5,
        2,
    )
    assert usage.total_token_count == 18
    assert answer.response_id == "chatcmpl-9"
    assert answer.model_version == "gemini-2.5-flash"


def test_a_gemini_answer_survives_the_round_trip_through_the_pivot() -> None:
    body = response_from_pivot(response_to_pivot(GEMINI_TOOL_ANSWER), "gemini-2.5-flash")
    calls = [
        p["functionCall"] for p in body["candidates"][0]["content"]["parts"] if "functionCall" in p
    ]
    assert calls == [
        {"name": "get_weather", "args": {"city": "Paris"}, "id": "call_r-1x_0"},
        {"name": "get_time", "args": {}, "id": "given"},
    ]
    assert body["usageMetadata"] == {
        "promptTokenCount": 20,
        "candidatesTokenCount": 8,
        "thoughtsTokenCount": 4,
        "cachedContentTokenCount": 6,
        "totalTokenCount": 32,
    }


def _length_cut_answer(finish: str) -> dict[str, Any]:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Par'},
    }
    message = {"role": "assistant", "content": None, "tool_calls": [call]}
    return {"id": "c", "choices": [{"index": 0, "message": message, "finish_reason": finish}]}  # fmt: skip


def test_response_from_pivot_carries_a_call_cut_by_the_token_limit() -> None:
    answer = response_from_pivot(_length_cut_answer("length"), "m")
    [candidate] = answer["candidates"]
    assert candidate["finishReason"] == "MAX_TOKENS"
    assert candidate["content"]["parts"] == [
        {"functionCall": {"name": "get_weather", "args": {}, "id": "call_1"}}
    ]


@pytest.mark.parametrize("finish", ["tool_calls", "stop", None])
def test_response_from_pivot_refuses_bad_arguments_in_a_complete_answer(finish: str | None) -> None:
    field = refused(lambda: response_from_pivot(_length_cut_answer(finish), "m"))  # type: ignore[arg-type]
    assert field == "choices[0].message.tool_calls[0].function.arguments"


def test_response_from_pivot_keeps_valid_arguments_cut_by_the_token_limit() -> None:
    pivot = _length_cut_answer("length")
    pivot["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] = '{"city": "Rome"}'
    parts = response_from_pivot(pivot, "m")["candidates"][0]["content"]["parts"]
    assert parts[0]["functionCall"]["args"] == {"city": "Rome"}


# --- errors -----------------------------------------------------------------------


def test_error_to_pivot_keeps_status_and_rpc_status() -> None:
    body = {
        "error": {
            "code": 429,
            "message": "Resource has been exhausted (e.g. check quota).",
            "status": "RESOURCE_EXHAUSTED",
            "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"}],
        }
    }
    pivot = error_to_pivot(429, json.dumps(body).encode())
    assert pivot == {
        "error": {
            "message": "Resource has been exhausted (e.g. check quota).",
            "type": "rate_limit_error",
            "code": "RESOURCE_EXHAUSTED",
            "details": body["error"]["details"],
        },
        "status": 429,
    }
    assert error_from_pivot(pivot) == body


@pytest.mark.parametrize(
    ("status", "body", "message", "kind"),
    [
        (503, b"<html>Service Unavailable</html>", "<html>Service Unavailable</html>", "api_error"),
        (502, b"", "upstream answered HTTP 502", "api_error"),
        (401, b'[{"error": {"code": 401, "message": "bad key", "status": "UNAUTHENTICATED"}}]', "bad key", "authentication_error"),
        (404, b'{"error": "not an object"}', '{"error": "not an object"}', "not_found_error"),
        (413, b"\xff\xfe too big", "\ufffd\ufffd too big", "request_too_large"),
        (529, b"overloaded", "overloaded", "overloaded_error"),
        (403, b"{}", "{}", "permission_error"),
        (400, b"nope", "nope", "invalid_request_error"),
    ],
)  # fmt: skip
def test_error_to_pivot_any_body(status: int, body: bytes, message: str, kind: str) -> None:
    pivot = error_to_pivot(status, body)
    assert pivot["status"] == status
    assert pivot["error"]["message"] == message
    assert pivot["error"]["type"] == kind


@pytest.mark.parametrize(
    ("status", "code", "rpc"),
    [
        (400, "invalid_request_error", "INVALID_ARGUMENT"),
        (401, None, "UNAUTHENTICATED"),
        (403, "permission_error", "PERMISSION_DENIED"),
        (404, None, "NOT_FOUND"),
        (429, "rate_limit_exceeded", "RESOURCE_EXHAUSTED"),
        (500, None, "INTERNAL"),
        (503, None, "UNAVAILABLE"),
        (504, None, "DEADLINE_EXCEEDED"),
        (529, None, "UNAVAILABLE"),
        (422, None, "INVALID_ARGUMENT"),
        (507, None, "INTERNAL"),
        (429, "RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"),
    ],
)
def test_error_from_pivot_rpc_status(status: int, code: str | None, rpc: str) -> None:
    pivot = {"error": {"message": "m", "type": "x", "code": code}, "status": status}
    assert error_from_pivot(pivot) == {"error": {"code": status, "message": "m", "status": rpc}}


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000,
        b'{"error": {"message": ' + b"[" * 1020 + b"]" * 1020 + b"}}",
        b'{"error": {"message": "m", "details": [' + b"[" * 1020 + b"]" * 1020 + b"]}}",
        b'{"error": ' * 5000 + b"1" + b"}" * 5000,
        b'{"error": {"message": "m", "status": {"a": 1}, "details": "x"}}',
    ],
)
def test_error_to_pivot_never_raises_on_a_hostile_body(body: bytes) -> None:
    pivot = error_to_pivot(502, body)
    assert pivot["status"] == 502
    assert pivot["error"]["type"] == "api_error"
    assert isinstance(pivot["error"]["message"], str)
    assert pivot["error"]["message"]
    assert error_from_pivot(pivot)["error"]["code"] == 502


def test_a_deeply_nested_in_band_stream_error_becomes_a_pivot_error() -> None:
    error = {"code": 500, "message": _nested(1020), "status": "INTERNAL"}
    [pivot] = ToPivot("m").event(None, {"error": error})
    assert pivot is not None
    assert (pivot["status"], pivot["error"]["code"]) == (500, "INTERNAL")
    assert isinstance(pivot["error"]["message"], str)


def test_error_from_pivot_takes_only_a_string_message() -> None:
    pivot = {"error": {"message": _nested(1020), "type": "api_error", "code": None}, "status": 500}
    assert error_from_pivot(pivot)["error"]["message"] == ""


def test_the_sdk_raises_its_own_error_for_error_from_pivot() -> None:
    pivot = {
        "error": {"message": "slow down", "type": "rate_limit_error", "code": None},
        "status": 429,
    }
    body = error_from_pivot(pivot)
    client = sdk_client(lambda request: httpx2.Response(429, json=body))
    with pytest.raises(genai_errors.ClientError) as caught:
        client.models.generate_content(model="gemini-2.5-flash", contents="hi")
    assert (caught.value.code, caught.value.status, caught.value.message) == (
        429,
        "RESOURCE_EXHAUSTED",
        "slow down",
    )


# --- streams: Gemini -> pivot -----------------------------------------------------


def test_to_pivot_text_stream() -> None:
    stream = gemini_stream(
        ["Hel", "lo"],
        {
            "candidates": [{"content": {"role": "model", "parts": [{"text": "!"}]}, "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 3, "totalTokenCount": 12},
        },
    )  # fmt: skip
    translator = ToPivot("gemini-2.5-flash")
    chunks = [out for event in stream for out in translator.event(None, event)]
    assert [c and c["choices"] and c["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant", "content": "Hel"},
        {"content": "lo"},
        {"content": "!"},
        {},
        [],
        None,
    ]
    assert chunks[3]["choices"][0]["finish_reason"] == "stop"  # type: ignore[index]
    assert chunks[4]["usage"] == {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}  # type: ignore[index]
    assert {(c["id"], c["object"], c["model"]) for c in chunks[:-1]} == {  # type: ignore[index]
        ("resp-1", "chat.completion.chunk", "gemini-2.5-flash")
    }
    assert translator.event(None, stream[-1]) == []  # nothing after the end


def test_to_pivot_stream_assembles_in_the_openai_sdk() -> None:
    stream = gemini_stream(
        ["Checking "],
        {
            "candidates": [
                {
                    "content": {
                        "role": "model",
                        "parts": [
                            {"text": "now."},
                            {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
                            {"functionCall": {"id": "t-1", "name": "get_time", "args": {}}},
                        ],
                    },
                    "finishReason": "STOP",
                }
            ],
            "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 5, "thoughtsTokenCount": 2, "totalTokenCount": 16},
        },
    )  # fmt: skip
    translator = ToPivot("gemini-2.5-flash")
    final = openai_final([out for event in stream for out in translator.event(None, event)])
    choice = final.choices[0]
    assert choice.message.content == "Checking now."
    assert choice.finish_reason == "tool_calls"
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls or []] == [
        ("call_resp-1_0", "get_weather", {"city": "Paris"}),
        ("t-1", "get_time", {}),
    ]  # fmt: skip
    assert final.usage is not None
    assert (final.usage.prompt_tokens, final.usage.completion_tokens, final.usage.total_tokens) == (
        9,
        7,
        16,
    )


def test_to_pivot_stream_max_tokens_and_blocked_prompt() -> None:
    translator = ToPivot("gemini-2.5-flash")
    chunks = translator.event(None, {"candidates": [{"content": {"parts": [{"text": "cut"}]}, "finishReason": "MAX_TOKENS"}]})  # fmt: skip
    with pytest.raises(openai.LengthFinishReasonError) as caught:  # the SDK's way to say "length"
        openai_final(chunks)
    assert caught.value.completion.choices[0].message.content == "cut"
    blocked = ToPivot("gemini-2.5-flash").event(None, {"promptFeedback": {"blockReason": "OTHER"}})
    with pytest.raises(openai.ContentFilterFinishReasonError) as filtered:
        openai_final(blocked)
    assert filtered.value.completion.model == "gemini-2.5-flash"


def test_to_pivot_in_band_error() -> None:
    translator = ToPivot("gemini-2.5-flash")
    translator.event(None, gemini_stream(["a"], {})[0])
    error = {"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}}
    assert translator.event(None, error) == [
        {
            "error": {
                "message": "The model is overloaded.",
                "type": "api_error",
                "code": "UNAVAILABLE",
            },
            "status": 503,
        }
    ]
    assert translator.event(None, gemini_stream(["b"], {})[0]) == []


# --- streams: pivot -> Gemini -----------------------------------------------------

PIVOT_TOOL_STREAM: list[dict[str, Any] | None] = [
    pivot_chunk({"role": "assistant", "content": ""}),
    pivot_chunk({"content": "Let me "}),
    pivot_chunk({"content": "check."}),
    pivot_chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}),
    pivot_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Pa'}}]}),
    pivot_chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]}),
    pivot_chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ris"}'}}]}),
    pivot_chunk({}, "tool_calls"),
    usage_chunk(12, 30),
    None,
]  # fmt: skip


def test_from_pivot_stream_events() -> None:
    translator = FromPivot("gemini-2.5-flash")
    events = [event for chunk in PIVOT_TOOL_STREAM for event in translator.chunk(chunk)]
    assert [name for name, _ in events] == [None, None, None]
    head = {"modelVersion": "gemini-2.5-flash", "responseId": "chatcmpl-1"}
    assert [data for _, data in events] == [
        {"candidates": [{"content": {"role": "model", "parts": [{"text": "Let me "}]}, "index": 0}], **head},
        {"candidates": [{"content": {"role": "model", "parts": [{"text": "check."}]}, "index": 0}], **head},
        {
            "candidates": [
                {
                    "content": {
                        "role": "model",
                        "parts": [
                            {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}, "id": "call_a"}},
                            {"functionCall": {"name": "get_time", "args": {}, "id": "call_b"}},
                        ],
                    },
                    "index": 0,
                    "finishReason": "STOP",
                }
            ],
            **head,
            "usageMetadata": {"promptTokenCount": 12, "candidatesTokenCount": 30, "totalTokenCount": 42},
        },
    ]  # fmt: skip
    assert translator.chunk(None) == []


def test_from_pivot_stream_assembles_in_the_google_sdk() -> None:
    translator = FromPivot("gemini-2.5-flash")
    body = sse(event for chunk in PIVOT_TOOL_STREAM for event in translator.chunk(chunk))
    client = sdk_client(
        lambda request: httpx2.Response(
            200, content=body, headers={"content-type": "text/event-stream"}
        )
    )
    chunks = list(
        client.models.generate_content_stream(model="gemini-2.5-flash", contents="Weather?")
    )
    text = "".join(
        part.text
        for chunk in chunks
        for part in (chunk.candidates[0].content.parts or [])  # type: ignore[index, union-attr]
        if part.text
    )
    assert text == "Let me check."
    calls = [(c.name, c.args, c.id) for chunk in chunks for c in chunk.function_calls or []]
    assert calls == [("get_weather", {"city": "Paris"}, "call_a"), ("get_time", {}, "call_b")]
    last = chunks[-1]
    assert last.candidates is not None
    assert last.candidates[0].finish_reason == types.FinishReason.STOP
    assert last.usage_metadata is not None
    assert (last.usage_metadata.prompt_token_count, last.usage_metadata.candidates_token_count) == (
        12,
        30,
    )
    assert last.usage_metadata.total_token_count == 42


def test_from_pivot_text_stream_with_length_finish_in_the_google_sdk() -> None:
    translator = FromPivot("gemini-2.5-flash")
    stream = [
        pivot_chunk({"role": "assistant", "content": "Hi"}),
        pivot_chunk({}, "length"),
        usage_chunk(1, 1),
        None,
    ]
    body = sse(event for chunk in stream for event in translator.chunk(chunk))
    client = sdk_client(lambda request: httpx2.Response(200, content=body))
    chunks = list(client.models.generate_content_stream(model="gemini-2.5-flash", contents="x"))
    assert [c.text for c in chunks] == ["Hi", None]
    assert chunks[-1].candidates[0].finish_reason == types.FinishReason.MAX_TOKENS  # type: ignore[index]


def test_from_pivot_in_band_error_reaches_the_google_sdk_as_its_error() -> None:
    translator = FromPivot("gemini-2.5-flash")
    events = translator.chunk(pivot_chunk({"content": "par"}))
    events += translator.chunk(
        {
            "error": {"message": "overloaded", "type": "overloaded_error", "code": None},
            "status": 529,
        }
    )
    assert events[-1] == (
        None,
        {"error": {"code": 529, "message": "overloaded", "status": "UNAVAILABLE"}},
    )
    assert translator.chunk(None) == []
    client = sdk_client(lambda request: httpx2.Response(200, content=sse(events)))
    stream = client.models.generate_content_stream(model="gemini-2.5-flash", contents="x")
    assert next(stream).text == "par"
    with pytest.raises(genai_errors.APIError) as caught:
        next(stream)
    assert (caught.value.code, caught.value.status) == (529, "UNAVAILABLE")


def test_from_pivot_bad_upstream_arguments_become_an_error_event() -> None:
    translator = FromPivot("gemini-2.5-flash")
    translator.chunk(pivot_chunk({"tool_calls": [{"index": 0, "id": "c", "function": {"name": "f", "arguments": "{oops"}}]}))  # fmt: skip
    [(name, data)] = translator.chunk(None)
    assert name is None
    assert data["error"]["code"] == 502
    assert "tool_calls[0].function.arguments" in data["error"]["message"]


def test_streams_round_trip_gemini_to_gemini() -> None:
    """Gemini chunks -> pivot -> Gemini chunks keep the text, calls, finish and usage."""
    stream = gemini_stream(
        ["One ", "two"],
        {
            "candidates": [
                {
                    "content": {"role": "model", "parts": [{"functionCall": {"id": "x", "name": "f", "args": {"n": [1, 2]}}}]},
                    "finishReason": "STOP",
                }
            ],
            "usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": 6, "totalTokenCount": 10},
        },
    )  # fmt: skip
    to_pivot, from_pivot = ToPivot("gemini-2.5-flash"), FromPivot("gemini-2.5-flash")
    events = [
        e
        for event in stream
        for chunk in to_pivot.event(None, event)
        for e in from_pivot.chunk(chunk)
    ]
    texts = [
        p["text"] for _, d in events for p in d["candidates"][0]["content"]["parts"] if "text" in p
    ]
    assert texts == ["One ", "two"]
    final = events[-1][1]
    assert final["candidates"][0]["content"]["parts"] == [{"functionCall": {"name": "f", "args": {"n": [1, 2]}, "id": "x"}}]  # fmt: skip
    assert final["candidates"][0]["finishReason"] == "STOP"
    assert final["usageMetadata"] == {
        "promptTokenCount": 4,
        "candidatesTokenCount": 6,
        "totalTokenCount": 10,
    }


def _call_delta(index: int, arguments: str, name: str | None = None) -> dict[str, Any]:
    function: dict[str, Any] = {"arguments": arguments}
    if name is not None:
        function["name"] = name
    return pivot_chunk({"tool_calls": [{"index": index, "id": f"c{index}", "function": function}]})


def test_from_pivot_collects_argument_pieces_in_a_list() -> None:
    translator = FromPivot("m")
    translator.chunk(_call_delta(0, '{"city": ', "get_weather"))
    for piece in ('"Pa', "ris", '"}'):
        translator.chunk(_call_delta(0, piece))
    assert translator._calls[0].pieces == ['{"city": ', '"Pa', "ris", '"}']
    translator.chunk(pivot_chunk({}, "tool_calls"))
    [(_, data)] = translator.chunk(None)
    assert data["candidates"][0]["content"]["parts"] == [
        {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}, "id": "c0"}}
    ]


def _assert_refused_as_too_large(events: list[Any], translator: FromPivot) -> None:
    assert len(events) == 1
    name, data = events[0]
    assert name is None
    assert data["error"]["code"] == 502
    assert data["error"]["status"] in ("UNAVAILABLE", "INTERNAL")
    assert "function call" in data["error"]["message"]
    assert translator.chunk(pivot_chunk({"content": "more"})) == []
    assert translator.chunk(None) == []


def test_from_pivot_refuses_arguments_past_16_mib() -> None:
    translator = FromPivot("m")
    piece = "x" * (4 * 1024 * 1024)
    for index in range(4):  # 16 MiB, spread over calls: still within the cap
        assert translator.chunk(_call_delta(index, piece, "f")) == []
    _assert_refused_as_too_large(translator.chunk(_call_delta(0, "y")), translator)


def test_from_pivot_counts_argument_bytes_not_characters() -> None:
    translator = FromPivot("m")
    assert translator.chunk(_call_delta(0, "\u00e9" * (8 * 1024 * 1024), "f")) == []
    _assert_refused_as_too_large(translator.chunk(_call_delta(0, "y")), translator)


def test_from_pivot_refuses_more_than_128_calls() -> None:
    translator = FromPivot("m")
    for index in range(128):
        assert translator.chunk(_call_delta(index, "{}", "f")) == []
    _assert_refused_as_too_large(translator.chunk(_call_delta(128, "{}", "f")), translator)


def test_from_pivot_text_before_the_cap_in_the_same_chunk_is_kept() -> None:
    translator = FromPivot("m")
    for index in range(128):
        translator.chunk(_call_delta(index, "{}", "f"))
    chunk = pivot_chunk(
        {"content": "hi", "tool_calls": [{"index": 128, "function": {"name": "f"}}]}
    )
    events = translator.chunk(chunk)
    assert events[0][1]["candidates"][0]["content"]["parts"] == [{"text": "hi"}]
    assert events[1][1]["error"]["code"] == 502
    assert translator.chunk(None) == []


def test_from_pivot_stream_call_cut_by_the_token_limit() -> None:
    translator = FromPivot("m")
    translator.chunk(_call_delta(0, '{"city": "Par', "get_weather"))
    translator.chunk(pivot_chunk({}, "length"))
    [(_, data)] = translator.chunk(None)
    [candidate] = data["candidates"]
    assert candidate["finishReason"] == "MAX_TOKENS"
    assert candidate["content"]["parts"] == [
        {"functionCall": {"name": "get_weather", "args": {}, "id": "c0"}}
    ]


def test_from_pivot_ignores_malformed_tool_call_deltas() -> None:
    translator = FromPivot("m")
    chunk = pivot_chunk({"tool_calls": ["nope", {"index": "0", "function": "x"}, {"index": 0, "function": {"name": "f", "arguments": "{}"}}]})  # fmt: skip
    assert translator.chunk(chunk) == []
    [(_, data)] = translator.chunk(None)
    parts = data["candidates"][0]["content"]["parts"]
    assert [part["functionCall"]["name"] for part in parts] == ["f"]


# -- found by review: what some OpenAI-compatible upstreams send ------------------------------


def _calls_of(translator: FromPivot) -> list[dict[str, Any]]:
    translator.chunk(pivot_chunk({}, "tool_calls"))
    [(_, data)] = translator.chunk(None)
    return [part["functionCall"] for part in data["candidates"][0]["content"]["parts"]]


def test_from_pivot_tool_call_deltas_without_an_index_continue_the_latest_call() -> None:
    """Some OpenAI-compatible upstreams omit `index`: a new `id` (or, without one, a new
    `name`) starts a call; a delta with neither continues the latest."""
    translator = FromPivot("m")
    for call in ({"id": "c1", "function": {"name": "f", "arguments": ""}},
                 {"function": {"arguments": '{"a":'}}, {"function": {"arguments": "1}"}},
                 {"id": "c2", "function": {"name": "g", "arguments": "{}"}},
                 {"function": {"name": "h", "arguments": '{"b":'}}, {"function": {"arguments": "2}"}}):  # fmt: skip
        assert translator.chunk(pivot_chunk({"tool_calls": [call]})) == []
    assert _calls_of(translator) == [
        {"name": "f", "args": {"a": 1}, "id": "c1"},
        {"name": "g", "args": {}, "id": "c2"},
        {"name": "h", "args": {"b": 2}},
    ]


def test_from_pivot_a_refusal_is_the_answers_text() -> None:
    translator = FromPivot("m")
    events = translator.chunk(pivot_chunk({"role": "assistant", "refusal": "I cannot "}))
    events += translator.chunk(pivot_chunk({"refusal": "help with that."}, "stop"))
    events += translator.chunk(None)
    parts = [p for _, data in events for p in data["candidates"][0]["content"]["parts"]]
    assert "".join(p["text"] for p in parts) == "I cannot help with that."


def test_response_from_pivot_a_refusal_is_the_answers_text() -> None:
    pivot = {"id": "x", "model": "m", "choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": None, "refusal": "I cannot help with that."}}]}  # fmt: skip
    doc = response_from_pivot(pivot, "m")
    assert doc["candidates"][0]["content"]["parts"] == [{"text": "I cannot help with that."}]


@pytest.mark.parametrize(
    ("deltas", "want"),
    [
        (  # calls interleaved by id
            [{"id": "A", "function": {"name": "f", "arguments": ""}},
             {"id": "B", "function": {"name": "g", "arguments": ""}},
             {"id": "A", "function": {"arguments": '{"a":1}'}},
             {"id": "B", "function": {"arguments": '{"b":2}'}}],
            [{"name": "f", "args": {"a": 1}, "id": "A"}, {"name": "g", "args": {"b": 2}, "id": "B"}],
        ),
        (  # the id, then the name, in deltas of their own
            [{"id": "A"}, {"function": {"name": "f"}}, {"function": {"arguments": "{}"}}],
            [{"name": "f", "args": {}, "id": "A"}],
        ),
        (  # indexed and unindexed calls in one answer never share a slot
            [{"index": 0, "id": "A", "function": {"name": "f", "arguments": "{}"}},
             {"id": "B", "function": {"name": "g", "arguments": "{}"}},
             {"index": 1, "id": "C", "function": {"name": "h", "arguments": "{}"}}],
            [{"name": "f", "args": {}, "id": "A"}, {"name": "h", "args": {}, "id": "C"},
             {"name": "g", "args": {}, "id": "B"}],
        ),
    ],
)  # fmt: skip
def test_from_pivot_unindexed_tool_call_deltas_find_their_call(
    deltas: list[dict[str, Any]], want: list[dict[str, Any]]
) -> None:
    translator = FromPivot("m")
    for call in deltas:
        assert translator.chunk(pivot_chunk({"tool_calls": [call]})) == []
    assert _calls_of(translator) == want
