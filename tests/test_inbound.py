"""Checks on what a caller sends, where it enters (sidecar/inbound.py) — pure, no sockets."""

from __future__ import annotations

import gzip
import itertools
import json
import zlib

import pytest

from sidecar import inbound
from sidecar.errors import ErrorCode, ProxyError


def _code(fn: object, *args: object, **kwargs: object) -> ErrorCode:
    with pytest.raises(ProxyError) as info:
        fn(*args, **kwargs)  # type: ignore[operator]
    return info.value.code


# --------------------------------------------------------------------------- request id


def test_printable_request_id_is_kept_and_cut_at_128() -> None:
    assert inbound.clean_request_id("abc-123") == "abc-123"
    assert inbound.clean_request_id("x" * 500) == "x" * 128


@pytest.mark.parametrize("raw", ["\udcff\udcfe", "é-id", "a\tb", "a\x00b", "   ", "", None])
def test_unprintable_request_id_is_replaced(raw: str | None) -> None:
    rid = inbound.clean_request_id(raw)
    assert rid != raw
    assert len(rid) == 16
    assert rid.isascii()
    assert rid.isprintable()


# --------------------------------------------------------------------------- request target


@pytest.mark.parametrize("target", ["/v1/models", "/ollama/v1/x?y=1", "/"])
def test_origin_form_targets_pass(target: str) -> None:
    inbound.check_target(target)


@pytest.mark.parametrize(
    "target",
    ["http://xx@127.0.0.1:6666/ollama/v1/models", "https://evil/", "//127.0.0.1:6666/a", "*", ""],
)
def test_absolute_form_and_authority_targets_are_refused(target: str) -> None:
    assert _code(inbound.check_target, target) is ErrorCode.INVALID_REQUEST


# --------------------------------------------------------------------------- model names


@pytest.mark.parametrize(
    "bad", ["gpt\r\nx-evil: 1", "gpt\n", "gpt\x00", "gpt\x7f", "gpt\x1b[31m", "gpt\u2028", "é", " "]
)
def test_control_characters_in_model_names_are_refused(bad: str) -> None:
    assert _code(inbound.model_names, {"model": bad}, required=True) is ErrorCode.INVALID_REQUEST
    assert (
        _code(inbound.model_names, {"model": "gpt-4o", "models": ["x", bad]}, required=True)
        is ErrorCode.INVALID_REQUEST
    )


def test_model_names_order_and_duplicates() -> None:
    names = inbound.model_names({"model": "a", "models": ["b", "a", "c:d@1"]}, required=True)
    assert names == ["a", "b", "c:d@1"]


def test_models_list_is_capped() -> None:
    ok = [f"m{i}" for i in range(inbound.MAX_MODELS)]
    assert inbound.model_names({"models": ok}, required=True) == ok
    assert (
        _code(inbound.model_names, {"models": [*ok, "one-more"]}, required=True)
        is ErrorCode.INVALID_REQUEST
    )


def test_overlong_model_name_is_refused() -> None:
    assert (
        _code(inbound.model_names, {"model": "m" * (inbound.MODEL_NAME_MAX + 1)}, required=True)
        is ErrorCode.INVALID_REQUEST
    )


def test_missing_and_mistyped_models() -> None:
    assert _code(inbound.model_names, {}, required=True) is ErrorCode.MODEL_MISSING
    assert _code(inbound.model_names, {"model": 3}, required=True) is ErrorCode.MODEL_MISSING
    assert _code(inbound.model_names, {"models": "a"}, required=True) is ErrorCode.MODEL_MISSING
    assert inbound.model_names(None, required=False) == []


def test_rejected_header_is_bounded_and_cut_at_a_name() -> None:
    names = [f"model-{i:04d}" for i in range(1000)]
    value = inbound.rejected_header(names)
    assert len(value) <= inbound.REJECTED_HEADER_MAX
    assert value.endswith(",...")
    assert all(n in names for n in value.removesuffix(",...").split(","))
    assert inbound.rejected_header(["a", "b"]) == "a,b"


# --------------------------------------------------------------------------- body encodings


def test_identity_bodies_are_untouched() -> None:
    assert inbound.decode_body(b"{}", "identity", 10) == b"{}"
    assert inbound.decode_body(b"{}", "", 10) == b"{}"


def test_gzip_and_deflate_are_decoded() -> None:
    data = b'{"model":"gpt-4o"}'
    assert inbound.decode_body(gzip.compress(data), "gzip", 100) == data
    assert inbound.decode_body(gzip.compress(data), "x-gzip", 100) == data
    assert inbound.decode_body(zlib.compress(data), "deflate", 100) == data
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    assert inbound.decode_body(raw.compress(data) + raw.flush(), "Deflate", 100) == data


def test_limit_applies_to_decoded_bytes() -> None:
    bomb = gzip.compress(b"\0" * (50 << 20))  # 50 MB of zeros in about 50 KB
    assert len(bomb) < 100_000
    assert _code(inbound.decode_body, bomb, "gzip", 1 << 20) is ErrorCode.REQUEST_TOO_LARGE
    assert len(inbound.decode_body(bomb, "gzip", 50 << 20)) == 50 << 20


@pytest.mark.parametrize("coding", ["br", "zstd", "compress", "gzip, gzip", "made-up"])
def test_other_encodings_are_unsupported(coding: str) -> None:
    assert _code(inbound.decode_body, b"x", coding, 100) is ErrorCode.UNSUPPORTED_MEDIA


@pytest.mark.parametrize(
    "body",
    [b"not gzip at all", gzip.compress(b"{}", mtime=0)[:-6], gzip.compress(b"{}", mtime=0) + b"junk"],
    ids=["not-gzip", "truncated", "trailing-junk"],
)
def test_bytes_that_are_not_what_their_encoding_says_are_invalid(body: bytes) -> None:
    assert _code(inbound.decode_body, body, "gzip", 100) is ErrorCode.INVALID_REQUEST


# --------------------------------------------------------------------------- JSON


def test_valid_json_orjson_refuses_is_read_and_written_back() -> None:
    body = b'{"messages":[{"content":"\\ud800 lone"}],"seed":123456789012345678901234567890}'
    data = inbound.parse_json(body)
    assert data["seed"] == 123456789012345678901234567890
    out = inbound.dump_json({**data, "model": "x"})
    assert json.loads(out) == {**json.loads(body), "model": "x"}


@pytest.mark.parametrize("body", [b"{", b'{"a": NaN}', b'{"a": Infinity}', b"\xff", b"[" * 100_000])
def test_invalid_json_is_refused(body: bytes) -> None:
    assert _code(inbound.parse_json, body) is ErrorCode.INVALID_JSON


# --------------------------------------------------------------------------- query strings


def test_credential_parameters_are_stripped() -> None:
    q = "alt=sse&key=ak-secret&API_KEY=x&beta=true&access_key=y&token=z"
    assert inbound.strip_credentials(q) == "alt=sse&beta=true"
    assert inbound.strip_credentials("a=1&b=tok%2Dvalue", ["tok-value"]) == "a=1"
    assert inbound.strip_credentials("") == ""


def test_logged_query_hides_credential_values() -> None:
    shown = inbound.redact_query("beta=true&key=ak-secret&api_key=x")
    assert shown == "beta=true&key=***&api_key=***"
    assert "secret" not in shown


# --------------------------------------------------------------------------- review findings


def test_gzip_with_several_members_and_zero_padding_is_valid() -> None:
    two = gzip.compress(b'{"a":') + gzip.compress(b"1}")
    assert inbound.decode_body(two, "gzip", 100) == b'{"a":1}'
    assert inbound.decode_body(gzip.compress(b"{}") + b"\0" * 8, "gzip", 100) == b"{}"
    assert (
        _code(inbound.decode_body, zlib.compress(b"{}") + zlib.compress(b"{}"), "deflate", 100)
        is ErrorCode.INVALID_REQUEST
    )


def test_a_bomb_split_over_gzip_members_still_stops_at_the_limit() -> None:
    member = gzip.compress(b" " * (1 << 20))
    assert _code(inbound.decode_body, member * 8, "gzip", 4 << 20) is ErrorCode.REQUEST_TOO_LARGE


def test_integers_past_forty_digits_are_refused_not_parsed() -> None:
    ok = b'{"seed": ' + b"9" * inbound.MAX_INT_DIGITS + b"}"
    assert inbound.parse_json(ok)["seed"] == int("9" * inbound.MAX_INT_DIGITS)
    slow = b'{"n": [' + b",".join([b"7" * 4300] * 50) + b"]}"
    assert _code(inbound.parse_json, slow) is ErrorCode.INVALID_JSON


@pytest.mark.parametrize("token", ["abc\udcff\udcfedef", "ключ", "a\tb", "a\x00b"])
def test_a_credential_that_is_not_printable_ascii_is_an_invalid_key(token: str) -> None:
    assert _code(inbound.check_token, token) is ErrorCode.ACCESS_KEY_INVALID


@pytest.mark.parametrize("method", ["TRACE", "PROPFIND", "CONNECT", "MKCOL", "trace"])
def test_methods_that_could_echo_a_key_are_not_forwarded(method: str) -> None:
    assert _code(inbound.check_method, method) is ErrorCode.METHOD_NOT_ALLOWED
    for ok in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"):
        inbound.check_method(ok)


def test_the_callers_token_is_stripped_and_redacted_wherever_it_appears() -> None:
    tok = "sk-sc-secret"
    q = f"q=Bearer%20{tok}&x=1;key={tok}&access_token={tok}&auth=z&keep=1"
    assert inbound.strip_credentials(q, [tok]) == "keep=1"
    shown = inbound.redact_query(f"access_token={tok}&auth=z&x-api-key=y&{tok}=1&q=a{tok}", [tok])
    assert tok not in shown
    assert "z" not in shown.split("&")[1]


def test_the_providers_own_query_params_cannot_be_overridden() -> None:
    q = "api-version=evil&alt=sse&API-VERSION=x"
    assert inbound.strip_credentials(q, drop=["api-version"]) == "alt=sse"


def test_integers_past_64_bits_stay_exact_without_any_other_oddity() -> None:
    """orjson reads them as floats: a rewritten body would carry 1.2345678901234568e+29."""
    body = b'{"model":"a","seed":123456789012345678901234567890,"n":18446744073709551616}'
    data = inbound.parse_json(body)
    assert data["seed"] == 123456789012345678901234567890
    assert data["n"] == 18446744073709551616
    assert json.loads(inbound.dump_json({**data, "model": "b"}))["seed"] == data["seed"]


def test_a_body_of_many_tiny_gzip_members_is_refused_not_walked() -> None:
    """Each member copied the rest of the body: 100k empty members held the loop for minutes."""
    import subprocess
    import sys

    code = (
        "import gzip\n"
        "from sidecar import inbound\n"
        "from sidecar.errors import ProxyError\n"
        "body = gzip.compress(b'') * 100_000\n"
        "try:\n"
        "    inbound.decode_body(body, 'gzip', 1 << 25)\n"
        "except ProxyError as e:\n"
        "    assert e.code.wire == 'invalid_request'\n"
        "else:\n"
        "    raise SystemExit('accepted')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)  # a bound, not a timing
    ok = gzip.compress(b"{") + gzip.compress(b"}")
    assert inbound.decode_body(ok * 1, "gzip", 10) == b"{}"


def test_fresh_request_ids_are_16_hex_digits_never_repeated_and_not_sequential() -> None:
    ids = [inbound.new_request_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 16 and int(i, 16) >= 0 for i in ids)
    gaps = {int(b, 16) - int(a, 16) for a, b in itertools.pairwise(ids)}
    assert len(gaps) > 1000  # no constant step that would count the requests in between
