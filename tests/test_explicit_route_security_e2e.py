"""A provider key goes to its provider's `base_url` and nowhere else (issue #10, critical).

Explicit routes (`/{provider}/{path}`) once cut the raw request line at
`len(provider_id) + 1` and string-appended the rest to `base_url`: an
absolute-form target (`GET http://xx@127.0.0.1:6666/ollama/v1/models`) made the
sidecar send the provider key to another host, and percent-encoded letters in
the provider segment shifted the cut out of the base path. Each auth style
(bearer, x-api-key, `auth: none` with `headers:` secrets, a managed Anthropic
key, passthrough) is driven with raw request lines against a provider whose
`base_url` has no path and one whose `base_url` has a path; an "attacker"
listener on another port must see no connection at all, and the mock must see
only the legitimate requests, at exactly the expected path.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from tests.harness import Env, Listener, RawResponse, Sidecar, raw_request

PROVIDER_KEY = "sk-provider-secret-7f3a"
HEADER_SECRET = "az-header-secret-91c2"
MANAGED_KEY = "sk-ant-managed-secret-5d1e"
CALLER_KEY = "sk-caller-own-secret-0b8f"
SECRETS = (PROVIDER_KEY, HEADER_SECRET, MANAGED_KEY, CALLER_KEY)
EXPECTED_KEY = {"bearer": PROVIDER_KEY, "x-api-key": PROVIDER_KEY, "headers": HEADER_SECRET,
                "managed": MANAGED_KEY, "passthrough": CALLER_KEY}  # fmt: skip
SECRETS_LEAKED = ", and they carried a secret"
CLAUDE = {"model": "claude-haiku-4-5", "max_tokens": 16,
          "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip


@dataclass(frozen=True)
class Style:
    """One way a provider key is attached to an upstream request."""

    name: str
    provider: str  # the explicit route's provider id
    anthropic: bool  # the legitimate call: POST /v1/messages (else GET /v1/models)
    config: str  # YAML after the common head; BASE is the provider's base_url

    @property
    def tail(self) -> str:
        return "/v1/messages" if self.anthropic else "/v1/models"


STYLES = [
    Style("bearer", "ollama", False,
          "providers:\n  - id: ollama\n    base_url: BASE\n    format: openai\n    auth: bearer\n"
          '    api_keys: [{id: k1, value: "REF"}]\n'),
    Style("x-api-key", "xapikey", True,
          "providers:\n  - id: xapikey\n    base_url: BASE\n    format: anthropic\n    auth: x-api-key\n"
          '    api_keys: [{id: k1, value: "REF"}]\n'),
    Style("headers", "noauth", False,
          "providers:\n  - id: noauth\n    base_url: BASE\n    format: openai\n    auth: none\n"
          '    headers: {api-key: "HREF"}\n'),
    Style("managed", "anthropic", True,
          "providers:\n  - id: anthropic\n    base_url: BASE\n"
          'managed:\n  anthropic: [{id: pool-1, value: "MREF"}]\n'
          'ledger: {url: "sqlite:///ledger.db"}\n'
          "prices:\n  claude-haiku-4-5: {input: 1, output: 1}\n"),
    Style("passthrough", "ollama", True,
          "passthrough: true\n"
          "providers:\n  - id: ollama\n    base_url: BASE\n    format: anthropic\n    auth: x-api-key\n"),
]  # fmt: skip

#: The provider's base path: none at all (the critical case), or one the mock does not route.
BASE_PATHS = ["", "/tenant"]


@dataclass
class Setup:
    sc: Sidecar
    style: Style
    base_path: str
    caller: dict[str, str]  # the caller's credential headers
    attacker: Listener


@pytest.fixture
async def attacker() -> AsyncIterator[Listener]:
    async with Listener() as listener:
        yield listener


async def _boot(
    env: Env, sidecars: list[Sidecar], mock: TestServer, style: Style, base_path: str,
    attacker: Listener,
) -> Setup:  # fmt: skip
    config = style.config.replace("BASE", f"http://127.0.0.1:{mock.port}{base_path}")
    config = config.replace("HREF", env.secret("azure", "key", HEADER_SECRET))
    config = config.replace("MREF", env.secret("managed", "anthropic-1", MANAGED_KEY))
    config = config.replace("REF", env.secret("p", "k1", PROVIDER_KEY))
    if style.name == "passthrough":
        caller = {"x-api-key": CALLER_KEY}
    else:
        token = env.access_key("app", credits=100.0)
        caller = {"x-api-key": token} if style.anthropic else {"authorization": f"Bearer {token}"}
    if style.anthropic:
        caller["anthropic-version"] = "2023-06-01"
    env.write_config("timeouts: {per_request: 5s, total: 10s}\n" + config)
    sc = await env.start()
    sidecars.append(sc)
    return Setup(sc, style, base_path, caller, attacker)


async def _send(s: Setup, target: str) -> RawResponse:
    """One request with this exact request target, its headers and (Anthropic) body as is."""
    method = "POST" if s.style.anthropic else "GET"
    lines = [f"{method} {target} HTTP/1.1", f"host: 127.0.0.1:{s.sc.running.proxy_port}"]
    lines += [f"{k}: {v}" for k, v in s.caller.items()]
    body = b""
    if s.style.anthropic:
        lines.append("content-type: application/json")
        body = orjson.dumps(CLAUDE)
    head = ("\r\n".join(lines) + "\r\n").encode()
    return await raw_request(s.sc.running.proxy_port, head, body)


async def _mock_log(mock: TestServer) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(mock.make_url("/_mock/requests")) as r:
        return list((await r.json())["requests"])


async def _mock_paths(mock: TestServer) -> list[str]:
    """What reached the mock, as sent (paths only: the records hold keys)."""
    return [str(r["raw_path"]) for r in await _mock_log(mock)]


def _code(resp: RawResponse) -> str:
    doc = resp.json()
    return str(doc["error"]["code"])


def _no_secret_in(text: bytes) -> bool:
    return not any(s.encode() in text for s in SECRETS)


def _pad(provider: str) -> str:
    """Userinfo filler so that a cut at len(provider)+1 lands inside it (`xx` for `ollama`)."""
    return "x" * max(2, len(provider) - 4)


def _encoded(provider: str) -> str:
    """The provider id with its first letter percent-encoded (`%6Fllama`)."""
    return f"%{ord(provider[0]):02X}{provider[1:]}"


@pytest.mark.parametrize("base_path", BASE_PATHS, ids=["no-base-path", "base-path"])
@pytest.mark.parametrize("style", STYLES, ids=[s.name for s in STYLES])
async def test_absolute_form_and_userinfo_targets_are_refused_and_reach_no_one(
    env: Env, sidecars: list[Sidecar], mock_server: TestServer, attacker: Listener,
    style: Style, base_path: str,
) -> None:  # fmt: skip
    s = await _boot(env, sidecars, mock_server, style, base_path, attacker)
    pid, tail, att, own = style.provider, style.tail, attacker.port, s.sc.running.proxy_port
    answers: dict[str, RawResponse] = {}
    for target in (
        f"http://{_pad(pid)}@127.0.0.1:{att}/{pid}{tail}",  # the reported attack
        f"http://127.0.0.1:{att}/{pid}{tail}",  # absolute form, no userinfo
        f"http://user:pw@127.0.0.1:{own}/{pid}{tail}",  # userinfo, even naming the sidecar
        f"http://127.0.0.1:{own}/{pid}{tail}",  # absolute form naming the sidecar itself
    ):
        answers[target] = await _send(s, target)
    # where requests went first: that is the attack; the answers after
    leaked = SECRETS_LEAKED if not _no_secret_in(bytes(attacker.received)) else ""
    assert attacker.connections == 0, (
        f"{attacker.connections} connection(s) to the attacker{leaked}"
    )
    assert await _mock_paths(mock_server) == []
    for target, resp in answers.items():
        assert resp.status == 400, (target, resp.status, resp.body[:300])
        assert _code(resp) == "invalid_request", target
        assert _no_secret_in(resp.body)


@pytest.mark.parametrize("base_path", BASE_PATHS, ids=["no-base-path", "base-path"])
@pytest.mark.parametrize("style", STYLES, ids=[s.name for s in STYLES])
async def test_paths_stay_under_the_base_path_and_encoded_letters_shift_nothing(
    env: Env, sidecars: list[Sidecar], mock_server: TestServer, attacker: Listener,
    style: Style, base_path: str,
) -> None:  # fmt: skip
    s = await _boot(env, sidecars, mock_server, style, base_path, attacker)
    pid, tail, att = style.provider, style.tail, attacker.port
    # A network-path reference and dot segments / encoded slashes: refused, nothing upstream.
    for target in (
        f"//127.0.0.1:{att}/{pid}{tail}",
        f"/{pid}/..%2F..%2Fx",
        f"/{pid}/%2E%2E/x",
        f"/{pid}/%2e%2e%2fx",
        f"/{pid}/v1/../../x",
        f"/{pid}/v1/..%2F..%2F..%2Fx",
        f"/{pid}@127.0.0.1:{att}{tail}",
        f"/{pid}//127.0.0.1:{att}/x",  # would go out as `//host/x`: a network path to another host
        f"/{pid}/v1//x",
    ):
        resp = await _send(s, target)
        assert resp.status in (400, 404), (target, resp.status, resp.body[:300])
        expected = "invalid_request" if resp.status == 400 else "route_not_found"
        assert _code(resp) == expected, target
        assert _no_secret_in(resp.body)
    # Methods an upstream may echo back with the request's headers (the key) are not forwarded.
    for method in ("TRACE", "PROPFIND"):
        lines = [f"{method} /{pid}{tail} HTTP/1.1", f"host: 127.0.0.1:{s.sc.running.proxy_port}"]
        lines += [f"{k}: {v}" for k, v in s.caller.items()]
        resp = await raw_request(
            s.sc.running.proxy_port, ("\r\n".join(lines) + "\r\n").encode(), b""
        )
        assert resp.status == 405, (method, resp.status, resp.body[:300])
        assert _code(resp) == "method_not_allowed"
    assert await _mock_paths(mock_server) == []
    # The legitimate path, plain and with a percent-encoded letter in the provider segment:
    # both reach the mock at exactly base path + tail, nothing cut or shifted.
    for target in (f"/{pid}{tail}", f"/{_encoded(pid)}{tail}"):
        resp = await _send(s, target)
        assert resp.status < 500, (target, resp.status, resp.body[:300])
    log = await _mock_log(mock_server)
    assert [r["path"] for r in log] == [base_path + tail] * 2
    assert all(r["raw_path"].startswith(base_path + "/") for r in log)
    # and they carried this style's credential (compared, never printed)
    assert [r["key"] == EXPECTED_KEY[style.name] for r in log] == [True, True]
    assert attacker.connections == 0, "a request left for the attacker's port"
