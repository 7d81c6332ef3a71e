"""Offline checks of deploy/grafana: the alert rules, the dashboard, and every PromQL query in them.

Every query is parsed by a small PromQL analyzer below, which checks it against the
metric table of docs/reference.md#metrics: metric names must be exported series, label names in
selectors, `by`/`without`, `on`/`ignoring` and alert templates must exist on the
series they apply to, `rate()` only runs over counters and `histogram_quantile()`
keeps `le`. `promtool` (Debian package `prometheus`) adds the real Prometheus parser
and the rule unit tests when it is on PATH; set SIDECAR_TEST_REQUIRE_PROMTOOL=1 to
make its absence a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

GRAFANA_DIR = Path(__file__).resolve().parent.parent / "deploy" / "grafana"
ALERTS_FILE = GRAFANA_DIR / "sidecar-alerts.yaml"
ALERT_TESTS_FILE = GRAFANA_DIR / "sidecar-alerts.test.yaml"
DASHBOARD_FILE = GRAFANA_DIR / "sidecar-dashboard.json"
RUNBOOK_FILE = GRAFANA_DIR.parent.parent / "docs" / "what-to-watch.md"

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


# --------------------------------------------------------------------------- the metric table
#
# docs/reference.md#metrics, transcribed. The sidecar has no importable constant for it yet; the
# end-to-end metrics test cross-checks the same names against a live /metrics.
# A label maps to the values it may take, or to None when they are open-ended.

_OUTCOMES = frozenset(
    {
        "ok",
        "rate_limited",
        "auth_failed",
        "server_error",
        "timeout",
        "connect_error",
        "client_error",
    }
)
_SOURCES = frozenset({"attached", "policy", "managed", "passthrough"})


@dataclass(frozen=True)
class _Family:
    type: str  # counter | gauge | histogram
    labels: dict[str, frozenset[str] | None]


SPEC_METRICS: dict[str, _Family] = {
    "sidecar_requests_total": _Family(
        "counter", {"format": None, "provider": None, "status": None}
    ),
    "sidecar_request_duration_seconds": _Family("histogram", {"format": None, "provider": None}),
    "sidecar_key_selections_total": _Family(
        "counter", {"provider": None, "source": _SOURCES, "key_id": None}
    ),
    "sidecar_upstream_attempts_total": _Family(
        "counter", {"provider": None, "source": _SOURCES, "key_id": None, "outcome": _OUTCOMES}
    ),
    "sidecar_failovers_total": _Family("counter", {"provider": None, "reason": _OUTCOMES - {"ok"}}),
    "sidecar_key_cooling_down": _Family(
        "gauge", {"provider": None, "source": _SOURCES, "key_id": None, "access_key": None}
    ),
    "sidecar_upstream_ttfb_seconds": _Family("histogram", {"provider": None}),
    "sidecar_overhead_seconds": _Family("histogram", {"format": None}),
    "sidecar_tokens_total": _Family(
        "counter", {"provider": None, "model": None, "kind": frozenset({"input", "output"})}
    ),
    "sidecar_credits_spent_usd_total": _Family("counter", {"access_key": None}),
    "sidecar_credits_remaining_usd": _Family("gauge", {"access_key": None}),
    "sidecar_no_key_available_total": _Family(
        "counter",
        {"provider": None, "reason": frozenset({"no_key", "all_cooling", "credits_exhausted"})},
    ),
    "sidecar_vault_reloads_total": _Family("counter", {"result": frozenset({"ok", "error"})}),
    "sidecar_vault_last_success_timestamp_seconds": _Family("gauge", {}),
    # Ledger health (issue #10): documented with the ledger in docs/credits.md.
    "sidecar_ledger_up": _Family("gauge", {}),
    "sidecar_ledger_errors_total": _Family("counter", {"operation": frozenset({"read", "write"})}),
    "sidecar_ledger_pending_spend_usd": _Family("gauge", {}),
}

# Shared state, rate limits and provider quota (issue #13, SPEC §11). These exist only under a
# config or an event the end-to-end workload does not set up: `sidecar_shared_state_up` only
# when `shared_state` is configured, `sidecar_rate_limited_total` once an access key hits its
# own limit, `sidecar_key_quota_remaining` while a provider's rate-limit headers are current.
CONDITIONAL_METRICS: dict[str, _Family] = {
    "sidecar_shared_state_up": _Family("gauge", {}),
    "sidecar_rate_limited_total": _Family(
        "counter", {"access_key": None, "limit": frozenset({"rpm", "tpm"})}
    ),
    "sidecar_key_quota_remaining": _Family(
        "gauge",
        {
            "provider": None,
            "source": _SOURCES,
            "key_id": None,
            "kind": frozenset({"requests", "tokens"}),
        },
    ),
}

ALL_METRICS: dict[str, _Family] = {**SPEC_METRICS, **CONDITIONAL_METRICS}

# Added by the Prometheus scrape config, so present on every series.
SCRAPE_LABELS = frozenset({"namespace", "pod", "job", "instance"})


@dataclass(frozen=True)
class _Series:
    family: str
    counter: bool
    labels: dict[str, frozenset[str] | None]


def _exported_series() -> dict[str, _Series]:
    """Every series name a query may use, as prometheus-client exports the families."""
    series: dict[str, _Series] = {}
    for name, fam in ALL_METRICS.items():
        if fam.type == "histogram":
            series[f"{name}_bucket"] = _Series(name, True, {**fam.labels, "le": None})
            series[f"{name}_sum"] = _Series(name, True, fam.labels)
            series[f"{name}_count"] = _Series(name, True, fam.labels)
        else:
            series[name] = _Series(name, fam.type == "counter", fam.labels)
    return series


QUERYABLE_SERIES = _exported_series()
# prometheus-client also exports `<name>_created` for counters and histograms, but
# PROMETHEUS_DISABLE_CREATED_SERIES turns them off, so no query may depend on them.
CREATED_SERIES = frozenset(
    f"{name.removesuffix('_total')}_created"
    for name, fam in ALL_METRICS.items()
    if fam.type in ("counter", "histogram")
)


# --------------------------------------------------------------------------- PromQL analyzer


class PromQLSyntaxError(ValueError):
    pass


@dataclass(frozen=True)
class _Tok:
    kind: str
    text: str
    pos: int


_TOKEN_RE = re.compile(
    r"""
    (?P<ws>\s+|\#[^\n]*)
  | (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<dur>(?:\d+(?:ms|[smhdwy]))+)(?![\w.])
  | (?P<num>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<op>==|!=|>=|<=|=~|!~|[-+*/%^<>=])
  | (?P<punct>[(){}\[\],:@])
    """,
    re.VERBOSE,
)


def _lex(expr: str) -> list[_Tok]:
    toks: list[_Tok] = []
    pos = 0
    while pos < len(expr):
        m = _TOKEN_RE.match(expr, pos)
        if m is None:
            raise PromQLSyntaxError(f"unexpected {expr[pos : pos + 10]!r} at offset {pos}")
        kind = m.lastgroup
        assert kind is not None
        if kind != "ws":
            toks.append(_Tok(m.group() if kind == "punct" else kind, m.group(), pos))
        pos = m.end()
    toks.append(_Tok("eof", "", len(expr)))
    return toks


_AGGREGATIONS = frozenset(
    {
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "topk",
        "bottomk",
        "quantile",
        "limitk",
        "limit_ratio",
    }
)
_PARAM_AGGREGATIONS = frozenset(
    {"count_values", "topk", "bottomk", "quantile", "limitk", "limit_ratio"}
)
_KEEP_LABELS_AGGREGATIONS = frozenset({"topk", "bottomk", "limitk", "limit_ratio"})
_KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "offset",
        "and",
        "or",
        "unless",
        "atan2",
    }
)
_BINARY_PRECEDENCE = {
    "or": 1,
    "and": 2,
    "unless": 2,
    "==": 3,
    "!=": 3,
    "<": 3,
    "<=": 3,
    ">": 3,
    ">=": 3,
    "+": 4,
    "-": 4,
    "*": 5,
    "/": 5,
    "%": 5,
    "atan2": 5,
    "^": 6,
}
_SET_OPS = frozenset({"and", "or", "unless"})
_COUNTER_RANGE_FUNCTIONS = frozenset({"rate", "irate", "increase", "resets"})
_GAUGE_RANGE_FUNCTIONS = frozenset({"delta", "idelta", "deriv", "predict_linear", "holt_winters"})
_RANGE_FUNCTIONS = (
    frozenset(
        {
            "avg_over_time",
            "min_over_time",
            "max_over_time",
            "sum_over_time",
            "count_over_time",
            "quantile_over_time",
            "stddev_over_time",
            "stdvar_over_time",
            "last_over_time",
            "present_over_time",
            "absent_over_time",
            "changes",
        }
    )
    | _COUNTER_RANGE_FUNCTIONS
    | _GAUGE_RANGE_FUNCTIONS
)
_ELEMENTWISE_FUNCTIONS = frozenset(
    {
        "abs",
        "ceil",
        "floor",
        "round",
        "clamp",
        "clamp_min",
        "clamp_max",
        "sqrt",
        "exp",
        "ln",
        "log2",
        "log10",
        "sgn",
        "timestamp",
        "sort",
        "sort_desc",
        "day_of_month",
        "day_of_week",
        "day_of_year",
        "days_in_month",
        "hour",
        "minute",
        "month",
        "year",
    }
)


@dataclass(frozen=True)
class _Type:
    kind: str  # scalar | string | vector | matrix
    labels: frozenset[str] = frozenset()
    raw_counter: bool = False  # samples straight from a counter series
    text: str = ""  # the value of a string literal


@dataclass
class Analysis:
    metric_names: list[str] = field(default_factory=list)
    # (metric name, {label: (operator, value)}) for every selector
    selectors: list[tuple[str, dict[str, tuple[str, str]]]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    result: _Type = _Type("scalar")


def _unquote(text: str) -> str:
    if text.startswith("`"):
        return text[1:-1]
    return re.sub(r"\\(.)", r"\1", text[1:-1])


class _Parser:
    """Recursive descent over PromQL that computes each subexpression's label set."""

    def __init__(self, expr: str) -> None:
        self._toks = _lex(expr)
        self._i = 0
        self.out = Analysis()

    # token helpers
    def _peek(self, ahead: int = 0) -> _Tok:
        return self._toks[min(self._i + ahead, len(self._toks) - 1)]

    def _next(self) -> _Tok:
        tok = self._peek()
        self._i += 1
        return tok

    def _expect(self, kind: str) -> _Tok:
        tok = self._next()
        if tok.kind != kind:
            raise PromQLSyntaxError(f"expected {kind!r}, got {tok.text!r} at offset {tok.pos}")
        return tok

    def _is_word(self, *words: str) -> bool:
        tok = self._peek()
        return tok.kind == "ident" and tok.text.lower() in words

    def _error(self, msg: str) -> None:
        self.out.errors.append(msg)

    # grammar
    def parse(self) -> Analysis:
        self.out.result = self._expr(1)
        if self._peek().kind != "eof":
            tok = self._peek()
            raise PromQLSyntaxError(f"unexpected {tok.text!r} at offset {tok.pos}")
        return self.out

    def _expr(self, min_prec: int) -> _Type:
        lhs = self._unary()
        while True:
            tok = self._peek()
            op = tok.text.lower() if tok.kind in ("op", "ident") else ""
            prec = _BINARY_PRECEDENCE.get(op)
            if prec is None or prec < min_prec:
                return lhs
            self._next()
            returns_bool = False
            if self._is_word("bool"):
                self._next()
                returns_bool = True
            matching = self._vector_matching()
            if op in _SET_OPS and matching is not None and matching[2]:
                raise PromQLSyntaxError(f"no group_left/group_right with {op!r}")
            rhs = self._expr(prec if op == "^" else prec + 1)
            lhs = self._binary(op, lhs, rhs, returns_bool, matching)

    def _unary(self) -> _Type:
        if self._peek().kind == "op" and self._peek().text in "+-":
            self._next()
            operand = self._expr(_BINARY_PRECEDENCE["^"])
            return _Type(operand.kind, operand.labels)
        return self._postfix(*self._primary())

    def _primary(self) -> tuple[_Type, bool]:
        """The operand and whether it is a plain series selector."""
        tok = self._peek()
        if tok.kind == "num":
            self._next()
            return _Type("scalar"), False
        if tok.kind == "str":
            self._next()
            return _Type("string", text=_unquote(tok.text)), False
        if tok.kind == "(":
            self._next()
            inner = self._expr(1)
            self._expect(")")
            return _Type(inner.kind, inner.labels), False  # (selector)[5m] is not a range
        if tok.kind == "{":
            raise PromQLSyntaxError(f"selector without a metric name at offset {tok.pos}")
        if tok.kind != "ident":
            raise PromQLSyntaxError(f"unexpected {tok.text!r} at offset {tok.pos}")
        word = tok.text.lower()
        if word in ("inf", "nan"):
            self._next()
            return _Type("scalar"), False
        if word in _AGGREGATIONS and (
            self._peek(1).kind == "(" or self._peek(1).text.lower() in ("by", "without")
        ):
            self._next()
            return self._aggregation(word), False
        if self._peek(1).kind == "(":
            self._next()
            return self._call(tok.text), False
        if word in _KEYWORDS:
            raise PromQLSyntaxError(f"unexpected keyword {tok.text!r} at offset {tok.pos}")
        return self._selector(), True

    def _postfix(self, value: _Type, is_selector: bool) -> _Type:
        """`[range]`, `[range:step]`, `offset` and `@`; a plain [range] only right after a selector."""
        while True:
            if self._peek().kind == "[":
                self._next()
                self._expect("dur")
                if self._peek().kind == ":":  # subquery
                    self._next()
                    if self._peek().kind == "dur":
                        self._next()
                    self._expect("]")
                    if value.kind != "vector":
                        self._error(f"subquery over a {value.kind}")
                    value = _Type("matrix", value.labels)
                else:
                    self._expect("]")
                    if not is_selector:
                        self._error("a [range] needs a plain series selector")
                    value = _Type("matrix", value.labels, value.raw_counter)
            elif self._is_word("offset"):
                self._next()
                if self._peek().text == "-":
                    self._next()
                self._expect("dur")
            elif self._peek().kind == "@":
                self._next()
                if self._peek().kind == "num":
                    self._next()
                else:
                    self._expect("ident")
                    self._expect("(")
                    self._expect(")")
            else:
                return value
            is_selector = False

    def _selector(self) -> _Type:
        name = self._expect("ident").text
        matchers: dict[str, tuple[str, str]] = {}
        if self._peek().kind == "{":
            self._next()
            while self._peek().kind != "}":
                label = self._expect("ident").text
                op = self._expect("op").text
                if op not in ("=", "!=", "=~", "!~"):
                    raise PromQLSyntaxError(f"bad matcher operator {op!r}")
                matchers[label] = (op, _unquote(self._expect("str").text))
                if self._peek().kind == ",":
                    self._next()
            self._expect("}")
        self.out.metric_names.append(name)
        self.out.selectors.append((name, matchers))
        series = QUERYABLE_SERIES.get(name)
        if series is None:
            hint = " (_created series can be disabled)" if name in CREATED_SERIES else ""
            self._error(f"{name!r} is not an exported series{hint}")
            return _Type("vector", frozenset(matchers) | SCRAPE_LABELS)
        labels = frozenset(series.labels) | SCRAPE_LABELS
        for label, (op, value) in matchers.items():
            if label not in labels:
                self._error(f"{name} has no label {label!r} (it has {sorted(labels)})")
                continue
            allowed = series.labels.get(label)
            if allowed is not None and op in ("=", "!=") and value not in allowed:
                self._error(f"{name}: {label}={value!r} is not one of {sorted(allowed)}")
        return _Type("vector", labels, raw_counter=series.counter)

    def _label_list(self) -> frozenset[str]:
        self._expect("(")
        labels: set[str] = set()
        while self._peek().kind != ")":
            labels.add(self._expect("ident").text)
            if self._peek().kind == ",":
                self._next()
        self._expect(")")
        return frozenset(labels)

    def _args(self) -> list[_Type]:
        self._expect("(")
        args: list[_Type] = []
        while self._peek().kind != ")":
            args.append(self._expr(1))
            if self._peek().kind == ",":
                self._next()
            elif self._peek().kind != ")":
                tok = self._peek()
                raise PromQLSyntaxError(f"unexpected {tok.text!r} at offset {tok.pos}")
        self._expect(")")
        return args

    def _aggregation(self, op: str) -> _Type:
        grouping: tuple[str, frozenset[str]] | None = None
        if self._is_word("by", "without"):
            grouping = (self._next().text.lower(), self._label_list())
        args = self._args()
        if grouping is None and self._is_word("by", "without"):
            grouping = (self._next().text.lower(), self._label_list())
        if len(args) != (2 if op in _PARAM_AGGREGATIONS else 1):
            raise PromQLSyntaxError(
                f"{op}() takes {2 if op in _PARAM_AGGREGATIONS else 1} argument(s)"
            )
        inner = args[-1]
        if inner.kind != "vector":
            self._error(f"{op}() over a {inner.kind}")
        if grouping is not None:
            missing = grouping[1] - inner.labels
            if missing:
                self._error(
                    f"{op} {grouping[0]} ({', '.join(sorted(grouping[1]))}): {sorted(missing)} "
                    f"not on the aggregated series, which have {sorted(inner.labels)}"
                )
        if op in _KEEP_LABELS_AGGREGATIONS:
            labels = inner.labels
        elif grouping is None:
            labels = frozenset()
        elif grouping[0] == "by":
            labels = grouping[1]
        else:
            labels = inner.labels - grouping[1]
        if op == "count_values":
            labels = labels | {args[0].text}
        return _Type("vector", labels)

    def _call(self, name: str) -> _Type:
        args = self._args()
        vectors = [a for a in args if a.kind == "vector"]
        matrices = [a for a in args if a.kind == "matrix"]
        if name in _RANGE_FUNCTIONS:
            if len(matrices) != 1:
                self._error(f"{name}() needs one range vector")
                return _Type("vector")
            arg = matrices[0]
            if name in _COUNTER_RANGE_FUNCTIONS and not arg.raw_counter:
                self._error(f"{name}() over something that is not a counter")
            if name in _GAUGE_RANGE_FUNCTIONS and arg.raw_counter:
                self._error(f"{name}() over a counter; use rate() or increase()")
            return _Type("vector", frozenset() if name == "absent_over_time" else arg.labels)
        if name == "histogram_quantile":
            if len(args) != 2 or args[0].kind != "scalar" or args[1].kind != "vector":
                self._error("histogram_quantile(scalar, vector)")
                return _Type("vector")
            if "le" not in args[1].labels:
                self._error("histogram_quantile() over series without 'le': keep it in by (...)")
            return _Type("vector", args[1].labels - {"le"})
        if name in _ELEMENTWISE_FUNCTIONS:
            if (
                name
                not in (
                    "day_of_month",
                    "day_of_week",
                    "day_of_year",
                    "days_in_month",
                    "hour",
                    "minute",
                    "month",
                    "year",
                )
                and not vectors
            ):
                self._error(f"{name}() needs an instant vector")
            return _Type("vector", vectors[0].labels if vectors else frozenset())
        if name in ("time", "pi"):
            return _Type("scalar")
        if name == "scalar":
            return _Type("scalar")
        if name == "vector":
            return _Type("vector")
        if name == "absent":
            return _Type("vector")
        if name == "label_replace" and len(args) == 5 and vectors:
            if args[3].text and args[3].text not in vectors[0].labels:
                self._error(f"label_replace source label {args[3].text!r} not on the series")
            return _Type("vector", vectors[0].labels | {args[1].text})
        if name == "label_join" and len(args) >= 3 and vectors:
            return _Type("vector", vectors[0].labels | {args[1].text})
        self._error(f"unknown or misused function {name}()")
        return _Type("vector")

    def _vector_matching(self) -> tuple[str, frozenset[str], str, frozenset[str]] | None:
        """(on|ignoring, labels, group_left|group_right|"", extra labels) or None."""
        if not self._is_word("on", "ignoring"):
            if self._is_word("group_left", "group_right"):
                raise PromQLSyntaxError("group_left/group_right need on() or ignoring()")
            return None
        how = self._next().text.lower()
        labels = self._label_list()
        group, extra = "", frozenset[str]()
        if self._is_word("group_left", "group_right"):
            group = self._next().text.lower()
            if self._peek().kind == "(":
                extra = self._label_list()
        return how, labels, group, extra

    def _binary(
        self,
        op: str,
        lhs: _Type,
        rhs: _Type,
        returns_bool: bool,
        matching: tuple[str, frozenset[str], str, frozenset[str]] | None,
    ) -> _Type:
        if "string" in (lhs.kind, rhs.kind) or "matrix" in (lhs.kind, rhs.kind):
            self._error(f"operator {op!r} between {lhs.kind} and {rhs.kind}")
            return _Type("vector")
        if op in _SET_OPS and "scalar" in (lhs.kind, rhs.kind):
            self._error(f"{op!r} needs instant vectors on both sides")
            return _Type("vector", lhs.labels)
        if lhs.kind == "scalar" and rhs.kind == "scalar":
            return _Type("scalar")
        if lhs.kind == "scalar" or rhs.kind == "scalar":
            return _Type("vector", rhs.labels if lhs.kind == "scalar" else lhs.labels)
        if matching is None:
            if op == "or":
                return _Type("vector", lhs.labels | rhs.labels)
            if lhs.labels != rhs.labels:
                self._error(
                    f"{op!r} matches nothing: labels {sorted(lhs.labels)} vs {sorted(rhs.labels)}; "
                    "aggregate both sides alike or use on(...)"
                )
            return _Type("vector", lhs.labels)
        how, labels, group, extra = matching
        if how == "on":
            for side, value in (("left", lhs), ("right", rhs)):
                missing = labels - value.labels
                if missing:
                    self._error(
                        f"on ({', '.join(sorted(labels))}): {sorted(missing)} not on the {side} side"
                    )
        elif lhs.labels - labels != rhs.labels - labels:
            self._error(f"ignoring ({', '.join(sorted(labels))}): the two sides still differ")
        if group == "group_left":
            if extra - rhs.labels:
                self._error(f"group_left: {sorted(extra - rhs.labels)} not on the right side")
            return _Type("vector", lhs.labels | extra)
        if group == "group_right":
            if extra - lhs.labels:
                self._error(f"group_right: {sorted(extra - lhs.labels)} not on the left side")
            return _Type("vector", rhs.labels | extra)
        if op in _SET_OPS:
            return _Type("vector", lhs.labels)
        return _Type("vector", labels if how == "on" else lhs.labels - labels)


def analyze(expr: str) -> Analysis:
    """Parse one PromQL expression and check it against the metric table."""
    return _Parser(expr).parse()


# Grafana's own interval variables; `$namespace` and the like only occur inside strings.
_GRAFANA_MACROS = re.compile(r"\$\{?__(rate_interval|interval|range)(?:_ms|_s)?\}?")
_MACRO_VALUES = {"rate_interval": "5m", "interval": "1m", "range": "6h"}


def grafana_to_promql(expr: str) -> str:
    return _GRAFANA_MACROS.sub(lambda m: _MACRO_VALUES[m.group(1)], expr)


# --------------------------------------------------------------------------- loading


def _load_alerts() -> dict[str, Any]:
    with ALERTS_FILE.open() as f:
        doc = yaml.safe_load(f)
    assert isinstance(doc, dict)
    return doc


def _load_dashboard() -> dict[str, Any]:
    doc = json.loads(DASHBOARD_FILE.read_text())
    assert isinstance(doc, dict)
    return doc


def _alert_rules() -> list[dict[str, Any]]:
    return [rule for group in _load_alerts()["groups"] for rule in group["rules"]]


def _all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _all_panels(panel.get("panels", []))


def _dashboard_queries() -> list[tuple[str, str]]:
    return [
        (f"panel {panel['title']!r} {target['refId']}", target["expr"])
        for panel in _all_panels(_load_dashboard()["panels"])
        for target in panel.get("targets", [])
    ]


def _alert_queries() -> list[tuple[str, str]]:
    return [(f"alert {rule['alert']}", rule["expr"]) for rule in _alert_rules()]


def _runbook_queries() -> list[tuple[str, str]]:
    """The ```promql blocks of the on-call page, which must run as written."""
    if not RUNBOOK_FILE.exists():
        return []
    blocks = re.findall(r"```promql\n(.*?)```", RUNBOOK_FILE.read_text(), re.S)
    return [(f"{RUNBOOK_FILE.name} query {i}", block) for i, block in enumerate(blocks, 1)]


_LABEL_VALUES_RE = re.compile(
    r"^\s*label_values\((?P<selector>.+),\s*(?P<label>\w+)\s*\)\s*$", re.S
)


def _variable_queries() -> list[tuple[str, str, str]]:
    """(variable, selector, label) for each `label_values(...)` template variable."""
    out = []
    for var in _load_dashboard()["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = _LABEL_VALUES_RE.match(query)
        assert m, f"variable {var['name']}: expected label_values(selector, label), got {query!r}"
        out.append((var["name"], m["selector"], m["label"]))
    return out


# --------------------------------------------------------------------------- the analyzer itself


def test_analyzer_extracts_metric_names_only() -> None:
    result = analyze(
        'sum by (provider, le) (rate(sidecar_upstream_ttfb_seconds_bucket{provider=~"sum|rate", '
        'namespace="by"}[5m] offset 1h)) / on (provider) group_left () '
        "sum without (pod) (sidecar_upstream_ttfb_seconds_count)"
    )
    assert result.errors == []
    assert result.metric_names == [
        "sidecar_upstream_ttfb_seconds_bucket",
        "sidecar_upstream_ttfb_seconds_count",
    ]
    assert analyze("time() - 2 * 1e3 ^ -Inf").metric_names == []


@pytest.mark.parametrize(
    ("expr", "complaint"),
    [
        ("sidecar_requests_totl", "not an exported series"),
        ("sidecar_requests_created", "_created"),
        ("sidecar_request_duration_seconds", "not an exported series"),
        ('sidecar_overhead_seconds_count{provider="openai"}', "no label 'provider'"),
        ('sidecar_vault_reloads_total{result="failed"}', "not one of"),
        ("sum by (access_key) (rate(sidecar_requests_total[5m]))", "not on the aggregated series"),
        (
            "sum by (pod) (sum by (provider) (sidecar_key_cooling_down))",
            "not on the aggregated series",
        ),
        ("rate(sidecar_key_cooling_down[5m])", "not a counter"),
        ("deriv(sidecar_requests_total[5m])", "over a counter"),
        (
            "histogram_quantile(0.99, sum by (format) (rate(sidecar_overhead_seconds_bucket[5m])))",
            "without 'le'",
        ),
        (
            "sum by (provider) (rate(sidecar_failovers_total[5m])) / sum(rate(sidecar_requests_total[5m]))",
            "matches nothing",
        ),
        (
            "sidecar_credits_remaining_usd and on (provider) sidecar_credits_spent_usd_total",
            "not on the left side",
        ),
        ("rate(sum(sidecar_requests_total)[5m])", "plain series selector"),
        ("nonsense_function(sidecar_requests_total)", "unknown or misused function"),
    ],
)
def test_analyzer_rejects(expr: str, complaint: str) -> None:
    errors = analyze(expr).errors
    assert any(complaint in e for e in errors), errors


@pytest.mark.parametrize(
    "expr",
    [
        "sum(",
        "sidecar_requests_total{provider=}",
        '{__name__="x"}',
        "rate(x[5m]",
        "x and on (a) group_left () y",
        "sum by (a) (x) by (b)",
    ],
)
def test_analyzer_rejects_syntax(expr: str) -> None:
    with pytest.raises(PromQLSyntaxError):
        analyze(expr)


def test_grafana_macros_become_durations() -> None:
    assert grafana_to_promql("rate(x[$__rate_interval]) + y[${__range}]") == "rate(x[5m]) + y[6h]"


# --------------------------------------------------------------------------- every query


@pytest.mark.parametrize(
    ("where", "expr"),
    [
        pytest.param(where, expr, id=where)
        for where, expr in _dashboard_queries() + _alert_queries() + _runbook_queries()
    ],
)
def test_query_uses_exported_series_and_labels(where: str, expr: str) -> None:
    result = analyze(grafana_to_promql(expr))
    assert result.errors == [], f"{where}: {expr}"
    assert result.metric_names, f"{where} reads no sidecar metric"
    assert result.result.kind in ("vector", "scalar"), where


@pytest.mark.parametrize(("variable", "selector", "label"), _variable_queries())
def test_template_variable_queries(variable: str, selector: str, label: str) -> None:
    result = analyze(selector)
    assert result.errors == [], variable
    assert label in result.result.labels, f"${variable}: {label!r} is not a label of {selector}"


def test_dashboard_filters_every_selector_by_its_variables() -> None:
    for where, expr in _dashboard_queries():
        for name, matchers in analyze(grafana_to_promql(expr)).selectors:
            assert matchers.get("namespace") == ("=~", "$namespace"), f"{where}: {name}"
            if "provider" in QUERYABLE_SERIES[name].labels:
                assert matchers.get("provider") == ("=~", "$provider"), f"{where}: {name}"


def test_dashboard_ranges_follow_the_time_picker() -> None:
    for where, expr in _dashboard_queries():
        for rng in re.findall(r"\[([^\]]*)\]", expr):
            assert rng in ("$__rate_interval", "$__range"), f"{where}: [{rng}]"


def test_every_metric_is_on_the_dashboard() -> None:
    used = {
        QUERYABLE_SERIES[name].family
        for _, expr in _dashboard_queries()
        for name in analyze(grafana_to_promql(expr)).metric_names
    }
    assert set(ALL_METRICS) - used == set()


# --------------------------------------------------------------------------- dashboard structure


def test_dashboard_structure() -> None:
    dash = _load_dashboard()
    assert dash["uid"]
    assert dash["title"]
    assert isinstance(dash["schemaVersion"], int)
    assert 36 <= dash["schemaVersion"] <= 41

    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "provider"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"] == DATASOURCE

    panels = list(_all_panels(dash["panels"]))
    ids = [p["id"] for p in panels]
    assert all(isinstance(i, int) for i in ids)
    assert len(ids) == len(set(ids)), "panel ids must be unique"

    for panel in panels:
        pos = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= pos.keys(), panel["title"]
        assert all(isinstance(pos[k], int) and pos[k] >= 0 for k in "hwxy"), panel["title"]
        assert pos["w"] > 0, panel["title"]
        assert pos["h"] > 0, panel["title"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", DATASOURCE) == DATASOURCE, panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_dashboard_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in _all_panels(_load_dashboard()["panels"]):
        pos = panel["gridPos"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_dashboard_rows_hold_the_panels_below_them() -> None:
    """Top-level panels are listed in layout order, so each row owns the panels under it."""
    positions = [(p["gridPos"]["y"], p["gridPos"]["x"]) for p in _load_dashboard()["panels"]]
    assert positions == sorted(positions)


def test_shared_state_row() -> None:
    """The row of issue #13 shows the shared-state, rate-limit and quota families."""
    panels = _load_dashboard()["panels"]
    rows = [i for i, p in enumerate(panels) if p["type"] == "row"]
    start = next(i for i in rows if panels[i]["title"] == "Shared state & rate limits")
    end = next((i for i in rows if i > start), len(panels))
    families = {
        QUERYABLE_SERIES[name].family
        for panel in panels[start + 1 : end]
        for target in panel["targets"]
        for name in analyze(grafana_to_promql(target["expr"])).metric_names
    }
    assert families == set(CONDITIONAL_METRICS)


# --------------------------------------------------------------------------- alert rule schema

_DURATION_RE = re.compile(r"^(?:\d+y)?(?:\d+w)?(?:\d+d)?(?:\d+h)?(?:\d+m)?(?:\d+s)?(?:\d+ms)?$")
_NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_TEMPLATE_LABEL_RE = re.compile(r"\$labels\.([a-zA-Z_][a-zA-Z0-9_]*)")
EXPECTED_ALERTS = {
    "AllKeysCoolingDown",
    "HighFailoverRate",
    "NoKeyAvailable",
    "VaultReloadFailing",
    "CreditsNearlyExhausted",
    "LedgerFailing",
    "High5xxRate",
    "SidecarOverheadHigh",
    "SidecarSharedStateDown",
    "SidecarAccessKeyRateLimited",
}


def _is_duration(value: object) -> bool:
    return isinstance(value, str) and value != "" and _DURATION_RE.match(value) is not None


def test_alert_file_schema() -> None:
    doc = _load_alerts()
    assert set(doc) == {"groups"}
    assert isinstance(doc["groups"], list)
    assert doc["groups"]
    group_names = [g["name"] for g in doc["groups"]]
    assert len(group_names) == len(set(group_names))
    for group in doc["groups"]:
        assert set(group) <= {"name", "interval", "limit", "rules"}, group["name"]
        assert isinstance(group["name"], str)
        assert group["name"]
        if "interval" in group:
            assert _is_duration(group["interval"])
        assert isinstance(group["rules"], list)
        assert group["rules"]
        for rule in group["rules"]:
            _check_alert_rule(rule)
    assert {r["alert"] for r in _alert_rules()} == EXPECTED_ALERTS


def _check_alert_rule(rule: dict[str, Any]) -> None:
    name = rule.get("alert")
    assert isinstance(name, str), rule
    assert _NAME_RE.match(name), rule
    assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, name
    assert isinstance(rule["expr"], str), name
    assert rule["expr"].strip(), name
    assert _is_duration(rule["for"]), f"{name}: for={rule['for']!r}"
    labels = rule["labels"]
    assert all(
        isinstance(k, str) and _NAME_RE.match(k) and isinstance(v, str) for k, v in labels.items()
    )
    assert labels["severity"] in ("critical", "warning", "info"), name
    notes = rule["annotations"]
    for key in ("summary", "description", "runbook"):
        assert isinstance(notes.get(key), str), f"{name}: annotations.{key}"
        assert notes[key].strip(), f"{name}: annotations.{key}"
    assert all(isinstance(v, str) for v in notes.values()), name


def test_alert_templates_only_use_labels_the_alert_has() -> None:
    for rule in _alert_rules():
        available = analyze(rule["expr"]).result.labels | set(rule["labels"])
        for text in rule["annotations"].values():
            for label in _TEMPLATE_LABEL_RE.findall(text):
                assert label in available, f"{rule['alert']}: $labels.{label} is never set"


# --------------------------------------------------------------------------- promtool


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("SIDECAR_TEST_REQUIRE_PROMTOOL") == "1":
            pytest.fail("promtool not on PATH (Debian: apt-get install prometheus)")
        pytest.skip("promtool not on PATH")
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)


def test_every_alert_has_unit_tests_that_fire_and_stay_quiet() -> None:
    """promtool matches exp_alerts exactly; each alert needs a case where it fires and one where not."""
    doc = yaml.safe_load(ALERT_TESTS_FILE.read_text())
    evals = [e for case in doc["tests"] for e in case.get("alert_rule_test", [])]
    for alert in EXPECTED_ALERTS:
        outcomes = {bool(e["exp_alerts"]) for e in evals if e["alertname"] == alert}
        assert outcomes == {True, False}, f"{alert}: {outcomes}"


def test_promtool_check_rules() -> None:
    proc = _run(_promtool(), "check", "rules", str(ALERTS_FILE))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_rule_unit_tests() -> None:
    proc = _run(_promtool(), "test", "rules", str(ALERT_TESTS_FILE))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_parses_dashboard_and_runbook_queries(tmp_path: Path) -> None:
    """Prometheus' own parser, fed the queries as recording rules."""
    promtool = _promtool()
    queries = _dashboard_queries() + _runbook_queries()
    rules = [
        {"record": f"query:{i}", "expr": grafana_to_promql(expr)}
        for i, (_, expr) in enumerate(queries)
    ]
    rule_file = tmp_path / "queries.yaml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "queries", "rules": rules}]}))
    proc = _run(promtool, "check", "rules", str(rule_file))
    assert proc.returncode == 0, proc.stdout + proc.stderr
