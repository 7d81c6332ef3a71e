"""The request path under attack and fault (issue #10): nothing a caller sends can exhaust
the sidecar, charge for a broken answer, or carry a credential where it does not belong.

Compressed request bodies, control characters in `model`, odd `x-request-id`s,
unbounded upstream answers (a huge JSON body, a gzip bomb), `timeouts.total`
across attempts, provider-key fragments in relayed 401/403 bodies, valid JSON
orjson refuses, the `models` cap, access keys in query strings and headers,
locally answered roots, the access and operational logs, and a trickled body.
A real sidecar and the real mock upstream on loopback; the memory bounds are
read from a sidecar in its own process (`/proc/<pid>/status`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import re
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from sidecar.mock_provider import gzip_padded
from sidecar.vault import edit_vault
from tests.harness import (
    Env,
    Process,
    RawResponse,
    Sidecar,
    make_env,
    metric_value,
    raw_request,
    reset_peak_rss,
    rss_kib,
    spawn_mock,
    spawn_sidecar,
)
from tests.test_proxy_e2e import (
    OPENAI_MODEL,
    REPLY,
    boot,
    chat,
    claude,
    keys_yaml,
    metrics_text,
    mock_log,
    providers_yaml,
    send,
)

MIB = 1 << 20
CHAT = "/v1/chat/completions"


async def _upstream_paths(http: aiohttp.ClientSession, mock: TestServer) -> list[str]:
    """What reached the mock, as sent (paths only: its records hold provider keys)."""
    return [str(r["raw_path"]) for r in await mock_log(http, mock)]


def _code(body: bytes) -> str:
    return str(orjson.loads(body)["error"]["code"])


async def _policy_sidecar(env: Env, sidecars: list[Sidecar], extra: str = "") -> Sidecar:
    return await boot(env, sidecars, extra + providers_yaml(
        env, openai=[("k1", "sk-openai-1")], anthropic=[("a1", "sk-ant-1")]))  # fmt: skip


# --------------------------------------------------------------------------- compressed request bodies


@pytest.mark.parametrize(
    ("encoding", "pack"), [("gzip", gzip.compress), ("deflate", zlib.compress)]
)
async def test_compressed_bodies_are_decoded_and_forwarded_plain(
    env: Env, sidecars: list[Sidecar], mock_server: TestServer, http: aiohttp.ClientSession,
    token: str, encoding: str, pack: Any,
) -> None:  # fmt: skip
    sc = await _policy_sidecar(env, sidecars)
    for path in (CHAT, "/openai/chat/completions"):
        status, _, body = await send(http, sc.url + path, token=token, data=pack(orjson.dumps(chat())),
                                     headers={"content-encoding": encoding,
                                              "content-type": "application/json"})  # fmt: skip
        assert status == 200, body
    log = await mock_log(http, mock_server)
    assert len(log) == 2
    for rec in log:
        assert rec["body"] == chat()
        assert "content-encoding" not in set(rec["headers"])  # names only: values hold keys


async def test_the_body_limit_applies_to_decoded_bytes(
    env: Env, sidecars: list[Sidecar], mock_server: TestServer, http: aiohttp.ClientSession,
    token: str,
) -> None:  # fmt: skip
    sc = await _policy_sidecar(env, sidecars, "limits: {max_body_bytes: 4096}\n")
    inflating = orjson.dumps(chat(metadata={"pad": " " * 200_000}))
    for encoding, pack in (("gzip", gzip.compress), ("deflate", zlib.compress)):
        packed = pack(inflating)
        assert len(packed) < 4096
        status, _, body = await send(http, sc.url + CHAT, token=token, data=packed,
                                     headers={"content-encoding": encoding,
                                              "content-type": "application/json"})  # fmt: skip
        assert status == 413, body
        assert _code(body) == "request_too_large"
    assert await _upstream_paths(http, mock_server) == []


@pytest.mark.parametrize("encoding", ["br", "zstd", "compress", "x-unknown", "gzip, br"])
async def test_other_content_encodings_are_refused_with_415(
    env: Env, sidecars: list[Sidecar], mock_server: TestServer, http: aiohttp.ClientSession,
    token: str, encoding: str,
) -> None:  # fmt: skip
    sc = await _policy_sidecar(env, sidecars)
    for path in (CHAT, "/openai/chat/completions"):
        status, _, body = await send(http, sc.url + path, token=token, data=b"\x28\xb5\x2f\xfd-opaque",
                                     headers={"content-encoding": encoding,
                                              "content-type": "application/json"})  # fmt: skip
        assert status == 415, (path, status, body)
        assert _code(body) == "unsupported_media"
    assert await _upstream_paths(http, mock_server) == []


async def test_a_body_that_is_not_what_its_encoding_says_is_400(
    env: Env, sidecars: list[Sidecar], mock_server: TestServer, http: aiohttp.ClientSession,
    token: str,
) -> None:  # fmt: skip
    sc = await _policy_sidecar(env, sidecars)
    good = orjson.dumps(chat())
    cases = [
        ("gzip", b"this is not gzip at all"),
        ("gzip", gzip.compress(good)[:-12]),  # truncated
        ("gzip", good),  # plain JSON labelled gzip
        ("deflate", b"\x00\x01\x02 not deflate"),
    ]
    for encoding, data in cases:
        status, _, body = await send(http, sc.url + CHAT, token=token, data=data,
                                     headers={"content-encoding": encoding,
                                              "content-type": "application/json"})  # fmt: skip
        assert status == 400, (encoding, status, body)
        assert _code(body) == "invalid_request"
    assert await _upstream_paths(http, mock_server) == []


# --------------------------------------------------------------------------- caller-chosen strings


MANAGED = "sk-managed-openai-hardening"


async def _managed_sidecar(env: Env, sidecars: list[Sidecar]) -> Sidecar:
    ref = env.secret("managed", "openai-1", MANAGED)
    return await boot(env, sidecars,
        "providers:\n  - id: openai\n    base_url: UPSTREAM\n"
        f'managed:\n  openai: [{{id: pool-1, value: "{ref}"}}]\n'
        'ledger: {url: "sqlite:///ledger.db"}\n'
        f"prices:\n  {OPENAI_MODEL}: {{input: 1000000, output: 1000000}}\n")  # fmt: skip


@pytest.mark.parametrize("char", ["\r", "\n", "\r\n", "\x00", "\x7f", "\x01", "\x1b", "\x1f", "\t"],
                         ids=["CR", "LF", "CRLF", "NUL", "DEL", "SOH", "ESC", "US", "TAB"])  # fmt: skip
async def test_control_characters_in_a_model_are_refused_before_any_upstream_call(
    env: Env, sidecars: list[Sidecar], mock_server: TestServer, http: aiohttp.ClientSession,
    char: str,
) -> None:  # fmt: skip
    token = env.access_key("buyer", credits=100.0)
    sc = await _managed_sidecar(env, sidecars)
    bad = f"{OPENAI_MODEL}{char}x-injected: 1"
    for path, doc in (
        (CHAT, chat(bad)),
        ("/openai/chat/completions", chat(bad)),
        (CHAT, {"models": [bad, OPENAI_MODEL], "messages": chat()["messages"]}),
    ):
        status, _, body = await send(http, sc.url + path, token=token, json=doc)
        assert status == 400, (path, status, body)
        assert _code(body) == "invalid_request"
    assert await _upstream_paths(http, mock_server) == []
    text = await metrics_text(http, sc)
    assert metric_value(text, "sidecar_credits_spent_usd_total", access_key="buyer") == 0
    # the same access key is charged for a clean request: the zero above is not vacuous
    status, _, body = await send(http, sc.url + CHAT, token=token, json=chat())
    assert status == 200, body
    text = await metrics_text(http, sc)
    assert metric_value(text, "sidecar_credits_spent_usd_total", access_key="buyer") > 0


_PRINTABLE = re.compile(r"[\x21-\x7e]{1,128}")


@pytest.mark.parametrize("raw_id", [b"\xff\xfe", b"caf\xc3\xa9-\xe2\x98\x83", b"a" * 300],
                         ids=["non-utf8", "non-ascii", "too-long"])  # fmt: skip
async def test_an_odd_request_id_is_replaced_and_the_request_succeeds(
    env: Env, sidecars: list[Sidecar], token: str, raw_id: bytes
) -> None:
    sc = await _policy_sidecar(env, sidecars)
    head = (f"POST {CHAT} HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {token}\r\n"
            "content-type: application/json\r\n").encode() + b"x-request-id: " + raw_id + b"\r\n"  # fmt: skip
    resp = await raw_request(sc.running.proxy_port, head, orjson.dumps(chat()))
    assert resp.status == 200, resp.body
    assert orjson.loads(resp.body)["choices"][0]["message"]["content"] == REPLY
    rid = resp.headers["x-sidecar-request-id"]
    assert _PRINTABLE.fullmatch(rid), rid  # printable ASCII, at most 128 characters
    assert rid.encode("latin-1") != raw_id


# --------------------------------------------------------------------------- unbounded upstream answers


@dataclass
class Real:
    """A sidecar and the mock, each in its own process, for memory bounds."""

    sidecar: Process
    mock_port: int
    token: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sidecar.proxy_port}"

    @property
    def pid(self) -> int:
        return self.sidecar.proc.pid


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Real]:
    directory = tmp_path_factory.mktemp("real")
    mock, port = spawn_mock(directory)
    try:
        env = make_env(directory, f"http://127.0.0.1:{port}/v1")
        token = env.access_key("app")
        env.write_config("limits: {max_body_bytes: 4194304}\n"
                         + providers_yaml(env, openai=[("k1", "sk-real-1")]))  # fmt: skip
        p = spawn_sidecar(env.config, directory / "out.log")
        try:
            yield Real(p, port, token)
        finally:
            p.stop()
    finally:
        mock.terminate()
        mock.wait(10)


class PeakRss:
    """A process's peak resident memory (MB) over a block: its `VmHWM` reset at the start
    where the kernel allows, and `VmRSS` sampled every 10 ms either way."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.sampled = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            with contextlib.suppress(OSError, LookupError):
                self.sampled = max(self.sampled, rss_kib(self.pid))

    def __enter__(self) -> PeakRss:
        self.hwm = reset_peak_rss(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mb(self) -> float:
        peak = max(self.sampled, rss_kib(self.pid, "VmHWM") if self.hwm else 0)
        return peak / 1024


async def test_a_gzip_bomb_request_is_refused_without_inflating_it(real: Real) -> None:
    bomb = b"".join(gzip_padded(1024, orjson.dumps(chat())))  # ~1 MiB decoding to 1 GiB of spaces
    assert len(bomb) < 1_100_000
    head = (f"POST {CHAT} HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {real.token}\r\n"
            "content-type: application/json\r\ncontent-encoding: gzip\r\n").encode()  # fmt: skip
    with PeakRss(real.pid) as rss:
        resp = await raw_request(real.sidecar.proxy_port, head, bomb, within=30)
    assert rss.mb < 200  # first: what the bomb did to the sidecar
    assert resp.status == 413, resp.body[:300]
    assert _code(resp.body) == "request_too_large"


async def _count_body(resp: aiohttp.ClientResponse) -> tuple[int, bytes]:
    """Decoded size and last bytes of a body read and discarded in chunks (never held whole)."""
    inflater = (zlib.decompressobj(31) if resp.headers.get("content-encoding") == "gzip"
                else None)  # fmt: skip
    size, tail = 0, b""

    def take(piece: bytes) -> None:
        nonlocal size, tail
        size += len(piece)
        tail = (tail + piece)[-4096:]

    async for chunk in resp.content.iter_chunked(1 << 20):
        if inflater is None:
            take(chunk)
            continue
        data = chunk
        while data:
            take(inflater.decompress(data, 1 << 20))
            data = inflater.unconsumed_tail
    return size, tail


async def _post_real(real: Real, model: str) -> tuple[int, str | None, int, bytes]:
    async with aiohttp.ClientSession(auto_decompress=False) as http, http.post(
        real.url + CHAT, json=chat(model), headers={"authorization": f"Bearer {real.token}"},
        timeout=aiohttp.ClientTimeout(total=60),
    ) as resp:  # fmt: skip
        size, tail = await _count_body(resp)
        return resp.status, resp.headers.get("content-type"), size, tail


async def test_a_huge_json_answer_streams_through_in_bounded_memory(real: Real) -> None:
    with PeakRss(real.pid) as rss:
        status, _, size, tail = await _post_real(real, f"{OPENAI_MODEL}-huge-192")
    assert status == 200
    assert size > 192 * MIB
    doc = orjson.loads(tail.lstrip())
    assert doc["choices"][0]["message"]["content"] == REPLY
    assert rss.mb < 250


async def test_a_gzip_bomb_answer_is_never_inflated_whole(real: Real) -> None:
    with PeakRss(real.pid) as rss:
        status, ctype, size, tail = await _post_real(real, f"{OPENAI_MODEL}-bomb-192")
    if status == 200:  # streamed through, complete
        assert size > 192 * MIB
        assert orjson.loads(tail.lstrip())["choices"][0]["message"]["content"] == REPLY
    else:  # or refused cleanly, in the route's error shape
        assert status >= 400
        assert "json" in (ctype or "")
        assert orjson.loads(tail)["error"]["code"]
    assert rss.mb < 250


# --------------------------------------------------------------------------- timeouts.total


async def test_timeouts_total_bounds_every_attempt_body_included(
    env: Env, sidecars: list[Sidecar], http: aiohttp.ClientSession, token: str
) -> None:
    # both keys answer their headers at once, then hold the body for 6 s
    keys = keys_yaml(env, "openai", [("k1", "sk-one-hold-6000"), ("k2", "sk-two-hold-6000")])
    sc = await boot(env, sidecars, "timeouts: {per_request: 1.5s, total: 2s}\n"
                    f"providers:\n  - id: openai\n    base_url: UPSTREAM\n    api_keys: {keys}\n")  # fmt: skip
    start = time.monotonic()
    status, _, body = await send(http, sc.url + CHAT, token=token, json=chat())
    elapsed = time.monotonic() - start
    assert elapsed < 2 + 1.5, elapsed
    assert status in (502, 504), (status, body)
    if status == 504:
        assert _code(body) == "gateway_timeout"


# --------------------------------------------------------------------------- relayed auth errors


@pytest.mark.parametrize("fmt", ["openai", "anthropic"])
async def test_relayed_auth_errors_do_not_show_key_fragments(
    env: Env, sidecars: list[Sidecar], http: aiohttp.ClientSession, token: str, fmt: str
) -> None:
    if fmt == "openai":
        keys = [("k1", "sk-proj-leaky-fail-401-ab12"), ("k2", "sk-proj-leaky-fail-403-cd34")]
        sc = await boot(env, sidecars, providers_yaml(env, openai=keys))
        path, doc, kind = CHAT, chat(), "invalid_request_error"
    else:
        keys = [
            ("a1", "sk-ant-api03-leaky-fail-401-ef56"),
            ("a2", "sk-ant-api03-leaky-fail-401-gh78"),
        ]
        sc = await boot(env, sidecars, providers_yaml(env, anthropic=keys))
        path, doc, kind = "/v1/messages", claude(), "authentication_error"
    status, headers, body = await send(http, sc.url + path, token=token, json=doc,
                                       anthropic=fmt == "anthropic")  # fmt: skip
    assert status in (401, 403)
    assert headers["x-sidecar-attempts"] == "2"  # every key failed; the last answer is relayed
    text = body.decode()  # never printed: it may hold what must not be there
    prefix = "sk-proj-" in text or "sk-ant-" in text
    assert not prefix, "a key prefix is relayed"
    fragment = re.search(r"\bsk-", text) is not None
    assert not fragment, "a key-shaped fragment is relayed"
    suffix = any(key[-4:] in text for _, key in keys)
    assert not suffix, "a key's suffix is relayed"
    err = orjson.loads(body)["error"]
    assert err["type"] == kind
    if fmt == "openai":
        assert err["code"] == "invalid_api_key"


# --------------------------------------------------------------------------- valid JSON, the models cap


ODD_JSON = (b'{"seed": 123456789012345678901234567890, "messages": '
            b'[{"role": "user", "content": "lone \\ud800 surrogate"}], MODEL}')  # fmt: skip


async def _mock_bodies(http: aiohttp.ClientSession, mock: TestServer) -> list[Any]:
    """What the mock received, parsed with the standard json module (it keeps big ints)."""
    async with http.get(mock.make_url("/_mock/requests")) as resp:
        return [r["body"] for r in json.loads(await resp.read())["requests"]]


async def test_valid_json_orjson_refuses_is_forwarded_intact(
    env: Env, sidecars: list[Sidecar], mock_server: TestServer, http: aiohttp.ClientSession,
    token: str,
) -> None:  # fmt: skip
    sc = await _policy_sidecar(env, sidecars)
    untouched = ODD_JSON.replace(b"MODEL", f'"model": "{OPENAI_MODEL}"'.encode())
    rewritten = ODD_JSON.replace(b"MODEL", f'"models": ["{OPENAI_MODEL}"]'.encode())
    for raw in (untouched, rewritten):
        status, _, body = await send(http, sc.url + CHAT, token=token, data=raw,
                                     headers={"content-type": "application/json"})  # fmt: skip
        assert status == 200, body
    sent, swapped = await _mock_bodies(http, mock_server)
    assert sent == json.loads(untouched)
    expected = json.loads(rewritten)
    del expected["models"]
    assert swapped == {**expected, "model": OPENAI_MODEL}
    assert swapped["seed"] == 123456789012345678901234567890
    assert swapped["messages"][0]["content"] == "lone \ud800 surrogate"


async def test_a_models_list_over_64_entries_is_refused(
    env: Env, sidecars: list[Sidecar], mock_server: TestServer, http: aiohttp.ClientSession,
    token: str,
) -> None:  # fmt: skip
    sc = await _policy_sidecar(env, sidecars)
    doc = {
        "models": [f"{OPENAI_MODEL}-v{i}" for i in range(10_000)],
        "messages": chat()["messages"],
    }
    status, _, body = await send(http, sc.url + CHAT, token=token, json=doc)
    assert status == 400, body[:300]
    assert _code(body) == "invalid_request"
    assert await _upstream_paths(http, mock_server) == []


async def test_the_rejected_models_header_is_bounded_and_parseable(
    env: Env, sidecars: list[Sidecar], http: aiohttp.ClientSession
) -> None:
    scoped = env.access_key("scoped", models=[OPENAI_MODEL])
    sc = await _policy_sidecar(env, sidecars)
    outside = [f"gpt-4o-mini-out-of-scope-variant-number-{i:04d}" for i in range(59)]  # ~2.6 KB
    doc = {"models": [*outside, OPENAI_MODEL], "messages": chat()["messages"]}
    status, headers, body = await send(http, sc.url + CHAT, token=scoped, json=doc)
    assert status == 200, body
    assert headers["x-sidecar-model"] == OPENAI_MODEL
    value = headers["x-sidecar-rejected-models"]
    assert len(value.encode()) <= 2048
    assert value.endswith(",..."), value[-80:]  # 59 names do not fit: truncated, and says so
    names = value.removesuffix(",...").split(",")
    assert names == outside[: len(names)]
    assert len(names) > 10


# --------------------------------------------------------------------------- credentials in odd places


async def test_access_keys_in_query_strings_or_other_headers_never_reach_upstream(
    env: Env, sidecars: list[Sidecar], mock_server: TestServer, http: aiohttp.ClientSession,
    token: str,
) -> None:  # fmt: skip
    sc = await _policy_sidecar(env, sidecars)
    for path in (CHAT, "/openai/chat/completions"):
        for param in ("key", "api_key"):
            status, _, body = await send(
                http, f"{sc.url}{path}?{param}={token}&keep=1", token=token, json=chat(),
                headers={"x-goog-api-key": token, "api-key": token},
            )  # fmt: skip
            assert status == 200, body
    log = await mock_log(http, mock_server)
    assert len(log) == 4
    for rec in log:
        leaked = token in json.dumps(rec)  # path, raw path, query, headers, body
        assert not leaked, "the access key reached the upstream"
        assert rec["query"].get("keep") == "1"


async def test_revoked_and_unknown_access_keys_get_the_same_401_body(
    env: Env, sidecars: list[Sidecar], http: aiohttp.ClientSession
) -> None:
    gone = env.access_key("gone")
    with edit_vault(env.vault) as vault:
        vault.access_keys["gone"].revoked = True
    sc = await _policy_sidecar(env, sidecars)
    for path, anthropic, doc in ((CHAT, False, chat()), ("/v1/messages", True, claude())):
        answers = []
        for key in (gone, "sk-not-an-access-key-at-all"):
            status, _, body = await send(
                http, sc.url + path, token=key, json=doc, anthropic=anthropic
            )
            assert status == 401
            answers.append(body)
        assert answers[0] == answers[1]


# --------------------------------------------------------------------------- roots answered locally


async def test_roots_are_answered_locally_and_not_counted_or_logged(
    env: Env, sidecars: list[Sidecar], mock_server: TestServer, http: aiohttp.ClientSession,
    token: str,
) -> None:  # fmt: skip
    sc = await _policy_sidecar(env, sidecars)
    for method in ("HEAD", "GET"):
        for path in ("/", "/openai", "/anthropic"):
            async with http.request(method, sc.url + path) as resp:
                assert resp.status == 200, (method, path)
                await resp.read()
    text = await metrics_text(http, sc)
    assert metric_value(text, "sidecar_requests_total") == 0
    assert await _upstream_paths(http, mock_server) == []
    status, _, _ = await send(http, sc.url + CHAT, token=token, json=chat())  # counted, logged
    assert status == 200
    assert metric_value(await metrics_text(http, sc), "sidecar_requests_total") == 1
    await sc.stop()
    sidecars.remove(sc)
    assert [r["path"] for r in env.access.records()] == [CHAT]


# --------------------------------------------------------------------------- access and operational logs


async def test_the_access_log_path_keeps_the_query_with_credentials_redacted(
    env: Env, sidecars: list[Sidecar], http: aiohttp.ClientSession, token: str
) -> None:
    sc = await _policy_sidecar(env, sidecars)
    secrets = {"key": "qs-secret-1", "api_key": "qs-secret-2", "access_key": "qs-secret-3",
               "token": "qs-secret-4"}  # fmt: skip
    query = "beta=true&" + "&".join(f"{k}={v}" for k, v in secrets.items())
    status, _, body = await send(http, f"{sc.url}/anthropic/v1/messages?{query}", token=token,
                                 json=claude(), anthropic=True)  # fmt: skip
    assert status == 200, body
    await sc.stop()
    sidecars.remove(sc)
    (line,) = env.access.records()
    assert line["path"].startswith("/anthropic/v1/messages?")
    assert "beta=true" in line["path"]
    for name, value in secrets.items():
        assert value not in line["path"]
        assert f"{name}=" in line["path"]  # the parameter is named, its value redacted


async def test_a_404_is_logged_with_its_access_key_and_format(
    env: Env, sidecars: list[Sidecar], http: aiohttp.ClientSession, token: str
) -> None:
    sc = await _policy_sidecar(env, sidecars)
    for path in ("/v1/nosuch", "/nosuch/v1/messages"):
        status, _, _ = await send(http, sc.url + path, token=token, json=claude(), anthropic=True)
        assert status == 404
        status, _, _ = await send(http, sc.url + path, token=token, json=chat())
        assert status == 404
    await sc.stop()
    sidecars.remove(sc)
    lines = env.access.records()
    assert [(r["status"], r["access_key"], r["format"]) for r in lines] == [
        (404, "app", "anthropic"), (404, "app", "openai")] * 2  # fmt: skip


async def test_a_per_attempt_timeout_writes_an_operational_log_line(
    env: Env, sidecars: list[Sidecar], http: aiohttp.ClientSession, token: str
) -> None:
    key = "sk-timeout-slow-2000"
    sc = await boot(env, sidecars, "timeouts: {per_request: 300ms, total: 5s}\n"
                    + providers_yaml(env, openai=[("k1", key)]))  # fmt: skip
    status, headers, _ = await send(http, sc.url + CHAT, token=token, json=chat())
    assert status in (502, 504)
    events = [r for r in env.oplog.records() if r.get("event") == "upstream_timeout"]
    assert len(events) == 1
    assert events[0]["request_id"] == headers["x-sidecar-request-id"]
    assert (events[0]["provider"], events[0]["key_id"]) == ("openai", "k1")
    assert key not in env.oplog.getvalue()


# --------------------------------------------------------------------------- a trickled body


async def _trickle(port: int, head: bytes, every: float, within: float) -> tuple[float, RawResponse | None]:  # fmt: skip
    """Send `head`, then one body byte every `every` s; return when the server answers or hangs up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.monotonic()

    async def drip() -> None:
        try:
            while True:
                writer.write(b" ")
                await writer.drain()
                await asyncio.sleep(every)
        except (ConnectionError, OSError):
            pass

    writer.write(head)
    dripping = asyncio.ensure_future(drip())
    try:
        async with asyncio.timeout(within):
            try:
                head_in = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return time.monotonic() - start, None  # closed without an answer
            elapsed = time.monotonic() - start
            status = int(head_in.split(b" ", 2)[1])
            rest = await reader.read(65536)
            body = rest[rest.find(b"{") :] if b"{" in rest else b""
            return elapsed, RawResponse(status, {}, body)
    finally:
        dripping.cancel()
        writer.close()


async def test_a_trickled_body_is_cut_by_timeouts_client_body(
    env: Env, sidecars: list[Sidecar], mock_server: TestServer, http: aiohttp.ClientSession,
    token: str,
) -> None:  # fmt: skip
    sc = await _policy_sidecar(env, sidecars, "timeouts: {client_body: 1s}\n")
    head = (f"POST {CHAT} HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {token}\r\n"
            "content-type: application/json\r\ncontent-length: 200\r\n\r\n").encode()  # fmt: skip
    elapsed, resp = await _trickle(sc.running.proxy_port, head, every=0.5, within=10)
    assert elapsed < 2.5, elapsed
    if resp is not None:
        assert resp.status == 408
        assert _code(resp.body) == "request_timeout"
    assert await _upstream_paths(http, mock_server) == []


# --------------------------------------------------------------------------- review findings


async def test_the_access_key_anywhere_in_the_query_is_neither_forwarded_nor_logged(
    env: Env, sidecars: list[Sidecar], mock_server: TestServer, http: aiohttp.ClientSession,
    token: str,
) -> None:  # fmt: skip
    sc = await _policy_sidecar(env, sidecars)
    queries = (f"access_token={token}", f"x-api-key={token}", f"auth={token}",
               f"q=Bearer%20{token}", f"{token}=1")  # fmt: skip
    for q in queries:
        status, _, body = await send(http, f"{sc.url}{CHAT}?{q}&keep=1", token=token, json=chat())
        assert status == 200, body
    for rec in await mock_log(http, mock_server):
        assert token not in json.dumps(rec), "the access key reached the upstream"
    await sc.stop()
    sidecars.remove(sc)
    paths = [r["path"] for r in env.access.records()]
    assert len(paths) == len(queries)
    assert all("keep=1" in p for p in paths)
    assert not any(token in p for p in paths), "the access key is in the access log"


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/nosuch", "/openai/v1/models"])
async def test_a_credential_that_is_not_ascii_is_401_not_a_crash(
    env: Env, sidecars: list[Sidecar], mock_server: TestServer, http: aiohttp.ClientSession,
    route: str,
) -> None:  # fmt: skip
    sc = await _policy_sidecar(env, sidecars)
    port = sc.running.proxy_port
    method = "POST" if route.startswith("/v1/") else "GET"
    for header in (b"authorization: Bearer abc\xff\xfedef", b"x-api-key: k\xc3\xa9y"):
        head = (
            f"{method} {route} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n".encode() + header + b"\r\n"
        )
        resp = await raw_request(port, head, orjson.dumps(chat()) if method == "POST" else b"")
        expected = 404 if route == "/nosuch" else 401
        assert resp.status == expected, (route, header, resp.status, resp.body[:200])
    assert await _upstream_paths(http, mock_server) == []
    text = await metrics_text(http, sc)
    assert metric_value(text, "sidecar_requests_total", status=str(expected)) == 2
    assert metric_value(text, "sidecar_requests_total", status="500") == 0


async def test_a_caller_cannot_override_the_providers_query_params(
    env: Env, sidecars: list[Sidecar], mock_server: TestServer, http: aiohttp.ClientSession,
    token: str,
) -> None:  # fmt: skip
    ref = env.secret("azure", "k1", "sk-azure-1")
    sc = await boot(env, sidecars,
                    "providers:\n  - id: azure\n"
                    f"    base_url: http://127.0.0.1:{mock_server.port}/v1\n"
                    "    format: openai\n    query_params: {api-version: '2024-10-21'}\n"
                    f'    api_keys: [{{id: k1, value: "{ref}"}}]\n')  # fmt: skip
    url = f"{sc.url}/azure/chat/completions?api-version=evil&API-Version=evil2&keep=1"
    status, _, body = await send(http, url, token=token, json=chat())
    assert status == 200, body
    (rec,) = await mock_log(http, mock_server)
    assert rec["raw_path"].endswith("?keep=1&api-version=2024-10-21"), rec["raw_path"]
