"""Model prices in USD per 1M tokens, and the cost of a request's usage.

The built-in table holds list prices (standard tier, text tokens, no batch
discount) of OpenAI and Anthropic, and of the common models of Google (Gemini),
DeepSeek, Mistral, xAI, Groq, Cerebras, Perplexity and Moonshot AI, as taken on
`PRICES_TAKEN` (2026-11-27) — prices change; the operator overrides them under
`prices:`. Tiered prices are charged at their base tier (Gemini's ≤200k-token
prompts, DeepSeek's peak hours); per-request fees (Perplexity's search fees) are
not charged. The config's `prices:` map (model name →
price) extends it and overrides built-in entries of the same name; a name
that looks like an OpenAI or Anthropic model (`gpt-*`, `o1*`, `claude-*`, …)
joins that provider's table, any other name (`llama3.2`) applies to every
provider.

Lookup for a (provider, model) pair, case-insensitive, in the provider's
own table, then the provider-neutral overrides, then the other providers'
tables (a custom provider serving `gpt-4o` is priced as `gpt-4o`):

1. the exact model name;
2. otherwise the longest table name that is a prefix of the model followed
   by `-`, so dated and aliased names find their family
   (`gpt-4o-mini-2024-07-18` → `gpt-4o-mini`, `claude-sonnet-4-20250514` →
   `claude-sonnet-4`) while `gpt-4o` never matches `gpt-4o-mini`.

**A model with no price is charged at the highest input price and the
highest output price known for its provider** (for a provider with no
priced model at all: the highest prices of the whole table). Credits are
operator money: an unknown model must never be cheaper than any real one.
`price_for` reports such a lookup as `known=False` so the caller can log it
once and the operator can add the model under `prices:`.

Costs are integer micro-USD, rounded up. Anthropic cache writes (billed at
1.25x input) and reads (0.1x) and OpenAI cached input (discounted) are all
charged at the plain input price, as `Usage` does not separate them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from typing import Final

from sidecar.catalog import CATALOG_PREFIXES
from sidecar.usage import Usage


@dataclass(frozen=True, slots=True)
class Price:
    """USD per 1M tokens."""

    input: float
    output: float


# List prices per 1M tokens, standard tier, as published by OpenAI and
# Anthropic in late 2025. Dated variants are listed only where their price
# differs from their family's.
_OPENAI: Final[Mapping[str, Price]] = {
    "gpt-5": Price(1.25, 10.00),
    "gpt-5-mini": Price(0.25, 2.00),
    "gpt-5-nano": Price(0.05, 0.40),
    "gpt-5-pro": Price(15.00, 120.00),
    "gpt-5.1": Price(1.25, 10.00),
    "gpt-5.1-codex-mini": Price(0.25, 2.00),
    "gpt-4.1": Price(2.00, 8.00),
    "gpt-4.1-mini": Price(0.40, 1.60),
    "gpt-4.1-nano": Price(0.10, 0.40),
    "gpt-4o": Price(2.50, 10.00),
    "gpt-4o-2024-05-13": Price(5.00, 15.00),
    "gpt-4o-mini": Price(0.15, 0.60),
    "gpt-4o-realtime-preview": Price(5.00, 20.00),
    "gpt-4o-mini-realtime-preview": Price(0.60, 2.40),
    "chatgpt-4o-latest": Price(5.00, 15.00),
    "gpt-4.5-preview": Price(75.00, 150.00),
    "gpt-4-turbo": Price(10.00, 30.00),
    "gpt-4": Price(30.00, 60.00),
    "gpt-3.5-turbo": Price(0.50, 1.50),
    "o1": Price(15.00, 60.00),
    "o1-mini": Price(1.10, 4.40),
    "o1-pro": Price(150.00, 600.00),
    "o3": Price(2.00, 8.00),
    "o3-pro": Price(20.00, 80.00),
    "o3-mini": Price(1.10, 4.40),
    "o3-deep-research": Price(10.00, 40.00),
    "o4-mini": Price(1.10, 4.40),
    "o4-mini-deep-research": Price(2.00, 8.00),
    "codex-mini-latest": Price(1.50, 6.00),
    "computer-use-preview": Price(3.00, 12.00),
    "text-embedding-3-small": Price(0.02, 0.0),
    "text-embedding-3-large": Price(0.13, 0.0),
    "text-embedding-ada-002": Price(0.10, 0.0),
}

_ANTHROPIC: Final[Mapping[str, Price]] = {
    "claude-opus-4-5": Price(5.00, 25.00),
    "claude-opus-4-1": Price(15.00, 75.00),
    "claude-opus-4": Price(15.00, 75.00),
    "claude-sonnet-4-5": Price(3.00, 15.00),
    "claude-sonnet-4": Price(3.00, 15.00),
    "claude-haiku-4-5": Price(1.00, 5.00),
    "claude-3-7-sonnet": Price(3.00, 15.00),
    "claude-3-5-sonnet": Price(3.00, 15.00),
    "claude-3-5-haiku": Price(0.80, 4.00),
    "claude-3-opus": Price(15.00, 75.00),
    "claude-3-haiku": Price(0.25, 1.25),
}

#: The day the built-in prices of the providers below (and the table as a whole) were taken.
PRICES_TAKEN: Final = "2026-11-27"

# "confirmed": seen on the provider's pricing page (or a dated transcription of it) in 2026;
# "unconfirmed": not found there, our best knowledge of the list price. A family entry
# (`gemini-2.5-flash`) also prices its dated and preview names; variants billed differently
# (image output, turbo tiers) are listed on their own so they never fall to a cheaper family.
_GOOGLE: Final[Mapping[str, Price]] = {
    "gemini-3.8-flash": Price(0.75, 3.75),  # confirmed; $1.50 / $7.50 from 2027-01-01
    "gemini-3.5-flash": Price(1.50, 9.00),  # confirmed
    "gemini-3.5-flash-lite": Price(0.30, 2.50),  # confirmed
    "gemini-3.1-pro": Price(2.00, 12.00),  # confirmed (prompts ≤ 200k; $4 / $18 above)
    "gemini-3-pro": Price(2.00, 12.00),  # unconfirmed
    "gemini-3-pro-image": Price(2.00, 120.00),  # output confirmed (image tokens), input unconfirmed
    "gemini-3-flash": Price(0.50, 3.00),  # unconfirmed
    "gemini-2.5-pro": Price(1.25, 10.00),  # input confirmed (prompts ≤ 200k), output unconfirmed
    "gemini-2.5-flash": Price(0.30, 2.50),  # input confirmed (text/image/video), output unconfirmed
    "gemini-2.5-flash-lite": Price(0.10, 0.40),  # output confirmed, input unconfirmed
    "gemini-2.5-flash-image": Price(0.30, 30.00),  # unconfirmed (image output tokens)
    "gemini-2.0-flash": Price(0.10, 0.40),  # unconfirmed
    "gemini-2.0-flash-lite": Price(0.075, 0.30),  # unconfirmed
    "gemini-embedding-001": Price(0.15, 0.0),  # unconfirmed
}

_DEEPSEEK: Final[Mapping[str, Price]] = {
    "deepseek-chat": Price(0.28, 0.42),  # unconfirmed (V3.2 list price, cache miss)
    "deepseek-reasoner": Price(0.28, 0.42),  # unconfirmed (V3.2 list price, cache miss)
    "deepseek-v4-pro": Price(1.32, 3.96),  # confirmed, peak hours, cache miss
    "deepseek-flash": Price(0.30, 1.20),  # confirmed, peak hours, cache miss
}

_MISTRAL: Final[Mapping[str, Price]] = {
    "mistral-large-latest": Price(0.50, 1.50),  # unconfirmed (Mistral Large 3)
    "mistral-large": Price(2.00, 6.00),  # unconfirmed (dated Large 2 releases)
    "mistral-medium-latest": Price(0.40, 2.00),  # unconfirmed
    "mistral-small-latest": Price(0.10, 0.30),  # unconfirmed
    "mistral-small": Price(0.10, 0.30),  # unconfirmed
    "codestral-latest": Price(0.30, 0.90),  # unconfirmed
    "codestral": Price(0.30, 0.90),  # unconfirmed
    "mistral-embed": Price(0.10, 0.0),  # unconfirmed
}

_XAI: Final[Mapping[str, Price]] = {
    "grok-4": Price(3.00, 15.00),  # confirmed (≤ 128k context)
    "grok-4.3": Price(1.25, 2.50),  # confirmed
    "grok-4-1-fast": Price(0.20, 0.50),  # confirmed
    "grok-4-fast": Price(0.20, 0.50),  # unconfirmed
    "grok-code-fast-1": Price(0.20, 1.50),  # unconfirmed
    "grok-3": Price(3.00, 15.00),  # confirmed
    "grok-3-mini": Price(0.30, 0.50),  # unconfirmed
}

_GROQ: Final[Mapping[str, Price]] = {
    "llama-3.3-70b-versatile": Price(0.59, 0.79),  # confirmed
    "llama-3.1-8b-instant": Price(0.05, 0.08),  # confirmed
}

_CEREBRAS: Final[Mapping[str, Price]] = {
    "llama-3.3-70b": Price(0.85, 1.20),  # unconfirmed
    "llama3.1-8b": Price(0.10, 0.10),  # unconfirmed
}

_PERPLEXITY: Final[Mapping[str, Price]] = {
    "sonar": Price(1.00, 1.00),  # confirmed; the per-request search fee is not charged
    "sonar-pro": Price(3.00, 15.00),  # confirmed
    "sonar-reasoning-pro": Price(2.00, 8.00),  # confirmed
    "sonar-deep-research": Price(2.00, 8.00),  # confirmed (token prices only)
}

_MOONSHOTAI: Final[Mapping[str, Price]] = {
    "kimi-k2-0905-preview": Price(0.60, 2.50),  # confirmed (cache miss)
    "kimi-k2-0711-preview": Price(0.60, 2.50),  # confirmed
    "kimi-k2-turbo-preview": Price(1.15, 8.00),  # confirmed
    "kimi-k2-thinking": Price(0.60, 2.50),  # confirmed
    "kimi-k2-thinking-turbo": Price(1.15, 8.00),  # confirmed
}

BUILTIN_PRICES: Final[Mapping[str, Mapping[str, Price]]] = {
    "openai": _OPENAI,
    "anthropic": _ANTHROPIC,
    "google": _GOOGLE,
    "deepseek": _DEEPSEEK,
    "mistral": _MISTRAL,
    "xai": _XAI,
    "groq": _GROQ,
    "cerebras": _CEREBRAS,
    "perplexity": _PERPLEXITY,
    "moonshotai": _MOONSHOTAI,
}

_CACHE_MAX: Final = 4096
_PICO_PER_MICRO: Final = 1_000_000


def _pico_per_token(usd_per_million: float) -> int:
    # USD per 1M tokens == micro-USD per token; keep 6 more decimals as an
    # exact integer (pico-USD per token), rounding up.
    exact = Decimal(repr(usd_per_million)) * _PICO_PER_MICRO
    return int(exact.to_integral_value(rounding=ROUND_CEILING))


@dataclass(frozen=True, slots=True)
class _Rate:
    price: Price
    known: bool
    input_pico: int
    output_pico: int

    @classmethod
    def of(cls, price: Price, known: bool) -> _Rate:
        return cls(price, known, _pico_per_token(price.input), _pico_per_token(price.output))


def _check(name: str, price: Price) -> None:
    for field, value in (("input", price.input), ("output", price.output)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"prices.{name}.{field}: expected a number")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"prices.{name}.{field}: expected a non-negative number")


def _guess_provider(model: str) -> str:
    """The built-in provider a `prices:` name belongs to (by the model catalog), or "" for any."""
    return next((pid for prefix, pid in CATALOG_PREFIXES if model.startswith(prefix)), "")


class PriceTable:
    """Built-in prices plus config overrides, with cached lookups."""

    __slots__ = ("_cache", "_fallback", "_global_fallback", "_tables")

    def __init__(self, overrides: Mapping[str, Price] | None = None) -> None:
        # Provider id -> model -> price; "" holds provider-neutral overrides.
        tables: dict[str, dict[str, Price]] = {
            provider: dict(table) for provider, table in BUILTIN_PRICES.items()
        }
        for name, price in (overrides or {}).items():
            _check(name, price)
            model = name.lower()
            tables.setdefault(_guess_provider(model), {})[model] = price
        self._tables = tables
        self._fallback = {
            provider: _Rate.of(_highest(table.values()), False)
            for provider, table in tables.items()
            if provider and table
        }
        self._global_fallback = _Rate.of(
            _highest(p for table in tables.values() for p in table.values()), False
        )
        self._cache: dict[tuple[str, str], _Rate] = {}

    def price_for(self, provider: str, model: str) -> tuple[Price, bool]:
        """The price of `model` at `provider`, and whether the table knows it."""
        rate = self._rate(provider, model)
        return rate.price, rate.known

    def cost_micro_usd(self, provider: str, model: str, usage: Usage) -> int:
        """The cost of `usage` in integer micro-USD, rounded up."""
        rate = self._rate(provider, model)
        pico = usage.input_tokens * rate.input_pico + usage.output_tokens * rate.output_pico
        return -(-pico // _PICO_PER_MICRO)

    def _rate(self, provider: str, model: str) -> _Rate:
        key = (provider, model)
        rate = self._cache.get(key)
        if rate is None:
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()  # model names come from callers: stay bounded
            rate = self._cache[key] = self._lookup(provider.lower(), model.lower())
        return rate

    def _lookup(self, provider: str, model: str) -> _Rate:
        order = [provider, ""] + [p for p in self._tables if p not in (provider, "")]
        for name in order:
            price = _match(self._tables.get(name, {}), model)
            if price is not None:
                return _Rate.of(price, True)
        return self._fallback.get(provider, self._global_fallback)


def _match(table: Mapping[str, Price], model: str) -> Price | None:
    price = table.get(model)
    if price is not None:
        return price
    # Longest family name first: `gpt-4o-mini-x` must not stop at `gpt-4o`.
    cut = model.rfind("-")
    while cut > 0:
        price = table.get(model[:cut])
        if price is not None:
            return price
        cut = model.rfind("-", 0, cut)
    return None


def _highest(prices: Iterable[Price]) -> Price:
    items = list(prices)
    if not items:
        return Price(0.0, 0.0)
    return Price(max(p.input for p in items), max(p.output for p in items))
