"""What a request costs that a test can see without a clock: work the request path must not
do per request.

On Python 3.11 reading a member through its enum class (`Outcome.OK`) goes through the enum
metaclass's `__getattr__` hook, about twenty times the cost of a global's lookup: the
request path reads members from module constants instead (`sidecar.health.OUTCOME_OK`, ...).
Counted here by watching every attribute read on an enum class while real requests (JSON
and streams, with every kind of provider key) go through a sidecar to the mock.
"""

from __future__ import annotations

import enum
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from sidecar.health import Outcome, classify_status
from tests.harness import Env, Sidecar
from tests.test_credits_e2e import ATTACHED_OPENAI, start

_SIDECAR = str(Path(__file__).resolve().parents[1] / "sidecar")
_MOCK = str(Path(_SIDECAR) / "mock_provider.py")
MSG: Any = [{"role": "user", "content": "hi"}]


@pytest.fixture
def enum_reads(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Each read of an attribute of an enum class from the sidecar's code (not the mock's),
    by where it was read, once `watching` is set."""
    seen: Counter[str] = Counter()
    read = type.__getattribute__

    def counted(cls: type, name: str) -> Any:
        frame = sys._getframe(1)
        where = frame.f_code.co_filename
        if seen["watching"] and where.startswith(_SIDECAR) and where != _MOCK:
            seen[f"{where[len(_SIDECAR) + 1:]}:{frame.f_lineno} {read(cls, '__name__')}.{name}"] += 1
        return read(cls, name)

    monkeypatch.setattr(enum.EnumType, "__getattribute__", counted)
    return seen


async def test_a_request_reads_no_enum_member_through_its_class(
    env: Env, sidecars: list[Sidecar], enum_reads: Counter[str]
) -> None:
    # Every key source: a policy key (openai), a key attached to the access key (openai),
    # the operator's managed pool (anthropic), JSON and streams.
    policy = env.access_key("app")
    attached = env.access_key("team")
    env.attach("team", "openai", "team-key", ATTACHED_OPENAI)
    paying = env.access_key("paying", credits=1000)
    sc = await start(env, sidecars, openai_policy=True)

    async def requests() -> None:
        for token in (policy, attached):
            async with sc.openai(token) as client:
                await client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
                stream = await client.chat.completions.create(model="gpt-4o-mini", messages=MSG,
                                                              stream=True)  # fmt: skip
                assert [c async for c in stream]
        async with sc.anthropic(paying) as claude:
            await claude.messages.create(model="claude-haiku-4-5", max_tokens=16, messages=MSG)
            async with claude.messages.stream(model="claude-haiku-4-5", max_tokens=16,
                                              messages=MSG) as events:  # fmt: skip
                await events.get_final_message()

    await requests()  # whatever is read once (imports, a route's first use) is not per request
    enum_reads["watching"] = 1
    await requests()
    assert classify_status(500) is Outcome.SERVER_ERROR  # read through its class: counted
    del enum_reads["watching"]
    control = [where for where in enum_reads if where.endswith(" Outcome.SERVER_ERROR")]
    assert len(control) == 1, dict(enum_reads)  # the count sees reads
    del enum_reads[control[0]]
    assert dict(enum_reads) == {}
