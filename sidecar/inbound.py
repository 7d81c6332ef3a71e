"""What a caller sends, checked where it enters (docs/reference.md#errors).

Pure: no aiohttp, no I/O. The handler calls these before anything goes
upstream; each refusal is a `ProxyError` with a 4xx code, so a hostile
request line, header or body never reaches a provider.
"""

from __future__ import annotations

import itertools
import json
import os
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final
from urllib.parse import parse_qsl, quote, unquote

import orjson

from sidecar.errors import ErrorCode, ProxyError
from sidecar.names import MODEL_NAME_MAX, is_model_name_text

#: An incoming `x-request-id` longer than this is cut; one with other than printable ASCII is replaced.
REQUEST_ID_MAX: Final = 128
#: Entries of a body's `models` array (failover candidates) accepted per request.
MAX_MODELS: Final = 64
#: `x-sidecar-rejected-models` stays one parseable header line of at most this many bytes.
REJECTED_HEADER_MAX: Final = 2048

#: Query parameters that carry credentials (Gemini's `?key=`, and the usual spellings).
CREDENTIAL_PARAMS: Final = frozenset(
    {"key", "api_key", "api-key", "apikey", "access_key", "access_token", "token", "x-api-key",
     "authorization", "auth", "secret", "password", "sig", "signature"}
)  # fmt: skip
#: Digits of one JSON integer the standard parser may read: orjson stops at 64 bits, and
#: int() of thousands of long digit strings would hold the event loop for seconds.
MAX_INT_DIGITS: Final = 40
#: Members of one gzip request body (real clients send one).
MAX_GZIP_MEMBERS: Final = 16
#: A digit run this long may be an integer past 64 bits (more than 19 digits). It is looked
#: for in the body with every digit mapped to "0" and every other byte to " ": one C pass
#: and a substring search, ten times faster than a regular expression on a large body.
_LONG_DIGITS: Final = b"0" * 20
_DIGITS_ONLY: Final = bytes(0x30 if 0x30 <= i <= 0x39 else 0x20 for i in range(256))
#: Methods forwarded on explicit routes; anything else (TRACE echoes the key back) is 405.
FORWARDED_METHODS: Final = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})

#: Request `Content-Encoding`s the sidecar decodes itself (bounded) before forwarding.
_DECODABLE: Final = {
    "gzip": 16 + zlib.MAX_WBITS,
    "x-gzip": 16 + zlib.MAX_WBITS,
    "deflate": zlib.MAX_WBITS,
}


#: Request ids: a counter scrambled by a bijection of 64-bit numbers keyed at start (an odd
#: multiplier, then a mask), so ids never repeat within a process, differ between processes,
#: do not show how many requests came in between, and need no random bytes per request.
_ID_MULTIPLIER: Final = int.from_bytes(os.urandom(8), "big") | 1
_ID_MASK: Final = int.from_bytes(os.urandom(8), "big")
_ID_COUNTER: Final = itertools.count(int.from_bytes(os.urandom(4), "big"))
_U64: Final = (1 << 64) - 1


def new_request_id() -> str:
    """16 hex digits, unique within the process."""
    return f"{(next(_ID_COUNTER) * _ID_MULTIPLIER & _U64) ^ _ID_MASK:016x}"


def clean_request_id(raw: str | None) -> str:
    """The caller's `x-request-id` if it is printable ASCII (cut to 128 chars), else a fresh id.

    Anything else would break the response header it is echoed in, after the
    upstream was already paid for.
    """
    if raw:
        rid = raw[:REQUEST_ID_MAX]
        if rid.isascii() and rid.isprintable() and rid.strip():
            return rid
    return new_request_id()


def check_method(method: str) -> None:
    if method not in FORWARDED_METHODS:
        raise ProxyError(ErrorCode.METHOD_NOT_ALLOWED, f"method {method} is not forwarded")


def check_token(token: str) -> None:
    """A credential is printable ASCII; anything else is no access key (401, not a crash)."""
    if not (token.isascii() and token.isprintable()):
        raise ProxyError(ErrorCode.ACCESS_KEY_INVALID, "invalid access key")


def check_target(raw_target: str) -> None:
    """Only origin-form request targets (`/path?query`) are proxied.

    An absolute-form target (`GET http://user@host/...`) names another host; it
    is refused before anything else so no part of it can steer where a key goes.
    """
    if not raw_target.startswith("/") or raw_target.startswith("//"):
        raise ProxyError(
            ErrorCode.INVALID_REQUEST, "request target must be a path (origin form), not a URL"
        )


def check_model_name(name: str, field: str = "model") -> None:
    if len(name) > MODEL_NAME_MAX:
        raise ProxyError(
            ErrorCode.INVALID_REQUEST, f"`{field}` is longer than {MODEL_NAME_MAX} characters"
        )
    if not is_model_name_text(name):
        raise ProxyError(
            ErrorCode.INVALID_REQUEST,
            f"`{field}` must be printable ASCII (control characters are refused)",
        )


def model_names(data: Mapping[str, Any] | None, *, required: bool) -> list[str]:
    """`model` first, then the entries of `models`, without duplicates; each name checked."""
    names: list[str] = []
    model = data.get("model") if data else None
    if isinstance(model, str) and model:
        check_model_name(model)
        names.append(model)
    elif model is not None:
        raise ProxyError(ErrorCode.MODEL_MISSING, "`model` must be a non-empty string")
    models = data.get("models") if data else None
    if models is not None:
        if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
            raise ProxyError(ErrorCode.MODEL_MISSING, "`models` must be a list of model names")
        if len(models) > MAX_MODELS:
            raise ProxyError(
                ErrorCode.INVALID_REQUEST, f"`models` has more than {MAX_MODELS} entries"
            )
        for m in models:
            check_model_name(m, "models")
            if m not in names:
                names.append(m)
    if required and not names:
        raise ProxyError(ErrorCode.MODEL_MISSING, "`model` is required")
    return names


def rejected_header(names: Sequence[str]) -> str:
    """The `x-sidecar-rejected-models` value, cut at a name boundary with `,...`."""
    value = ",".join(names)
    if len(value) <= REJECTED_HEADER_MAX:
        return value
    cut = value.rfind(",", 0, REJECTED_HEADER_MAX - 4)
    return value[: max(cut, 0)] + ",..."


# --------------------------------------------------------------------------- body


def decode_body(body: bytes, content_encoding: str, limit: int) -> bytes:
    """The request body with its `Content-Encoding` undone, never more than `limit` bytes.

    `gzip` and `deflate` are decoded here (a decompression bomb stops at the
    limit: 413); any other coding is `415`; bytes that are not what their coding
    says are `400`. The decoded body is forwarded without a `Content-Encoding`.
    """
    codings = [c.strip().lower() for c in content_encoding.split(",") if c.strip()]
    codings = [c for c in codings if c != "identity"]
    if not codings:
        return body
    if len(codings) > 1 or codings[0] not in _DECODABLE:
        raise ProxyError(
            ErrorCode.UNSUPPORTED_MEDIA,
            "request Content-Encoding must be gzip, deflate or identity",
        )
    wbits = _DECODABLE[codings[0]]
    out = _inflate(body, wbits, limit)
    if out is None and wbits == zlib.MAX_WBITS:
        out = _inflate(body, -zlib.MAX_WBITS, limit)  # "deflate" sent raw, as some clients do
    if out is None:
        raise ProxyError(ErrorCode.INVALID_REQUEST, f"request body is not valid {codings[0]} data")
    return out


def _inflate(data: bytes, wbits: int, limit: int) -> bytes | None:
    """Every member of `data` (gzip may have several), never more than `limit` bytes out.

    At most `MAX_GZIP_MEMBERS` members: each one hands back a copy of the rest, so
    thousands of tiny members would cost time quadratic in the body's size.
    """
    out = bytearray()
    rest = data
    for _ in range(MAX_GZIP_MEMBERS):
        d = zlib.decompressobj(wbits)
        try:
            out += d.decompress(rest, limit + 1 - len(out))
        except zlib.error:
            return None
        if len(out) > limit:
            raise ProxyError(
                ErrorCode.REQUEST_TOO_LARGE, f"request body over {limit} bytes once decoded"
            )
        if not d.eof:
            return None
        rest = d.unused_data
        if not rest.strip(b"\0"):  # trailing zero padding is allowed after the last member
            return bytes(out)
        if wbits < 0 or wbits == zlib.MAX_WBITS:
            return None  # one deflate stream, then bytes that belong to none
    return None


def parse_json(body: bytes) -> Any:
    """orjson first; valid JSON it refuses (lone surrogate escapes) or would read inexactly
    (integers wider than 64 bits become floats, and a rewritten body would carry the float)
    is read by the standard parser. NaN/Infinity are not JSON: refused."""
    try:
        data = orjson.loads(body)
        if body.translate(_DIGITS_ONLY).find(_LONG_DIGITS) < 0:  # (`in` raises and drops a TypeError)
            return data
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(body, parse_constant=_no_constant, parse_int=_bounded_int)
    except (ValueError, RecursionError):
        raise ProxyError(ErrorCode.INVALID_JSON, "request body is not valid JSON") from None


def _no_constant(name: str) -> Any:
    raise ValueError(name)


def _bounded_int(digits: str) -> int:
    if len(digits) > MAX_INT_DIGITS:
        raise ValueError("integer too long")
    return int(digits)


def dump_json(data: Any) -> bytes:
    """The counterpart of `parse_json`: what orjson cannot write, the standard library can."""
    try:
        return orjson.dumps(data)
    except TypeError:  # orjson.JSONEncodeError: a lone surrogate, an integer over 64 bits,
        pass  # or nesting deeper than orjson writes
    try:
        return json.dumps(data, separators=(",", ":")).encode()
    except RecursionError:
        raise ProxyError(ErrorCode.INVALID_REQUEST, "request body is nested too deeply") from None


# --------------------------------------------------------------------------- query


def strip_credentials(query: str, tokens: Iterable[str] = (), drop: Iterable[str] = ()) -> str:
    """The raw query string without parameters that carry a credential (`?key=`, or any
    parameter containing the caller's own token) and without the names in `drop` (the
    provider's own `query_params`, which a caller must not override)."""
    if not query:
        return query
    secrets = [t for t in tokens if t]
    dropped = CREDENTIAL_PARAMS.union(n.lower() for n in drop)
    kept = []
    for part in query.split("&"):
        name = part.partition("=")[0]
        if unquote(name).lower() in dropped or _contains(unquote(part), secrets):
            continue
        kept.append(part)
    return "&".join(kept)


def _contains(text: str, secrets: list[str]) -> bool:
    return any(s in text for s in secrets)


def redact_query(query: str, tokens: Iterable[str] = ()) -> str:
    """The query string for a log line: credential parameters (and any value containing
    the caller's token) keep their name, not their value."""
    if not query:
        return query
    secrets = [t for t in tokens if t]
    out = []
    for name, value in parse_qsl(query, keep_blank_values=True):
        hidden = name.lower() in CREDENTIAL_PARAMS or _contains(name + value, secrets)
        shown_name = "***" if _contains(name, secrets) else name
        out.append(f"{quote(shown_name, safe='*')}={quote('***' if hidden else value, safe='*')}")
    return "&".join(out)
