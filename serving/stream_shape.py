"""A response's text and stream chunks, handed out as stock vLLM (0.32) hands them out.

Benchmark clients (vLLM's ``bench serve``, AIPerf, guidellm) count every streamed chunk
that has ``choices`` as one emission: the first is TTFT, each later one an inter-token
gap. So a server whose stream is shaped differently (an extra chunk for the finish
reason, the chat role chunk before there is any output) gets different numbers from
them than its own telemetry stores. This module is the shape, pure and unit-tested
against chunks recorded from vLLM's own serving code
(``tests/unit/serving/fixtures/vllm_shapes.json``):

- one chunk per engine step that produced output, its text possibly empty (a step
  whose text is held back behind a pending stop string, or whose only token is the EOS
  that ended the request);
- ``finish_reason`` (and ``stop_reason``) on the chunk of the step that finished;
- chat: the role chunk (``delta: {"role": "assistant", "content": ""}``) with the first
  output, right before that output's own chunk;
- the usage chunk (empty ``choices``) only with ``stream_options.include_usage``, then
  ``[DONE]``; ``system_fingerprint`` on the last message.

:class:`OutputText` applies stop strings as vLLM's detokenizer does: the text is cut
where a stop string starts (or after it, with ``include_stop_str_in_output``), and while
one may still be completing, the last ``len(longest stop) - 1`` characters are held
back, to be released when the request finishes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tokentrace.serving import openai_protocol as P

__all__ = ["OutputText", "StreamShaper", "TextDelta"]


@dataclass(frozen=True)
class TextDelta:
    """What one step adds to the client's text; ``stop`` is the stop string it matched
    (the request finishes with ``finish_reason`` ``stop``), else None."""

    text: str
    stop: str | None = None


class OutputText:
    """The text of one request as the client gets it, step by step. Not thread-safe."""

    def __init__(self, stop: Sequence[str] = (), include_stop_str_in_output: bool = False) -> None:
        if any(not s for s in stop):
            raise ValueError(f"stop strings must not be empty, got {list(stop)!r}")
        self._stop = tuple(stop)
        self._include = include_stop_str_in_output
        self._hold = 0 if include_stop_str_in_output or not stop else max(map(len, stop)) - 1
        self._text = ""
        self._sent = 0
        self.stopped: str | None = None

    @property
    def text(self) -> str:
        """All text so far (cut at a matched stop string)."""
        return self._text

    def add(self, new_text: str, finished: bool = False) -> TextDelta:
        """The step's new text → what to send now. ``finished``: the request ends with
        this step (EOS, length), so nothing is held back."""
        if self.stopped is not None:
            raise RuntimeError(f"the request already stopped at {self.stopped!r}")
        self._text += new_text
        for stop in self._stop:
            # Only where the new text could complete it: as vLLM's check_stop_strings.
            at = self._text.find(stop, max(0, len(self._text) - len(new_text) - len(stop) + 1))
            if at < 0:
                continue
            self._text = self._text[: at + len(stop) if self._include else at]
            self.stopped = stop
            finished = True
            break
        end = len(self._text) if finished else max(self._sent, len(self._text) - self._hold)
        delta = self._text[self._sent : end]
        self._sent = end
        return TextDelta(delta, self.stopped)


class StreamShaper:
    """The chunks of one streamed completion or chat response, in order. Not
    thread-safe; one per response.

    :meth:`output` gives each engine step's chunks as ``(chunk, carries_tokens)``:
    ``carries_tokens`` is False for the chat role chunk, which is an emission the client
    sees but holds none of the step's tokens. :meth:`end` gives the usage chunk (when
    asked for) and ``[DONE]``.
    """

    def __init__(
        self,
        *,
        chat: bool,
        request_id: str,
        model: str,
        include_usage: bool,
        fingerprint: str | None,
        created: int | None = None,
    ) -> None:
        self.chat = chat
        self.request_id = request_id
        self.model = model
        self.include_usage = include_usage
        self.fingerprint = fingerprint
        self.created = int(time.time()) if created is None else created
        self._started = False
        self.finished = False

    def output(
        self,
        text: str,
        finish_reason: str | None = None,
        stop_reason: str | int | None = None,
    ) -> list[tuple[dict[str, Any], bool]]:
        """The chunks for one engine step's output (``text`` possibly empty)."""
        if self.finished:
            raise RuntimeError("the response already finished")
        out: list[tuple[dict[str, Any], bool]] = []
        if self.chat and not self._started:
            out.append((P.chat_role_chunk(self.request_id, self.model, self.created), False))
        self._started = True
        # The fingerprint goes on the stream's last message: this chunk unless a usage
        # chunk follows.
        fingerprint = (
            self.fingerprint if finish_reason is not None and not self.include_usage else None
        )
        make = P.chat_chunk if self.chat else P.completion_chunk
        chunk = make(
            self.request_id,
            self.model,
            text,
            finish_reason,
            self.created,
            stop_reason=stop_reason,
            fingerprint=fingerprint,
        )
        out.append((chunk, True))
        self.finished = finish_reason is not None
        return out

    def end(self, prompt_tokens: int, completion_tokens: int) -> list[dict[str, Any] | str]:
        """What follows the finishing chunk: the usage chunk if asked for, ``[DONE]``."""
        tail: list[dict[str, Any] | str] = []
        if self.include_usage:
            tail.append(
                P.usage_chunk(
                    self.request_id,
                    self.model,
                    prompt_tokens,
                    completion_tokens,
                    self.chat,
                    self.created,
                    fingerprint=self.fingerprint,
                )
            )
        tail.append(P.DONE)
        return tail
