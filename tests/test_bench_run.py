"""bench/run.py's pure helpers: --mode parsing and what each target is sent."""

from __future__ import annotations

import argparse

import pytest

from bench import run


@pytest.mark.parametrize(
    ("text", "modes"),
    [
        ("both", ("json", "stream")),
        ("all", ("json", "stream", "xjson", "xstream")),
        ("xjson", ("xjson",)),
        ("xstream, json", ("xstream", "json")),
        ("json,both,xjson", ("json", "stream", "xjson")),
    ],
)
def test_mode_lists_expand_both_and_all_without_repeats(text: str, modes: tuple[str, ...]) -> None:
    assert run.parse_modes(text) == modes


@pytest.mark.parametrize("text", ["", ",", "xml", "json,xtream"])
def test_unknown_modes_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="--mode"):
        run.parse_modes(text)


def test_the_default_mode_is_json_and_stream() -> None:
    assert run.parse_args([])[0].modes == ("json", "stream")
    assert run.parse_args(["--mode", "all"])[0].modes == run.MODES


def test_only_a_sidecar_is_sent_the_model_to_translate() -> None:
    sidecar = run.Target("sidecar", "u", "t", mock=None, translates=True)  # type: ignore[arg-type]
    relay = run.Target("pass-through", "u", "t", mock=None)  # type: ignore[arg-type]
    assert b'"model":"claude-haiku-4-5"' in run.request_body("xjson", sidecar)
    assert b'"model":"gpt-4o-mini"' in run.request_body("xjson", relay)
    assert run.request_body("xstream", relay) == run.request_body("stream", sidecar)
    assert run.request_body("json", sidecar).endswith(b"}]}")


def test_the_anthropic_provider_is_configured_only_for_translated_modes() -> None:
    assert run._sidecar_providers(("json", "stream")) == ("openai",)
    assert run._sidecar_providers(("json", "xstream")) == ("openai", "anthropic")
