"""`Secret` never shows its value by accident; fingerprints are stable and reveal nothing."""

from __future__ import annotations

import copy
import logging
import pickle

import pytest

from sidecar.secret import SENSITIVE_HEADERS, Secret, fingerprint

VALUE = "sk-TOPSECRET-0123456789abcdef"


def test_reveal_returns_the_value() -> None:
    assert Secret(VALUE).reveal() == VALUE


@pytest.mark.parametrize(
    "render",
    [
        repr,
        str,
        lambda s: f"{s}",
        lambda s: f"{s!r}",
        lambda s: f"{s!s}",
        lambda s: f"{s:>40}",
        lambda s: "%s" % s,  # noqa: UP031
        lambda s: "%r" % (s,),  # noqa: UP031
        lambda s: "{}".format(s),  # noqa: UP032
        lambda s: repr([s, {"k": s}, (s,)]),
        lambda s: str({"nested": [s]}),
    ],
)
def test_no_rendering_shows_the_value(render: object) -> None:
    text = render(Secret(VALUE))  # type: ignore[operator]
    assert VALUE not in text
    assert "TOPSECRET" not in text
    assert "*" in text


def test_logging_a_secret_shows_the_mask(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        logging.getLogger("test").info("key=%s", Secret(VALUE))
    assert VALUE not in caplog.text
    assert "key=Secret(" in caplog.text


def test_exception_message_with_a_secret_is_masked() -> None:
    with pytest.raises(ValueError, match=r"bad key") as info:
        raise ValueError(f"bad key {Secret(VALUE)}")
    assert VALUE not in str(info.value)


def test_equality_hash_and_truthiness() -> None:
    assert Secret(VALUE) == Secret(VALUE)
    assert Secret(VALUE) != Secret(VALUE + "x")
    assert Secret(VALUE) != VALUE  # a Secret is not equal to the plain string
    assert hash(Secret(VALUE)) == hash(Secret(VALUE))
    assert len({Secret(VALUE), Secret(VALUE)}) == 1
    assert Secret(VALUE)
    assert not Secret("")


def test_secret_cannot_be_pickled_or_copied_out() -> None:
    with pytest.raises(TypeError):
        pickle.dumps(Secret(VALUE))
    with pytest.raises(TypeError):
        copy.deepcopy(Secret(VALUE))


def test_secret_has_no_instance_dict() -> None:
    assert not hasattr(Secret(VALUE), "__dict__")


def test_fingerprint_is_stable_short_hex_and_not_a_substring() -> None:
    fp = fingerprint(VALUE)
    assert fp == fingerprint(VALUE) == fingerprint(VALUE.encode()) == Secret(VALUE).fingerprint()
    assert len(fp) == 12
    assert all(c in "0123456789abcdef" for c in fp)
    assert fp not in VALUE
    assert fingerprint(VALUE + "x") != fp


def test_fingerprint_is_not_a_plain_sha256_prefix() -> None:
    import hashlib

    # Domain-separated, so a fingerprint cannot be matched against a leaked-key hash list.
    assert fingerprint(VALUE) != hashlib.sha256(VALUE.encode()).hexdigest()[:12]


def test_sensitive_headers_cover_every_credential_header() -> None:
    for name in ("authorization", "x-api-key", "api-key", "proxy-authorization", "cookie"):
        assert name in SENSITIVE_HEADERS
    assert all(h == h.lower() for h in SENSITIVE_HEADERS)


def test_masking_masks_key_shaped_fragments_and_the_value() -> None:
    from sidecar.secret import mask_key_fragments

    body = (
        b'{"error":{"message":"Incorrect API key provided: sk-proj-********************ab12.",'
        b'"other":"AIzaSyA1234567890abcdef gsk_abcdefghijkl xai-abcdefghijkl plainvalue"}}'
    )
    out = mask_key_fragments(body, [Secret("plainvalue")])
    for fragment in (b"ab12", b"sk-proj", b"AIza", b"gsk_", b"xai-", b"plainvalue"):
        assert fragment not in out
    assert b"Incorrect API key provided" in out


def test_masking_a_long_run_without_a_key_is_linear() -> None:
    """A long [A-Za-z0-9_-] run without `***` used to be retried at every position
    (quadratic: hours for the 1 MB failed-body cap, with the event loop blocked)."""
    import subprocess
    import sys

    code = (
        "from sidecar.secret import mask_key_fragments\n"
        "body = b'x' * (1 << 20) + b' ' + b'y' * (1 << 20)\n"
        "assert mask_key_fragments(body) == body\n"
    )
    # A bounded wait, not a timing assertion: linear takes well under a second.
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
