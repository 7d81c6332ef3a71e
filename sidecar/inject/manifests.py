"""`sidecar inject --dry-run`: inject into the pod templates of a multi-document YAML, offline.

Each template goes through the same `plan_injection` as the webhook, and the
same patch is applied, so the output is the pod the cluster would run.
Documents without a pod template come out unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import yaml

from sidecar.inject.annotations import SidecarSettings
from sidecar.inject.jsonpatch import apply_patch
from sidecar.inject.pod import Outcome, plan_injection

#: Where each workload kind keeps its pod template (a Pod is its own template).
TEMPLATE_PATHS: Final[dict[str, tuple[str, ...]]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
    "PodTemplate": ("template",),
}


class ManifestError(ValueError):
    """The input is not YAML."""


@dataclass(frozen=True, slots=True)
class DryRun:
    text: str
    #: "Kind/name: warning" for every template that asked for the sidecar and was refused.
    warnings: tuple[str, ...]
    injected: int


def inject_documents(text: str, defaults: SidecarSettings) -> DryRun:
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise ManifestError(f"not valid YAML: {_yaml_problem(exc)}") from None
    out: list[Any] = []
    warnings: list[str] = []
    injected = 0
    for doc in docs:
        if doc is None:
            continue
        new, doc_warnings, count = _inject_document(doc, defaults)
        out.append(new)
        warnings += doc_warnings
        injected += count
    return DryRun(yaml.safe_dump_all(out, sort_keys=False), tuple(warnings), injected)


def _inject_document(doc: Any, defaults: SidecarSettings) -> tuple[Any, list[str], int]:
    if isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
        items, warnings, count = [], [], 0
        for item in doc["items"]:
            new, w, c = _inject_document(item, defaults)
            items.append(new)
            warnings += w
            count += c
        return {**doc, "items": items}, warnings, count
    kind = doc.get("kind") if isinstance(doc, dict) else None
    path = TEMPLATE_PATHS.get(kind) if isinstance(kind, str) else None
    if path is None:
        return doc, [], 0
    template = _at(doc, path)
    if not isinstance(template, dict):
        return doc, [], 0
    decision = plan_injection(template, defaults)
    warnings = [f"{_label(doc)}: {w}" for w in decision.warnings]
    if decision.outcome is not Outcome.INJECTED:
        return doc, warnings, 0
    return _replaced(doc, path, apply_patch(template, decision.patch)), warnings, 1


def _at(node: Any, path: tuple[str, ...]) -> Any:
    for step in path:
        node = node.get(step) if isinstance(node, dict) else None
    return node


def _replaced(node: Any, path: tuple[str, ...], value: Any) -> Any:
    """`node` with the value at `path` replaced; `node` itself is not changed."""
    if not path:
        return value
    return {**node, path[0]: _replaced(node[path[0]], path[1:], value)}


def _label(doc: dict[str, Any]) -> str:
    metadata = doc.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    return f"{doc['kind']}/{name if isinstance(name, str) else '?'}"


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}" if mark is not None else ""
    return f"{getattr(exc, 'problem', None) or 'parse error'}{where}"
