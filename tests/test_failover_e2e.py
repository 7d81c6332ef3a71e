"""The failover conformance scenarios, end to end: one provider, one key, a fallback model
in the body's `models` array, every fault provoked through the mock provider, driven with
the official SDKs. Each ends with the full answer or, where nothing can rescue it, a clean
error the SDK raises (docs/reference.md#failover-and-key-health)."""

from __future__ import annotations

from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
from aiohttp.test_utils import TestServer

from tests.harness import Env, Sidecar, metric_value
from tests.test_proxy_e2e import (
    CLAUDE_MODEL,
    MSG,
    OPENAI_MODEL,
    REPLY,
    boot,
    keys_yaml,
    metrics_text,
    mock_log,
)

FALLBACK = OPENAI_MODEL


def config(env: Env, *, openai_prefill: bool = True, extra: str = "") -> str:
    """One key per provider; short timers so the silent scenarios stay quick."""
    return (
        "timeouts: {first_token: 1s, stream_idle: 1s, per_request: 5s}\n"
        "failover: {retry: {backoff: 20ms}}\n"
        "providers:\n"
        "  - id: openai\n    base_url: UPSTREAM\n"
        f"    prefill: {'true' if openai_prefill else 'false'}\n"
        f"    api_keys: {keys_yaml(env, 'openai', [('one', 'sk-one')])}\n"
        "  - id: anthropic\n    base_url: UPSTREAM\n"
        f"    api_keys: {keys_yaml(env, 'anthropic', [('one', 'sk-ant-one')])}\n" + extra
    )


@pytest.fixture
async def sc(env: Env, sidecars: list[Sidecar], token: str) -> Sidecar:
    return await boot(env, sidecars, config(env))  # after `token`: its access key is in the vault


def models(primary: str, fallback: str = FALLBACK) -> dict[str, Any]:
    return {"models": [primary, fallback]}


async def sent_models(http: aiohttp.ClientSession, mock: TestServer) -> list[str]:
    return [r["body"]["model"] for r in await mock_log(http, mock)]


async def chat(sc: Sidecar, token: str, primary: str) -> tuple[str, dict[str, str]]:
    async with sc.openai(token) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model=primary, messages=MSG, extra_body=models(primary)
        )
        return raw.parse().choices[0].message.content or "", dict(raw.headers)


async def stream(sc: Sidecar, token: str, primary: str) -> tuple[str, dict[str, str]]:
    async with sc.openai(token) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model=primary, messages=MSG, stream=True, extra_body=models(primary)
        )
        pieces = [c.choices[0].delta.content or "" async for c in raw.parse() if c.choices]
        return "".join(pieces), dict(raw.headers)


async def claude_stream(sc: Sidecar, token: str, primary: str) -> anthropic.types.Message:
    """A streamed Anthropic request with the catalog's Claude model as its fallback."""
    async with sc.anthropic(token) as client, client.messages.stream(
        model=primary, max_tokens=64, messages=MSG,
        extra_body={"models": [primary, CLAUDE_MODEL]},
    ) as s:  # fmt: skip
        return await s.get_final_message()


def prefills(log: list[dict[str, Any]]) -> list[str | None]:
    """The assistant prefill each upstream request carried (None: none)."""
    out: list[str | None] = []
    for r in log:
        last = r["body"]["messages"][-1]
        out.append(last["content"] if last["role"] == "assistant" else None)
    return out


# -- before the first byte ---------------------------------------------------------------


async def test_429_with_a_short_retry_after_is_waited_out_then_the_model_cools(
    sc: Sidecar, token: str, http: aiohttp.ClientSession, mock_server: TestServer
) -> None:
    primary = "gpt-4o-mini-fail-429-retry-1"
    text, headers = await chat(sc, token, primary)
    assert text == REPLY
    assert (headers["x-sidecar-model"], headers["x-sidecar-attempts"]) == (FALLBACK, "3")
    # Waited out once on the same key and model, then the pair cooled: the fallback answered.
    assert await sent_models(http, mock_server) == [primary, primary, FALLBACK]


async def test_429_without_retry_after_cools_only_that_model(
    sc: Sidecar, token: str, http: aiohttp.ClientSession, mock_server: TestServer
) -> None:
    primary = "gpt-4o-mini-fail-429-retry-none"
    for _ in range(3):
        text, headers = await chat(sc, token, primary)
        assert text == REPLY
        assert headers["x-sidecar-model"] == FALLBACK
    # The rate-limited model cooled on that key; the same key kept serving the fallback.
    assert await sent_models(http, mock_server) == [primary, FALLBACK, FALLBACK, FALLBACK]
    m = await metrics_text(http, sc)
    assert metric_value(m, "sidecar_no_key_available_total", provider="openai",
                        reason="all_cooling") == 0  # fmt: skip


async def test_a_500_once_is_retried_on_the_same_candidate(
    sc: Sidecar, token: str, http: aiohttp.ClientSession, mock_server: TestServer
) -> None:
    primary = "gpt-4o-mini-flaky-1"
    text, headers = await chat(sc, token, primary)
    assert text == REPLY
    assert (headers["x-sidecar-model"], headers["x-sidecar-attempts"]) == (primary, "2")
    assert await sent_models(http, mock_server) == [primary, primary]


@pytest.mark.parametrize("fault", ["fail-503", "drop"])
async def test_a_persistent_503_or_a_reset_is_retried_once_then_falls_back(
    sc: Sidecar, token: str, http: aiohttp.ClientSession, mock_server: TestServer, fault: str
) -> None:
    primary = f"gpt-4o-mini-{fault}"
    text, headers = await chat(sc, token, primary)
    assert text == REPLY
    assert (headers["x-sidecar-model"], headers["x-sidecar-attempts"]) == (FALLBACK, "3")
    assert await sent_models(http, mock_server) == [primary, primary, FALLBACK]


@pytest.mark.parametrize("fault", ["silent", "first-3000", "early-error"])
async def test_a_stream_that_stays_silent_or_errors_before_its_first_token_fails_over(
    sc: Sidecar, token: str, http: aiohttp.ClientSession, mock_server: TestServer, fault: str
) -> None:
    primary = f"gpt-4o-mini-{fault}"
    text, headers = await stream(sc, token, primary)
    assert text == REPLY
    # The headers waited for the first token: they name the model that sent it.
    assert headers["x-sidecar-model"] == FALLBACK
    sent = await sent_models(http, mock_server)
    assert sent[-1] == FALLBACK
    # A timeout is not retried on the same candidate; an in-band 5xx-like error is.
    assert sent.count(primary) == (2 if fault == "early-error" else 1)


async def test_a_context_length_error_moves_to_the_next_model_without_cooling_the_key(
    sc: Sidecar, token: str, http: aiohttp.ClientSession, mock_server: TestServer
) -> None:
    primary = "gpt-4o-mini-fail-context"
    text, headers = await chat(sc, token, primary)
    assert text == REPLY
    assert headers["x-sidecar-model"] == FALLBACK
    assert await sent_models(http, mock_server) == [primary, FALLBACK]
    async with http.get(sc.admin_url + "/keys") as resp:
        keys = (await resp.json())["keys"]
    assert {k["state"] for k in keys} == {"ok"}


async def test_a_content_filter_rejection_goes_straight_back(
    sc: Sidecar, token: str, http: aiohttp.ClientSession, mock_server: TestServer
) -> None:
    primary = "gpt-4o-mini-fail-filter"
    with pytest.raises(openai.BadRequestError) as info:
        await chat(sc, token, primary)
    assert info.value.code == "content_filter"
    assert await sent_models(http, mock_server) == [primary]  # no retry, no other model


async def test_a_flapping_primary_answers_every_request(
    sc: Sidecar, token: str, http: aiohttp.ClientSession, mock_server: TestServer
) -> None:
    primary = "gpt-4o-mini-flap"
    for _ in range(4):
        text, headers = await chat(sc, token, primary)
        assert text == REPLY
        assert (headers["x-sidecar-model"], headers["x-sidecar-attempts"]) == (primary, "2")
    assert await sent_models(http, mock_server) == [primary] * 8
    async with http.get(sc.admin_url + "/keys") as resp:
        assert {k["state"] for k in (await resp.json())["keys"]} == {"ok"}  # never cooled


# -- after the first byte ------------------------------------------------------------------


async def test_a_complete_stream_missing_its_terminator_gets_one(
    sc: Sidecar, token: str, http: aiohttp.ClientSession, mock_server: TestServer
) -> None:
    primary = "gpt-4o-mini-nodone"
    text, headers = await stream(sc, token, primary)
    assert text == REPLY
    assert headers["x-sidecar-attempts"] == "1"
    async with http.post(sc.url + "/v1/chat/completions",
                         json={"model": primary, "messages": MSG, "stream": True},
                         headers={"Authorization": f"Bearer {token}"}) as resp:  # fmt: skip
        body = await resp.read()
    assert body.endswith(b"data: [DONE]\n\n")
    assert await sent_models(http, mock_server) == [primary, primary]


@pytest.mark.parametrize("fault", ["break", "stuck", "garble", "late-error"])
async def test_a_stream_broken_after_its_first_token_is_resumed_from_a_prefill(
    sc: Sidecar, token: str, http: aiohttp.ClientSession, mock_server: TestServer, fault: str
) -> None:
    primary = f"gpt-4o-mini-{fault}"
    text, headers = await stream(sc, token, primary)
    assert text == REPLY  # whole, nothing repeated, nothing lost, no garbage
    assert headers["x-sidecar-model"] == primary  # sent before the break
    log = await mock_log(http, mock_server)
    assert log[0]["body"]["model"] == primary
    assert log[-1]["body"]["model"] == FALLBACK
    got = prefills(log)
    assert got[0] is None
    assert all(p is not None and REPLY.startswith(p) for p in got[1:])  # what was relayed
    m = await metrics_text(http, sc)
    assert metric_value(m, "sidecar_stream_resumptions_total", provider="openai", result="ok") >= 1
    cause = {"break": "upstream_closed", "stuck": "idle_timeout", "garble": "malformed",
             "late-error": "inband_error"}[fault]  # fmt: skip
    assert metric_value(m, "sidecar_stream_interruptions_total", provider="openai",
                        cause=cause) >= 1  # fmt: skip


async def test_anthropic_streams_resume_natively_and_stay_well_formed(
    env: Env, sidecars: list[Sidecar], token: str, http: aiohttp.ClientSession,
    mock_server: TestServer,
) -> None:  # fmt: skip
    # Anthropic models take a prefill without any config; the continuation's blocks keep
    # the original's indices, so the SDK assembles one text block.
    sc = await boot(env, sidecars, config(env, openai_prefill=False))
    primary = f"{CLAUDE_MODEL}-break"
    message = await claude_stream(sc, token, primary)
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == REPLY  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    log = await mock_log(http, mock_server)
    assert prefills(log)[-1] is not None
    assert log[-1]["body"]["model"] == CLAUDE_MODEL


async def test_a_fallback_that_rejects_prefill_ends_with_the_real_error(
    sc: Sidecar, token: str, http: aiohttp.ClientSession, mock_server: TestServer
) -> None:
    primary, fallback = "gpt-4o-mini-break", "gpt-4o-mini-noprefill"
    async with sc.openai(token) as client:
        s = await client.chat.completions.create(
            model=primary, messages=MSG, stream=True, extra_body=models(primary, fallback)
        )
        got: list[str] = []

        async def consume() -> None:
            async for chunk in s:
                got.append(chunk.choices[0].delta.content or "" if chunk.choices else "")

        with pytest.raises(openai.APIError) as info:
            await consume()
    message = str(info.value)
    assert "upstream_closed" in message  # the break itself...
    assert "prefill" not in message  # ...not the fallback's refusal of the prefill
    assert REPLY.startswith("".join(got))
    assert "".join(got) != REPLY
    assert (await sent_models(http, mock_server))[-1] == fallback
    m = await metrics_text(http, sc)
    assert metric_value(m, "sidecar_stream_resumptions_total", provider="openai",
                        result="failed") == 1  # fmt: skip


async def test_without_a_prefill_model_a_break_is_an_error_the_sdk_raises(
    env: Env, sidecars: list[Sidecar], token: str, http: aiohttp.ClientSession,
    mock_server: TestServer,
) -> None:  # fmt: skip
    sc = await boot(env, sidecars, config(env, openai_prefill=False))
    with pytest.raises(openai.APIError, match="upstream_closed"):
        await stream(sc, token, "gpt-4o-mini-break")
    # No candidate could continue: nothing more was sent upstream.
    assert await sent_models(http, mock_server) == ["gpt-4o-mini-break"]


async def test_a_resumed_stream_meters_every_attempt(
    env: Env, sidecars: list[Sidecar], token: str, http: aiohttp.ClientSession,
    mock_server: TestServer,
) -> None:  # fmt: skip
    sc = await boot(env, sidecars, config(env, openai_prefill=False))
    primary = f"{CLAUDE_MODEL}-stuck"
    message = await claude_stream(sc, token, primary)
    assert message.content[0].text == REPLY  # type: ignore[union-attr]
    await sc.stop()
    sidecars.remove(sc)
    line = [r for r in env.access.records() if r["path"] == "/v1/messages"][-1]
    assert line["resumed"] is True
    assert line["attempts"] == 2
    # The stuck attempt: 4 prompt words, its 2 relayed events estimated as output; the
    # continuation: the prompt plus the prefill as input, its own words as output.
    continuation = orjson.loads(orjson.dumps((await mock_log(http, mock_server))[-1]["body"]))
    assert continuation["messages"][-1] == {"role": "assistant", "content": "Hello from"}
    assert line["input_tokens"] == 4 + 6
    assert line["output_tokens"] >= 2 + 3


async def test_the_anthropic_sdk_raises_the_inband_error_too(
    env: Env, sidecars: list[Sidecar], token: str
) -> None:
    sc = await boot(env, sidecars, config(env, extra="", openai_prefill=False))
    primary = f"{CLAUDE_MODEL}-break-noprefill"
    async with sc.anthropic(token) as client:
        with pytest.raises(anthropic.APIStatusError, match="upstream_closed"):
            async with client.messages.stream(model=primary, max_tokens=64, messages=MSG) as s:
                await s.get_final_message()


async def test_a_continuation_that_fails_before_its_first_token_is_not_spliced(
    sc: Sidecar, token: str, http: aiohttp.ClientSession, mock_server: TestServer
) -> None:
    # The continuation gets the same first-token hold: its in-band error is a failed attempt,
    # not a resumed stream that breaks again.
    primary, fallback = "gpt-4o-mini-break", "gpt-4o-mini-early-error"

    async def consume() -> None:
        async with sc.openai(token) as client:
            s = await client.chat.completions.create(
                model=primary, messages=MSG, stream=True, extra_body=models(primary, fallback)
            )
            async for _ in s:
                pass

    with pytest.raises(openai.APIError, match="upstream_closed"):
        await consume()
    # The primary itself continued once (then broke again); the fallback's two attempts
    # failed before any content, so they resumed nothing.
    assert await sent_models(http, mock_server) == [primary, primary, fallback, fallback]
    m = await metrics_text(http, sc)
    assert metric_value(m, "sidecar_stream_resumptions_total", provider="openai", result="ok") == 1
    assert metric_value(m, "sidecar_stream_resumptions_total", provider="openai",
                        result="failed") == 1  # fmt: skip
    assert metric_value(m, "sidecar_stream_interruptions_total", provider="openai") == 2


async def test_an_inband_error_before_the_first_token_follows_the_http_rules(
    env: Env, sidecars: list[Sidecar], token: str, aiohttp_server: Any
) -> None:
    # An in-band error that stands for a 4xx is not a reason to try every key: a plain
    # client error goes back as that status, a model-level one moves to the next model.
    from aiohttp import web

    seen: list[str] = []
    errors = {
        "bad": {"message": "temperature must be at most 2", "type": "invalid_request_error",
                "code": "invalid_value", "param": "temperature"},
        "small": {"message": "maximum context length exceeded", "type": "invalid_request_error",
                  "code": "context_length_exceeded", "param": None},
    }  # fmt: skip

    async def chat(request: web.Request) -> web.StreamResponse:
        model = (await request.json())["model"]
        seen.append(model)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        if model in errors:
            await resp.write(b"data: " + orjson.dumps({"error": errors[model]}) + b"\n\n")
        else:
            delta = {
                "choices": [{"index": 0, "delta": {"content": "fine"}, "finish_reason": "stop"}]
            }
            await resp.write(b"data: " + orjson.dumps(delta) + b"\n\ndata: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    upstream = await aiohttp_server(app)
    sc = await boot(env, sidecars, (
        "providers:\n  - id: custom\n    format: openai\n"
        f"    base_url: http://127.0.0.1:{upstream.port}/v1\n    models: [bad, small, big]\n"
        f"    api_keys: {keys_yaml(env, 'custom', [('a', 'sk-a'), ('b', 'sk-b')])}\n"
    ))  # fmt: skip
    async with sc.openai(token) as client:
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(
                model="bad", messages=MSG, stream=True, extra_body={"models": ["bad", "big"]}
            )
        assert info.value.code == "invalid_value"
        assert seen == ["bad"]  # not the other key, not the other model
        seen.clear()
        s = await client.chat.completions.create(
            model="small", messages=MSG, stream=True, extra_body={"models": ["small", "big"]}
        )
        assert "".join([c.choices[0].delta.content or "" async for c in s if c.choices]) == "fine"
        assert seen == ["small", "big"]  # the next model, without the other key of this one


async def test_a_stream_that_broke_before_any_text_is_sent_again_whole(
    env: Env, sidecars: list[Sidecar], token: str, aiohttp_server: Any
) -> None:
    # Only whitespace had reached the caller: no prefill is needed, so any candidate may
    # answer the original request, spliced into the same stream.
    from aiohttp import web

    seen: list[str] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        model = (await request.json())["model"]
        seen.append(model)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
        await resp.write(b"data: " + orjson.dumps(role) + b"\n\n")
        if model == "cut":
            space = {"choices": [{"index": 0, "delta": {"content": " "}, "finish_reason": None}]}
            await resp.write(b"data: " + orjson.dumps(space) + b"\n\n")
            assert request.transport is not None
            request.transport.close()
            return resp
        done = {"choices": [{"index": 0, "delta": {"content": "fine"}, "finish_reason": "stop"}]}
        await resp.write(b"data: " + orjson.dumps(done) + b"\n\ndata: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    upstream = await aiohttp_server(app)
    sc = await boot(env, sidecars, (
        "providers:\n  - id: custom\n    format: openai\n"
        f"    base_url: http://127.0.0.1:{upstream.port}/v1\n    models: [cut, ok]\n"
        f"    api_keys: {keys_yaml(env, 'custom', [('a', 'sk-a')])}\n"
    ))  # fmt: skip
    async with sc.openai(token) as client:
        s = await client.chat.completions.create(
            model="cut", messages=MSG, stream=True, extra_body={"models": ["cut", "ok"]}
        )
        text = "".join([c.choices[0].delta.content or "" async for c in s if c.choices])
    assert text == " fine"
    assert seen[0] == "cut"
    assert seen[-1] == "ok"
