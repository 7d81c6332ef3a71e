"""Where an attempt is sent: the upstream URL, built from parsed parts only.

Pure: no aiohttp. The rule (docs/reference.md#explicit-routes): the upstream URL
has exactly the scheme, host and port of the provider's `base_url` and a path
under its path; nothing a caller sends can change that. `upstream_url` builds
the URL from the *decoded, checked* path segments with yarl, and
`check_within` asserts the rule in one place before any request leaves.
"""

from __future__ import annotations

import functools
from typing import Final
from urllib.parse import quote, unquote

from yarl import URL

from sidecar.errors import ErrorCode, ProxyError

#: Characters kept as they are in a forwarded query string (`%` keeps existing escapes).
_QUERY_SAFE: Final = "&=+%/:;,@!$'()*?~-._"


@functools.lru_cache(maxsize=256)
def base_url(url: str) -> URL:
    return URL(url)


def explicit_tail(raw_path: str, provider_id: str) -> str:
    """The decoded path after `/{provider}` of an origin-form request path.

    The cut is made by segment, never by character count, so percent-encoded
    letters in the provider segment cannot shift it. Dot segments, encoded
    slashes or backslashes and bytes that are not UTF-8 are refused.
    """
    segments = raw_path.split("/")
    if len(segments) < 2 or _decode(segments[1]) != provider_id:
        raise ProxyError(ErrorCode.ROUTE_NOT_FOUND, "no such route")
    tail = [_decode(seg) for seg in segments[2:]]
    for i, seg in enumerate(tail):
        # An empty segment inside the path would make `//host/...` (only a trailing `/` is kept).
        if seg in (".", "..") or "/" in seg or "\\" in seg or (not seg and i < len(tail) - 1):
            raise ProxyError(ErrorCode.ROUTE_NOT_FOUND,
                             "path segments '.', '..' and encoded slashes are not allowed")  # fmt: skip
    return "/" + "/".join(tail) if tail else ""


def _decode(segment: str) -> str:
    try:
        return unquote(segment, errors="strict")
    except UnicodeDecodeError:
        raise ProxyError(ErrorCode.INVALID_REQUEST, "request path is not UTF-8") from None


@functools.lru_cache(maxsize=1024)  # the same few routes, request after request
def upstream_url(base: str, path: str, query: str) -> URL:
    """`base`'s origin, `base`'s path + `path` (decoded; yarl encodes it), then `query`."""
    b = base_url(base)
    url = b.with_path(b.path.rstrip("/") + path, encoded=False)
    if query:
        url = URL(f"{url}?{quote(query, safe=_QUERY_SAFE)}", encoded=True)
    check_within(b, url)
    return url


def check_within(base: URL, url: URL) -> None:
    """The one place that says a URL may carry this provider's key (else 400, nothing sent)."""
    root = base.path.rstrip("/")
    path = url.path
    if (
        url.scheme != base.scheme
        or url.host != base.host
        or url.port != base.port
        or url.user is not None
        or url.password is not None
        or not (path == root or path.startswith(root + "/"))
        or url.raw_path.startswith("//")
        or any(seg in (".", "..") for seg in path.split("/"))
    ):
        raise ProxyError(ErrorCode.INVALID_REQUEST, "request would leave the provider's base URL")
