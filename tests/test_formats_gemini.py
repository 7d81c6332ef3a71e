"""Unit tests of sidecar.formats.gemini: the Gemini API's error shape and metering hooks."""

from __future__ import annotations

from typing import Any

import httpx2
import orjson
import pytest
from google import genai
from google.genai import errors, types

from sidecar.errors import ErrorCode
from sidecar.formats import ADAPTERS, adapter_for
from sidecar.formats.gemini import GEMINI, http_status, rpc_status
from sidecar.usage import Usage

# The RPC status each HTTP status of the sidecar's own errors goes out with.
EXPECTED_RPC = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    402: "FAILED_PRECONDITION",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    413: "INVALID_ARGUMENT",
    415: "INVALID_ARGUMENT",
    426: "FAILED_PRECONDITION",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def test_registered_as_the_gemini_format() -> None:
    assert ADAPTERS["gemini"] is GEMINI
    assert adapter_for("gemini").format == "gemini"


@pytest.mark.parametrize("code", list(ErrorCode))
def test_error_body_is_a_google_rpc_status(code: ErrorCode) -> None:
    body = orjson.loads(GEMINI.error_body(code, "the message"))
    assert body == {
        "error": {
            "code": code.status,
            "message": "the message",
            "status": rpc_status(code.status),
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": code.wire,
                    "domain": "ai-gateway-sidecar",
                }
            ],
        }
    }
    if code.status in EXPECTED_RPC:
        assert body["error"]["status"] == EXPECTED_RPC[code.status]


@pytest.mark.parametrize(("status", "rpc"), list(EXPECTED_RPC.items()))
def test_rpc_status_of_each_http_status(status: int, rpc: str) -> None:
    assert rpc_status(status) == rpc


def test_rpc_status_of_an_unlisted_status() -> None:
    assert rpc_status(418) == "INVALID_ARGUMENT"
    assert rpc_status(599) == "INTERNAL"


@pytest.mark.parametrize(
    ("rpc", "status"),
    [("RESOURCE_EXHAUSTED", 429), ("UNAVAILABLE", 503), ("NOT_FOUND", 404), ("NEW_ONE", 500)],
)
def test_http_status_of_an_rpc_status(rpc: str, status: int) -> None:
    assert http_status(rpc) == status


def test_streams_need_no_change_to_report_usage() -> None:
    body: dict[str, Any] = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    assert GEMINI.prepare_stream("/v1beta/models/m:streamGenerateContent", body) is False
    assert body == {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}


def test_usage_from_body() -> None:
    body = orjson.dumps(
        {
            "usageMetadata": {
                "promptTokenCount": 8,
                "candidatesTokenCount": 2,
                "thoughtsTokenCount": 1,
            }
        }
    )
    assert GEMINI.usage_from_body(body) == Usage(8, 3)
    assert GEMINI.usage_from_body(b'{"totalTokens": 8}') is None


def _genai_raises(status: int, body: bytes) -> errors.APIError:
    """What the real google-genai SDK raises for this answer to generateContent."""

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(status, content=body, headers={"content-type": "application/json"})

    options = types.HttpOptions(
        base_url="http://sidecar.test",
        api_version="v1beta",
        httpx_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
    )
    client = genai.Client(api_key="k", http_options=options)
    with pytest.raises(errors.APIError) as info:
        client.models.generate_content(model="gemini-2.5-flash", contents="hi")
    return info.value


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (ErrorCode.ACCESS_KEY_INVALID, errors.ClientError),
        (ErrorCode.CREDITS_EXHAUSTED, errors.ClientError),
        (ErrorCode.MODEL_NOT_ALLOWED, errors.ClientError),
        (ErrorCode.ALL_KEYS_COOLING_DOWN, errors.ClientError),
        (ErrorCode.UPSTREAM_UNAVAILABLE, errors.ServerError),
        (ErrorCode.GATEWAY_TIMEOUT, errors.ServerError),
    ],
)
def test_genai_sdk_raises_the_error_body(code: ErrorCode, kind: type[errors.APIError]) -> None:
    err = _genai_raises(code.status, GEMINI.error_body(code, "no luck here"))
    assert type(err) is kind
    assert err.code == code.status
    assert err.status == EXPECTED_RPC[code.status]
    assert err.message == "no luck here"
    assert err.details["error"]["details"][0]["reason"] == code.wire
