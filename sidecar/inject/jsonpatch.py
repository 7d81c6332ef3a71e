"""RFC 6901 pointers and the RFC 6902 operations the injector emits: `add` and `replace`."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

Op = dict[str, Any]


class PatchError(ValueError):
    """A patch operation that does not apply to the document."""


def escape(token: str) -> str:
    """One pointer token: `~` as `~0`, then `/` as `~1` (RFC 6901 section 3)."""
    return token.replace("~", "~0").replace("/", "~1")


def unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def pointer(*tokens: str | int) -> str:
    """`pointer("metadata", "annotations", "a/b")` is `/metadata/annotations/a~1b`."""
    return "".join("/" + escape(str(t)) for t in tokens)


def add(path: str, value: Any) -> Op:
    return {"op": "add", "path": path, "value": value}


def replace(path: str, value: Any) -> Op:
    return {"op": "replace", "path": path, "value": value}


def apply_patch(doc: Any, ops: Sequence[Mapping[str, Any]]) -> Any:
    """A copy of `doc` with `ops` applied in order; the input is never changed."""
    out = copy.deepcopy(doc)
    for op in ops:
        out = _apply(out, op)
    return out


def _apply(doc: Any, op: Mapping[str, Any]) -> Any:
    kind, path = op.get("op"), op.get("path")
    if kind not in ("add", "replace") or not isinstance(path, str) or "value" not in op:
        raise PatchError(f"unsupported operation {kind!r}")
    value = copy.deepcopy(op["value"])
    if path == "":
        return value
    if not path.startswith("/"):
        raise PatchError(f"{path!r}: not a JSON pointer")
    *parents, last = [unescape(t) for t in path[1:].split("/")]
    target = doc
    for token in parents:
        target = _child(target, token, path)
    if isinstance(target, dict):
        if kind == "replace" and last not in target:
            raise PatchError(f"{path}: nothing to replace")
        target[last] = value
    elif isinstance(target, list):
        if kind == "add" and last == "-":
            target.append(value)
            return doc
        index = _index(last, len(target) + (kind == "add"), path)
        if kind == "add":
            target.insert(index, value)
        else:
            target[index] = value
    else:
        raise PatchError(f"{path}: parent is neither an object nor an array")
    return doc


def _child(node: Any, token: str, path: str) -> Any:
    if isinstance(node, dict):
        if token not in node:
            raise PatchError(f"{path}: no member {token!r}")
        return node[token]
    if isinstance(node, list):
        return node[_index(token, len(node), path)]
    raise PatchError(f"{path}: cannot descend into a scalar")


def _index(token: str, bound: int, path: str) -> int:
    # RFC 6901: array indexes are decimal digits without leading zeros.
    if not token.isascii() or not token.isdigit() or (token != "0" and token.startswith("0")):
        raise PatchError(f"{path}: {token!r} is not an array index")
    index = int(token)
    if index >= bound:
        raise PatchError(f"{path}: index {index} out of range")
    return index
