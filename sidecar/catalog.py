"""The built-in providers (docs/reference.md#built-in-providers): one table.

Each row is a provider the sidecar knows without configuration: its id, default
base URL (overridable with `providers[].base_url`), wire format, how its key is
sent, the model-name prefixes that route to it, and the well-known models
`GET /v1/models` lists for it when the config gives none. Adding an
OpenAI-compatible host is one row here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

Format = Literal["openai", "anthropic", "gemini"]
Auth = Literal["bearer", "x-api-key", "api-key", "x-goog-api-key", "none"]
FORMATS: Final = ("openai", "anthropic", "gemini")
AUTHS: Final = ("bearer", "x-api-key", "api-key", "x-goog-api-key", "none")


@dataclass(frozen=True, slots=True)
class BuiltinProvider:
    base_url: str
    format: Format
    auth: Auth
    #: model-name prefixes that route to this provider (`deepseek-` → deepseek)
    prefixes: tuple[str, ...] = ()
    #: listed by `GET /v1/models` when the config gives the provider no `models:`
    listed: tuple[str, ...] = ()


BUILTIN_PROVIDERS: Final[Mapping[str, BuiltinProvider]] = {
    "openai": BuiltinProvider(
        "https://api.openai.com/v1", "openai", "bearer",
        ("gpt-", "o1", "o3", "o4", "chatgpt-", "codex-", "text-embedding-", "davinci-",
         "babbage-", "omni-moderation-"),
        ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "o3-mini", "o4-mini",
         "text-embedding-3-small", "text-embedding-3-large"),
    ),
    "anthropic": BuiltinProvider(
        "https://api.anthropic.com/v1", "anthropic", "x-api-key", ("claude-",),
        ("claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-1", "claude-3-5-haiku-latest"),
    ),
    # The Gemini API in its own format (`/models/{model}:generateContent`), key in x-goog-api-key.
    "google": BuiltinProvider(
        "https://generativelanguage.googleapis.com/v1beta", "gemini", "x-goog-api-key",
        ("gemini-",),
        ("gemini-2.5-pro", "gemini-2.5-flash", "gemini-2.5-flash-lite", "gemini-2.0-flash"),
    ),
    # Azure OpenAI: OpenAI's format at the resource's own URL (so no default), the key in
    # `api-key`, deployments as models. A resource URL (`https://RESOURCE.openai.azure.com`)
    # gets the deployment routes (`/openai/deployments/{model}/…?api-version=`); a URL ending
    # in `/openai/v1` is Azure's v1 API, which takes the model in the body.
    "azure": BuiltinProvider("", "openai", "api-key"),
    # OpenAI-compatible hosts: chat completions (and what else each serves) in OpenAI's format.
    "deepseek": BuiltinProvider(
        "https://api.deepseek.com/v1", "openai", "bearer", ("deepseek-",),
        ("deepseek-chat", "deepseek-reasoner"),
    ),
    "groq": BuiltinProvider(
        "https://api.groq.com/openai/v1", "openai", "bearer", (),
        ("llama-3.3-70b-versatile", "llama-3.1-8b-instant"),
    ),
    "mistral": BuiltinProvider(
        "https://api.mistral.ai/v1", "openai", "bearer", ("mistral-", "codestral-"),
        ("mistral-large-latest", "mistral-small-latest", "codestral-latest"),
    ),
    "xai": BuiltinProvider(
        "https://api.x.ai/v1", "openai", "bearer", ("grok-",), ("grok-4", "grok-3", "grok-3-mini"),
    ),
    "openrouter": BuiltinProvider("https://openrouter.ai/api/v1", "openai", "bearer"),
    "together": BuiltinProvider("https://api.together.xyz/v1", "openai", "bearer"),
    "fireworks": BuiltinProvider("https://api.fireworks.ai/inference/v1", "openai", "bearer"),
    "cerebras": BuiltinProvider(
        "https://api.cerebras.ai/v1", "openai", "bearer", (), ("llama-3.3-70b", "llama3.1-8b"),
    ),
    "perplexity": BuiltinProvider(
        "https://api.perplexity.ai", "openai", "bearer", (), ("sonar", "sonar-pro"),
    ),
    "moonshotai": BuiltinProvider(
        "https://api.moonshot.ai/v1", "openai", "bearer", (), ("kimi-k2-0905-preview",),
    ),
}  # fmt: skip

#: Managed (operator) keys exist for these providers only.
MANAGED_PROVIDERS: Final = ("openai", "anthropic", "google")

#: The `api-version` an Azure resource URL gets when `query_params` names none.
AZURE_API_VERSION: Final = "2024-10-21"

#: (prefix, provider) in table order: the built-in routing of model names.
CATALOG_PREFIXES: Final = tuple(
    (prefix, pid) for pid, row in BUILTIN_PROVIDERS.items() for prefix in row.prefixes
)

#: provider → the well-known models `GET /v1/models` lists for it.
CATALOG_LISTED: Final[Mapping[str, tuple[str, ...]]] = {
    pid: row.listed for pid, row in BUILTIN_PROVIDERS.items() if row.listed
}
