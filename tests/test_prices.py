from __future__ import annotations

import pytest

from sidecar.catalog import CATALOG_LISTED
from sidecar.prices import BUILTIN_PRICES, PRICES_TAKEN, Price, PriceTable
from sidecar.usage import Usage


@pytest.fixture
def table() -> PriceTable:
    return PriceTable()


@pytest.mark.parametrize(
    ("provider", "model", "family"),
    [
        ("openai", "gpt-4o", "gpt-4o"),
        ("openai", "gpt-4o-mini", "gpt-4o-mini"),
        ("openai", "gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("openai", "gpt-4o-2024-08-06", "gpt-4o"),
        ("openai", "gpt-4o-2024-05-13", "gpt-4o-2024-05-13"),
        ("openai", "gpt-4.1-nano-2025-04-14", "gpt-4.1-nano"),
        ("openai", "o3-mini-2025-01-31", "o3-mini"),
        ("openai", "o3-2025-04-16", "o3"),
        ("openai", "gpt-5-mini-2025-08-07", "gpt-5-mini"),
        ("openai", "GPT-5", "gpt-5"),
        ("openai", "text-embedding-3-small", "text-embedding-3-small"),
        ("anthropic", "claude-sonnet-4-20250514", "claude-sonnet-4"),
        ("anthropic", "claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("anthropic", "claude-opus-4-1-20250805", "claude-opus-4-1"),
        ("anthropic", "claude-3-5-haiku-latest", "claude-3-5-haiku"),
        ("anthropic", "claude-3-7-sonnet-20250219", "claude-3-7-sonnet"),
        ("anthropic", "claude-haiku-4-5", "claude-haiku-4-5"),
    ],
)
def test_lookup_finds_family(table: PriceTable, provider: str, model: str, family: str) -> None:
    price, known = table.price_for(provider, model)
    assert known
    assert price == BUILTIN_PRICES[provider][family]


def test_prefix_needs_a_dash(table: PriceTable) -> None:
    assert table.price_for("openai", "gpt-4o")[0] != table.price_for("openai", "gpt-4o-mini")[0]
    # `gpt-4o` is a prefix of `gpt-4omega`, but not followed by `-`.
    assert table.price_for("openai", "gpt-4omega") == (Price(150.0, 600.0), False)


def test_unknown_model_is_charged_the_providers_highest_prices(table: PriceTable) -> None:
    openai = BUILTIN_PRICES["openai"].values()
    price, known = table.price_for("openai", "gpt-99")
    assert not known
    assert price == Price(max(p.input for p in openai), max(p.output for p in openai))
    anthropic = BUILTIN_PRICES["anthropic"].values()
    price, known = table.price_for("anthropic", "claude-next")
    assert not known
    assert price == Price(max(p.input for p in anthropic), max(p.output for p in anthropic))


def test_unknown_provider_model_uses_the_whole_tables_highest(table: PriceTable) -> None:
    price, known = table.price_for("ollama", "llama3.2")
    assert not known
    assert price == Price(150.0, 600.0)


def test_custom_provider_serving_a_known_model(table: PriceTable) -> None:
    assert table.price_for("azure", "gpt-4o") == (BUILTIN_PRICES["openai"]["gpt-4o"], True)


def test_overrides_extend_and_replace() -> None:
    table = PriceTable(
        {
            "gpt-4o-mini": Price(1.0, 2.0),
            "gpt-4o-mini-tuned": Price(3.0, 4.0),
            "llama3.2": Price(0.0, 0.0),
            "gpt-6": Price(1000.0, 2000.0),
        }
    )
    assert table.price_for("openai", "gpt-4o-mini-2024-07-18") == (Price(1.0, 2.0), True)
    assert table.price_for("openai", "gpt-4o-mini-tuned-v2") == (Price(3.0, 4.0), True)
    assert table.price_for("ollama", "llama3.2") == (Price(0.0, 0.0), True)
    assert table.price_for("openai", "unknown") == (Price(1000.0, 2000.0), False)
    assert table.price_for("anthropic", "unknown")[0] == Price(15.0, 75.0)


@pytest.mark.parametrize(
    "bad", [Price(-1.0, 1.0), Price(1.0, float("nan")), Price(1.0, float("inf"))]
)
def test_bad_override_is_rejected(bad: Price) -> None:
    with pytest.raises(ValueError, match=r"prices\.m\."):
        PriceTable({"m": bad})


def test_cost_is_exact_integer_micro_usd(table: PriceTable) -> None:
    # gpt-4o-mini: $0.15 / $0.60 per 1M tokens -> 0.15 and 0.60 micro-USD per token.
    assert table.cost_micro_usd("openai", "gpt-4o-mini", Usage(1000, 1000)) == 750
    assert table.cost_micro_usd("openai", "gpt-4o-mini", Usage(1_000_000, 0)) == 150_000
    assert table.cost_micro_usd("openai", "gpt-4o", Usage(0, 0)) == 0


def test_cost_rounds_up(table: PriceTable) -> None:
    # 1 token of gpt-4o-mini input costs 0.15 micro-USD: charged as 1.
    assert table.cost_micro_usd("openai", "gpt-4o-mini", Usage(1, 0)) == 1
    # gpt-5-nano input: 0.05 micro-USD per token; 21 tokens = 1.05 -> 2.
    assert table.cost_micro_usd("openai", "gpt-5-nano", Usage(21, 0)) == 2
    assert table.cost_micro_usd("openai", "gpt-5-nano", Usage(20, 0)) == 1


def test_cost_of_unknown_model_is_the_highest(table: PriceTable) -> None:
    assert table.cost_micro_usd("openai", "gpt-99", Usage(1, 1)) == 750


def test_lookups_are_cached_and_bounded(table: PriceTable) -> None:
    for i in range(5000):
        table.price_for("openai", f"gpt-4o-{i}")
    assert len(table._cache) <= 4096
    assert table.price_for("openai", "gpt-4o-1") == (BUILTIN_PRICES["openai"]["gpt-4o"], True)


# --- the providers of the built-in catalog ------------------------------------------------


def test_prices_are_dated() -> None:
    assert PRICES_TAKEN == "2026-11-27"


@pytest.mark.parametrize(
    ("provider", "model"),
    [(pid, model) for pid, models in CATALOG_LISTED.items() for model in models],
)
def test_every_listed_catalog_model_has_a_price(
    table: PriceTable, provider: str, model: str
) -> None:
    price, known = table.price_for(provider, model)
    assert known
    assert price in BUILTIN_PRICES[provider].values()  # its own provider's price


@pytest.mark.parametrize(
    ("provider", "model", "family"),
    [
        ("google", "gemini-2.5-flash-preview-05-20", "gemini-2.5-flash"),
        ("google", "gemini-2.5-flash-lite-preview-09-2025", "gemini-2.5-flash-lite"),
        ("google", "gemini-2.5-flash-image-preview", "gemini-2.5-flash-image"),
        ("google", "gemini-2.5-pro-preview-06-05", "gemini-2.5-pro"),
        ("google", "gemini-3.1-pro-preview", "gemini-3.1-pro"),
        ("google", "gemini-3-pro-image-preview", "gemini-3-pro-image"),
        ("google", "gemini-2.0-flash-001", "gemini-2.0-flash"),
        ("google", "gemini-2.0-flash-lite-001", "gemini-2.0-flash-lite"),
        ("xai", "grok-4-0709", "grok-4"),
        ("xai", "grok-4-1-fast-reasoning", "grok-4-1-fast"),
        ("xai", "grok-3-mini-beta", "grok-3-mini"),
        ("mistral", "mistral-large-2411", "mistral-large"),
        ("mistral", "codestral-2508", "codestral"),
        ("perplexity", "sonar-pro", "sonar-pro"),
        ("moonshotai", "kimi-k2-turbo-preview", "kimi-k2-turbo-preview"),
    ],
)
def test_new_providers_find_their_family(
    table: PriceTable, provider: str, model: str, family: str
) -> None:
    assert table.price_for(provider, model) == (BUILTIN_PRICES[provider][family], True)


def test_image_and_turbo_variants_are_not_priced_as_the_cheaper_family(table: PriceTable) -> None:
    image, _ = table.price_for("google", "gemini-2.5-flash-image")
    text, _ = table.price_for("google", "gemini-2.5-flash")
    assert image.output > text.output
    turbo, _ = table.price_for("moonshotai", "kimi-k2-thinking-turbo")
    assert turbo.output > table.price_for("moonshotai", "kimi-k2-thinking")[0].output


def test_unknown_gemini_model_is_charged_googles_highest(table: PriceTable) -> None:
    google = BUILTIN_PRICES["google"].values()
    price, known = table.price_for("google", "gemini-9-ultra")
    assert not known
    assert price == Price(max(p.input for p in google), max(p.output for p in google))


def test_a_gemini_override_joins_googles_table() -> None:
    table = PriceTable({"gemini-2.5-pro": Price(9.0, 9.0)})
    assert table.price_for("google", "gemini-2.5-pro-preview-06-05") == (Price(9.0, 9.0), True)
