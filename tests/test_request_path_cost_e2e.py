"""What a request costs that a test can see without a clock: work the request path must not
do per request.

On Python 3.11 reading a member through its enum class (`Outcome.OK`) goes through the enum
metaclass's `__getattr__` hook, about twenty times the cost of a global's lookup: the
request path reads members from module constants instead (`sidecar.health.OUTCOME_OK`, ...).
Counted here by watching every attribute read on an enum class while real requests (JSON
and a stream) go through a sidecar to the mock.
"""

from __future__ import annotations

import enum
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Env, Sidecar
from tests.test_proxy_e2e import boot, providers_yaml

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
    token = env.access_key("app")
    sc = await boot(env, sidecars, providers_yaml(env, openai=[("k1", "sk-upstream-1")]))
    async with sc.openai(token) as client:
        # Warm: whatever is read once (imports, first use of a route) is not per request.
        await client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
        enum_reads["watching"] = 1
        for _ in range(3):
            await client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
            stream = await client.chat.completions.create(model="gpt-4o-mini", messages=MSG,
                                                          stream=True)  # fmt: skip
            assert [c async for c in stream]
        del enum_reads["watching"]
    assert dict(enum_reads) == {}
