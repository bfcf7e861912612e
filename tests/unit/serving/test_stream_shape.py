"""tokentrace's stream chunks against the ones stock vLLM sends for the same engine
steps: recorded from vLLM's own serving code (``fixtures/record_vllm_shapes.py``), so
the comparison is with vLLM, not with anyone's memory of it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tokentrace.serving import openai_protocol as P
from tokentrace.serving.stream_shape import OutputText, StreamShaper

FIXTURES = json.loads((Path(__file__).parent / "fixtures/vllm_shapes.json").read_text())
SCENARIOS: dict[str, Any] = FIXTURES["scenarios"]
FINGERPRINT = "vllm-fingerprint"
PROMPT_TOKENS = 5


def _normalized(events: list[Any]) -> list[Any]:
    """Events with the one field that depends on when they were made, ``created``, fixed."""
    return [{**e, "created": 0} if isinstance(e, dict) else e for e in events]


def _stream(chat: bool, steps: list[Any], include_usage: bool) -> list[Any]:
    shaper = StreamShaper(
        chat=chat,
        request_id="chatcmpl-x" if chat else "cmpl-x",
        model="m",
        include_usage=include_usage,
        fingerprint=FINGERPRINT,
        created=0,
    )
    events: list[Any] = []
    tokens = 0
    for text, token_ids, finish, stop in steps:
        events += [chunk for chunk, _ in shaper.output(text, finish, stop)]
        tokens += len(token_ids)
    return events + shaper.end(PROMPT_TOKENS, tokens)


@pytest.mark.parametrize("steps", sorted(FIXTURES["steps"]))
@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
@pytest.mark.parametrize("options", ["plain", "usage"])
def test_streams_are_chunk_for_chunk_vllms(steps: str, chat: bool, options: str) -> None:
    kind = "chat" if chat else "completion"
    expected = SCENARIOS[f"{kind}/{steps}/{options}"]
    got = _stream(chat, FIXTURES["steps"][steps], options == "usage")
    assert _normalized(got) == _normalized(expected)
    # Key order too: what goes on the wire is the same bytes but for "created".
    wire = [P.sse_event(e) for e in _normalized(got)]
    assert wire == [P.sse_event(e) for e in _normalized(expected)]


@pytest.mark.parametrize("steps", sorted(FIXTURES["steps"]))
@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
def test_responses_are_vllms(steps: str, chat: bool) -> None:
    kind = "chat" if chat else "completion"
    expected = SCENARIOS[f"{kind}/{steps}/response"]
    step_list = FIXTURES["steps"][steps]
    make = P.chat_response if chat else P.completion_response
    got = make(
        "chatcmpl-x" if chat else "cmpl-x",
        "m",
        "".join(s[0] for s in step_list),
        step_list[-1][2],
        PROMPT_TOKENS,
        sum(len(s[1]) for s in step_list),
        created=0,
        stop_reason=step_list[-1][3],
        fingerprint=FINGERPRINT,
    )
    assert json.dumps({**got, "created": 0}) == json.dumps({**expected, "created": 0})


def test_the_role_chunk_carries_no_tokens_and_comes_with_the_first_output() -> None:
    shaper = StreamShaper(
        chat=True, request_id="c", model="m", include_usage=False, fingerprint=None
    )
    first = shaper.output("a")
    assert [carries for _, carries in first] == [False, True]
    assert first[0][0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [carries for _, carries in shaper.output("b", "length")] == [True]
    with pytest.raises(RuntimeError):
        shaper.output("c")


def test_stop_strings_are_held_back_then_cut_as_vllm_does() -> None:
    text = OutputText(stop=["##", "END"])
    # While a stop string may still be completing, len(longest) - 1 chars wait.
    assert text.add("ab").text == ""
    assert text.add("c").text == "a"
    assert text.add("d#").text == "bc"
    done = text.add("#x")
    assert (done.text, done.stop) == ("d", "##") and text.text == "abcd"
    with pytest.raises(RuntimeError):
        text.add("y")


def test_a_request_that_ends_releases_what_was_held_back() -> None:
    text = OutputText(stop=["END"])
    assert text.add("xE").text == ""
    assert text.add("N", finished=True).text == "xEN"


def test_stop_strings_kept_in_the_output_when_asked() -> None:
    text = OutputText(stop=["##"], include_stop_str_in_output=True)
    assert text.add("a#").text == "a#"
    done = text.add("#b")
    assert (done.text, done.stop, text.text) == ("#", "##", "a##")


def test_without_stop_strings_every_step_goes_out_whole() -> None:
    text = OutputText()
    assert [text.add(c).text for c in "abc"] == ["a", "b", "c"]
