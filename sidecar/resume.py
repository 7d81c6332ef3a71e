"""Continuing a broken stream on another candidate (SPEC §9, `failover.resume`).

Pure code: no I/O. When a stream breaks after its first byte, the proxy asks
`prefill_body` for a request that sends the text relayed so far as a trailing
assistant message (a *prefill*), and relays the continuation through a
`StreamTracker(shape, splice=Splice(shape, broken_tracker, trimmed))`, which
rewrites the continuation's events so the caller sees one answer:

* CHAT: the continuation's events before its first content event (its role
  chunk) are dropped; later events go through as received.
* MESSAGES: `message_start` and `ping` are dropped; content block indices
  continue the caller's (a text block left open by the break is continued by
  the continuation's first text block, whose `content_block_start` is dropped).

Either way, whitespace trimmed from the prefill (providers reject a prefill
ending in whitespace) is not sent twice: if the continuation's first text
starts with it, that prefix is cut.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from sidecar.streams import NOT_TEXT, Shape, _serialise

if TYPE_CHECKING:
    from sidecar.streams import StreamTracker

__all__ = ["Splice", "prefill_body"]

_DROP: Final = b""


def prefill_body(
    shape: Shape, data: dict[str, Any], text: str, *, prefix_flag: bool = False
) -> tuple[dict[str, Any], str] | None:
    """The request body that continues an answer whose first `text` the caller already has.

    A shallow copy of `data` whose `messages` ends with an assistant message
    holding `text` with its trailing whitespace removed; the removed whitespace
    is returned too (give it to `Splice`). If the caller's own last message is
    already an assistant message (its own prefill), `text` is appended to it
    (string content: concatenated; list content: a new text block). `data` and
    its lists are never mutated. `prefix_flag` (OpenAI shape) also sets
    `"prefix": true` on that message, which DeepSeek and Mistral require.

    None when no such body can be built: a shape other than CHAT/MESSAGES, no
    `messages` list, or no text but whitespace — then nothing worth keeping was
    relayed, and the proxy should resend the original request instead (still
    through a `Splice(shape, tracker, "")` if the caller already has part of the
    stream, so its preamble is not repeated).
    """
    if shape not in (Shape.CHAT, Shape.MESSAGES):
        return None
    messages = data.get("messages")
    if not isinstance(messages, list):
        return None
    prefill = text.rstrip()
    if not prefill:
        return None
    trimmed = text[len(prefill) :]
    last = messages[-1] if messages else None
    if isinstance(last, dict) and last.get("role") == "assistant":
        content = last.get("content")
        message = dict(last)
        if isinstance(content, str):
            message["content"] = content + prefill
        elif isinstance(content, list):
            message["content"] = [*content, {"type": "text", "text": prefill}]
        else:
            message["content"] = prefill
        new_messages = [*messages[:-1], message]
    else:
        message = {"role": "assistant", "content": prefill}
        new_messages = [*messages, message]
    if prefix_flag and shape is Shape.CHAT:
        message["prefix"] = True
    body = dict(data)
    body["messages"] = new_messages
    return body, trimmed


class Splice:
    """Rewrites a continuation stream's events so they continue the caller's stream seamlessly.

    `original` is the tracker of the stream that broke (for a second break,
    the tracker of the continuation that broke: it carries all the text and
    the caller's block indices); `trimmed` is the whitespace `prefill_body`
    removed. The continuation's `StreamTracker` calls `chat`/`messages` for
    each parsed event; they may change the event in place and return None
    (forward as received), b"" (drop) or the bytes to send instead.
    """

    __slots__ = ("_begun", "_merging", "_offset", "_open", "_pending", "original", "shape")

    def __init__(self, shape: Shape, original: StreamTracker, trimmed: str) -> None:
        self.shape = shape
        self.original = original
        self._pending = trimmed  # whitespace the caller already has, not yet matched
        self._begun = False  # CHAT: the continuation's first content event was seen
        self._open = original.open_index if original.open_is_text else None
        # MESSAGES: continuation block i is caller block i + offset; with a text block
        # left open, the continuation's block 0 continues it.
        self._merging = self._open is not None
        self._offset = self._open if self._open is not None else original.next_index

    def _dedupe(self, text: str) -> str:
        """`text` without the part of the pending whitespace it starts with."""
        pending, self._pending = self._pending, ""
        if text.startswith(pending):
            return text[len(pending) :]
        if pending.startswith(text):
            self._pending = pending[len(text) :]
            return ""
        return text

    def chat(
        self, obj: dict[str, Any], first: dict[str, Any] | None, content: bool
    ) -> bytes | None:
        if not self._begun:
            if not content:
                return _DROP
            self._begun = True
        if not self._pending or first is None:
            return None
        delta = first.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else None
        if not isinstance(delta, dict) or not isinstance(text, str) or not text:
            if content:
                self._pending = ""
            return None
        cut = self._dedupe(text)
        if cut == text:
            return None
        delta["content"] = cut
        if (
            not cut
            and first.get("finish_reason") is None
            and len(obj.get("choices") or ()) == 1
            and not any(delta.get(k) for k in NOT_TEXT)
        ):
            return _DROP
        return _serialise(obj, named=False)

    def messages(self, obj: dict[str, Any]) -> bytes | None:
        kind = obj.get("type")
        if kind in ("message_start", "ping"):
            return _DROP
        index = obj.get("index")
        if kind not in ("content_block_start", "content_block_delta", "content_block_stop"):
            return None
        if type(index) is not int:
            return None
        prefix = b""
        changed = False
        if kind == "content_block_start" and index == 0 and self._merging:
            self._merging = False
            block = obj.get("content_block")
            if isinstance(block, dict) and block.get("type") == "text":
                text = block.get("text")
                obj["index"] = self._offset
                if not isinstance(text, str) or not text:
                    return _DROP
                cut = self._dedupe(text) if self._pending else text
                block["text"] = cut
                if not cut:
                    return _DROP
                # The caller's block is already open: its text arrives as a delta.
                as_delta = {
                    "type": "content_block_delta",
                    "index": self._offset,
                    "delta": {"type": "text_delta", "text": cut},
                }
                return _serialise(as_delta, named=True)
            # Not text: close the caller's open text block; this one starts after it.
            assert self._open is not None
            stop = {"type": "content_block_stop", "index": self._open}
            prefix = _serialise(stop, named=True)
            self._offset = self._open + 1
        if self._offset:
            obj["index"] = index + self._offset
            changed = True
        if kind == "content_block_delta" and self._pending:
            delta = obj.get("delta")
            if isinstance(delta, dict) and delta.get("type") == "text_delta":
                text = delta.get("text")
                if isinstance(text, str) and text:
                    cut = self._dedupe(text)
                    if cut != text:
                        delta["text"] = cut  # the tracker reads the text after this
                        if not cut:
                            return _DROP
                        changed = True
            else:
                self._pending = ""
        if not changed and not prefix:
            return None
        return prefix + _serialise(obj, named=True)
