"""Keeps a builder's conversation inside a share of its model's context window.

Old tool outputs are elided in blocks, and only when a request would pass the share: then
the oldest results go (each replaced by a stub naming the call that brings it back) until
the conversation is down to a lower watermark. Between two compactions every request
extends the one before, so a provider's prefix cache keeps serving it. A file read again
unchanged, while its first reading is still in the conversation, is answered with a stub.

Only what tools returned is ever rewritten: the door's request keys leave tool output out,
so a replayed conversation asks with the same keys however its outputs were elided.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field

from orchestrator import pools
from orchestrator.llm import wire
from orchestrator.llm.messages import Message, ToolCall, ToolSpec
from orchestrator.llm.quirks import DEFAULTS, ResolvedQuirks

Counter = Callable[[list[Message], list[ToolSpec] | None], int]

LOW_WATERMARK = 0.35
"""A compaction elides down to this share of the limit: rarely, and far enough each time."""
RESULT_SHARE = 0.25
"""One tool result may take at most this share of the limit; the rest is cut with a note."""
BYTES_PER_TOKEN = 3
"""Bytes a token covers at the least, for cutting one result to a token allowance."""
STUB_MIN_BYTES = 400
"""Results shorter than this are not worth eliding: the stub is nearly as long."""


@dataclass
class _Read:
    digest: str
    turn: int
    index: int


@dataclass
class ContextWindow:
    """The policy for one builder: `limit` tokens per request, counted by `count`."""

    limit: int
    count: Counter
    reads: dict[tuple[str, int], _Read] = field(default_factory=dict)
    compactions: int = 0
    elided: int = 0

    @classmethod
    def for_model(
        cls,
        litellm_model: str,
        window: int,
        share: float,
        *,
        tokenizer: bool,
        quirks: ResolvedQuirks = DEFAULTS,
    ) -> ContextWindow:
        """Tokens counted as the door counts a prompt (the model's tokenizer where litellm
        has one offline, else one token per byte)."""

        def count(messages: list[Message], tools: list[ToolSpec] | None) -> int:
            return wire.prompt_bound(litellm_model, tokenizer, messages, tools, quirks)

        return cls(limit=max(1, int(window * share)), count=count)

    async def fit(self, messages: list[Message], tools: list[ToolSpec] | None) -> int:
        """Elide old tool outputs in place when the request would pass the limit; returns
        the request's tokens as sent."""
        tokens = await pools.work(self.count, messages, tools)
        if tokens <= self.limit:
            return tokens
        self.compactions += 1
        target = int(self.limit * LOW_WATERMARK)
        size = len(json.dumps(wire.messages_to_wire(messages), ensure_ascii=False).encode())
        per_byte = tokens / max(size, 1)
        turn = _turn(messages) + 1  # the turn this request asks for
        calls = {c.id: c for m in messages if m.role == "assistant" for c in m.tool_calls}
        last = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=0)
        # The newest results (after the last reply) are what the model has not seen yet.
        candidates = [
            i
            for i, m in enumerate(messages[:last])
            if m.role == "tool"
            and len((m.content or "").encode()) >= STUB_MIN_BYTES
            and not (m.content or "").startswith("[elided")
        ]
        for i in candidates:
            if tokens <= target:
                break
            old = messages[i]
            stub = _stub(old, calls.get(old.tool_call_id or ""), turn)
            tokens -= int((len((old.content or "").encode()) - len(stub.encode())) * per_byte)
            messages[i] = old.model_copy(update={"content": stub})
            self.elided += 1
            self.reads = {k: r for k, r in self.reads.items() if r.index != i}
        return await pools.work(self.count, messages, tools)

    def tool_result(self, call: ToolCall, text: str, messages: list[Message]) -> str:
        """What goes back to the model for a successful call appended at `len(messages)`."""
        text = self._clip(call, text)
        if call.name != "read_file":
            return text
        try:
            args = call.parsed()
        except ValueError:
            return text
        offset = args.get("offset") or 0
        if not isinstance(offset, int):  # read_file refused it already; nothing to remember
            return text
        key = (posixpath.normpath(str(args.get("path", ""))), offset)
        digest = hashlib.sha256(text.encode()).hexdigest()
        turn = _turn(messages)
        seen = self.reads.get(key)
        if seen is not None and seen.digest == digest:
            return (
                f"[unchanged since turn {seen.turn}: {key[0]} is as read then, "
                "and that reading is still above]"
            )
        self.reads[key] = _Read(digest, turn, len(messages))
        return text

    def _clip(self, call: ToolCall, text: str) -> str:
        cap = int(self.limit * RESULT_SHARE) * BYTES_PER_TOKEN
        data = text.encode()
        if len(data) <= cap:
            return text
        kept = data[:cap]
        end = kept.rfind(b"\n") + 1 or len(kept)
        head = kept[:end].decode("utf-8", errors="ignore")
        how = ""
        if call.name == "read_file":
            try:
                start = int(call.parsed().get("offset") or 0)
            except (ValueError, TypeError):
                start = 0
            how = f"; read_file(path, offset={start + end}) reads on"
        return head + f"\n[… {len(data) - end} bytes cut to fit the context window{how}]"


def _turn(messages: list[Message]) -> int:
    return sum(1 for m in messages if m.role == "assistant")


def _stub(message: Message, call: ToolCall | None, turn: int) -> str:
    size = len((message.content or "").encode())
    again = f"{call.name}({call.arguments[:200]})" if call else f"{message.name or 'the tool'}"
    return (
        f"[elided at turn {turn} to stay inside the context window: {size} bytes of "
        f"{message.name or 'tool'} output; call {again} again if you need it]"
    )
