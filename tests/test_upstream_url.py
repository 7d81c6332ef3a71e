"""Where an attempt may be sent (sidecar/upstream_url.py) — pure, no sockets."""

from __future__ import annotations

import pytest
from yarl import URL

from sidecar.errors import ErrorCode, ProxyError
from sidecar.upstream_url import check_within, explicit_tail, upstream_url


def _code(fn: object, *args: object) -> ErrorCode:
    with pytest.raises(ProxyError) as info:
        fn(*args)  # type: ignore[operator]
    return info.value.code


@pytest.mark.parametrize(
    ("raw", "tail"),
    [
        ("/ollama/v1/models", "/v1/models"),
        ("/%6Fllama/v1/models", "/v1/models"),  # encoded letters do not shift the cut
        ("/ollama/", "/"),
        ("/ollama", ""),
        (
            "/ollama/v1beta/models/gemini-2.0%3AgenerateContent",
            "/v1beta/models/gemini-2.0:generateContent",
        ),
    ],
)
def test_explicit_tail_is_cut_by_segment(raw: str, tail: str) -> None:
    assert explicit_tail(raw, "ollama") == tail


@pytest.mark.parametrize(
    "raw",
    ["/ollama/..", "/ollama/v1/../../x", "/ollama/%2E%2E/x", "/ollama/..%2F..%2Fx", "/ollama/a%5Cb",
     "/ollama/a%2fb", "/other/v1"],
)  # fmt: skip
def test_dot_segments_and_encoded_slashes_are_refused(raw: str) -> None:
    assert _code(explicit_tail, raw, "ollama") is ErrorCode.ROUTE_NOT_FOUND


def test_non_utf8_path_is_refused() -> None:
    assert _code(explicit_tail, "/ollama/%ff", "ollama") is ErrorCode.INVALID_REQUEST


@pytest.mark.parametrize(
    ("base", "path", "query", "expected"),
    [
        ("http://127.0.0.1:11434", "/v1/models", "", "http://127.0.0.1:11434/v1/models"),
        ("http://127.0.0.1:11434/", "/v1/models", "", "http://127.0.0.1:11434/v1/models"),
        ("https://api.x.ai/v1", "/chat/completions", "a=1&b=%2F", "https://api.x.ai/v1/chat/completions?a=1&b=%2F"),
        ("http://h:8/base", "/x@127.0.0.1:6666/y", "", "http://h:8/base/x@127.0.0.1:6666/y"),
        ("http://h:8/base", "/a b/é", "", "http://h:8/base/a%20b/%C3%A9"),
        ("http://h:8/base", "", "", "http://h:8/base"),
    ],
)  # fmt: skip
def test_upstream_url_keeps_the_base_origin_and_path(
    base: str, path: str, query: str, expected: str
) -> None:
    url = upstream_url(base, path, query)
    assert str(url) == expected
    b = URL(base)
    assert (url.scheme, url.host, url.port) == (b.scheme, b.host, b.port)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:6666/base/x",  # another port
        "http://evil:8/base/x",  # another host
        "https://h:8/base/x",  # another scheme
        "http://u:p@h:8/base/x",  # userinfo
        "http://h:8/basement",  # a sibling path, not under /base
        "http://h:8/other",
        "http://h:8/base/../other",
    ],
)
def test_check_within_refuses_every_other_destination(url: str) -> None:
    assert _code(check_within, URL("http://h:8/base"), URL(url, encoded=True)) is (
        ErrorCode.INVALID_REQUEST
    )


def test_check_within_accepts_the_base_and_below() -> None:
    base = URL("http://h:8/base/")
    check_within(base, URL("http://h:8/base"))
    check_within(base, URL("http://h:8/base/v1/x?q=1"))
    check_within(URL("http://h:8"), URL("http://h:8/anything"))


@pytest.mark.parametrize(
    "raw", ["/ollama//127.0.0.1:6666/x", "/ollama/v1//x", "/ollama///x", "/ollama//"]
)
def test_empty_segments_inside_the_path_are_refused(raw: str) -> None:
    """`//host/...` reaches an upstream that joins URLs as a network path to another host."""
    assert _code(explicit_tail, raw, "ollama") is ErrorCode.ROUTE_NOT_FOUND


def test_a_trailing_slash_is_kept() -> None:
    assert explicit_tail("/ollama/v1/models/", "ollama") == "/v1/models/"


def test_check_within_refuses_a_network_path() -> None:
    assert _code(check_within, URL("http://h:8"), URL("http://h:8//evil:1/x", encoded=True)) is (
        ErrorCode.INVALID_REQUEST
    )
