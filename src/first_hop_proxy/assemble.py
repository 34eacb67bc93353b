"""One JSON reply assembled from a stream's events (``stream_upstream``).

A CDN in front of an upstream cuts a non-streaming request whose first byte
takes too long (Cloudflare: 100 s, then a 524 page), though the same reply
streamed would have arrived. So a JSON request can go upstream as a stream;
its chunks are put back together here into the ``chat.completion`` the client
asked for: content, reasoning fields, tool calls (by index), ``finish_reason``,
``usage``, and the first event's ``id``, ``model`` and ``created``.
"""

from __future__ import annotations

from typing import Any

#: Text fields of a delta that are concatenated as they stream.
TEXT_FIELDS = ("content", "reasoning_content", "reasoning", "refusal")
HEAD_FIELDS = ("id", "model", "created", "system_fingerprint", "service_tier")


class _Choice:
    __slots__ = ("finish", "function", "parts", "role", "tools")

    def __init__(self) -> None:
        self.role: str | None = None
        self.parts: dict[str, list[str]] = {}
        self.tools: dict[int, dict[str, Any]] = {}
        self.function: dict[str, str] | None = None
        self.finish: Any = None

    def feed(self, delta: dict[str, Any]) -> None:
        role = delta.get("role")
        if self.role is None and isinstance(role, str):
            self.role = role
        for name in TEXT_FIELDS:
            text = delta.get(name)
            if isinstance(text, str):
                self.parts.setdefault(name, []).append(text)
        for call in delta.get("tool_calls") or ():
            if isinstance(call, dict):
                self._tool(call)
        legacy = delta.get("function_call")
        if isinstance(legacy, dict):
            function = self.function = self.function or {"name": "", "arguments": ""}
            for part in ("name", "arguments"):
                if isinstance(legacy.get(part), str):
                    function[part] += legacy[part]

    def _tool(self, call: dict[str, Any]) -> None:
        index = call.get("index", len(self.tools))
        index = index if isinstance(index, int) else len(self.tools)
        tool = self.tools.setdefault(
            index, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
        )
        if isinstance(call.get("id"), str):
            tool["id"] = call["id"]
        if isinstance(call.get("type"), str):
            tool["type"] = call["type"]
        function = call.get("function")
        if isinstance(function, dict):
            for part in ("name", "arguments"):
                if isinstance(function.get(part), str):
                    tool["function"][part] += function[part]

    def message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": self.role or "assistant"}
        text = {name: "".join(parts) for name, parts in self.parts.items()}
        message["content"] = text.pop("content", None if self.tools else "")
        message.update((name, value) for name, value in text.items() if value)
        if self.tools:
            message["tool_calls"] = [self.tools[i] for i in sorted(self.tools)]
        if self.function is not None:
            message["function_call"] = self.function
        return message


class Assembler:
    """Feed it a stream's parsed chunks in order; :meth:`result` is the JSON reply."""

    __slots__ = ("_choices", "_head", "_usage")

    def __init__(self) -> None:
        self._head: dict[str, Any] = {}
        self._choices: dict[int, _Choice] = {}
        self._usage: Any = None

    def feed(self, chunk: dict[str, Any]) -> None:
        for name in HEAD_FIELDS:
            if name in chunk and name not in self._head:
                self._head[name] = chunk[name]
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            slot = self._choices.setdefault(index if isinstance(index, int) else 0, _Choice())
            delta = choice.get("delta") or choice.get("message")
            if isinstance(delta, dict):
                slot.feed(delta)
            if choice.get("finish_reason") is not None:
                slot.finish = choice["finish_reason"]

    def result(self) -> dict[str, Any]:
        reply: dict[str, Any] = {"id": self._head.get("id", ""), "object": "chat.completion"}
        reply.update((k, v) for k, v in self._head.items() if k != "id")
        reply["choices"] = [
            {
                "index": i,
                "message": self._choices[i].message(),
                "finish_reason": self._choices[i].finish,
            }
            for i in sorted(self._choices)
        ]
        if self._usage is not None:
            reply["usage"] = self._usage
        return reply
