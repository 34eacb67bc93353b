"""The pure parts of stream resume: the continuation request, the join, the chunks."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from first_hop_proxy.resume import (
    OVERLAP_WINDOW,
    Join,
    Seam,
    Transcript,
    add_usage,
    continuation_payload,
    join,
    overlap,
    restamp,
    restarted,
    says_nothing,
    text_of,
    trim,
)

from .fake_upstream import chunk

TALE = "Once upon a time, there was a dragon who lived in the castle."


# -- the continuation request ------------------------------------------------------------


def test_continuation_adds_the_text_so_far_as_the_assistant_message() -> None:
    payload = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "temperature": 1}
    out = continuation_payload(payload, "Hello there, ")
    assert out == {
        "model": "m",
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there,"},  # no trailing whitespace
        ],
        "temperature": 1,
    }
    assert payload["messages"] == [{"role": "user", "content": "Hi"}]  # untouched


def test_continuation_with_an_instruction_ends_with_it() -> None:
    payload = {"messages": [{"role": "user", "content": "Hi"}]}
    out = continuation_payload(payload, "Hello", "Continue exactly where you left off.")
    assert out["messages"][1:] == [
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Continue exactly where you left off."},
    ]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("She said:", "She said: Hello"),
        (
            [{"type": "text", "text": "She said:"}],
            [{"type": "text", "text": "She said:"}, {"type": "text", "text": " Hello"}],
        ),
    ],
)
def test_continuation_of_a_continue_request_extends_its_assistant_message(
    content: Any, expected: Any
) -> None:
    """SillyTavern's Continue ends with the assistant's text: the reply went on from it."""
    payload = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": content, "name": "Bot"},
        ]
    }
    out = continuation_payload(payload, " Hello ")
    assert out["messages"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": expected, "name": "Bot"},
    ]


# -- the join ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("delivered", "head", "cut"),
    [
        (TALE, " And then", 0),  # goes straight on
        (TALE, " the castle. And", 12),  # restates the last words
        (TALE, "castle. And then", 7),  # ...without their space
        (TALE, " lived in the castle. And", 21),
        (TALE, TALE + " The end", len(TALE)),  # restates all of a short reply
        ("We rode to the cas", "the castle gates.", 7),  # broke inside a word
        ("We rode to the cas", "tle gates.", 0),
        ("Hello ", " world", 1),  # the prefill left the space out: said again
        ("Hello\n\n", "\n\nNext", 2),
        ("Hello\n", "\n\nNext", 1),
        ("Hello", " world", 0),
        ("Wait.", ".. what?", 0),  # too short to be a restatement
        ("I saw a", " a bird", 0),  # one short word: kept, never eat real text
        ("The ending", "ing of it", 0),  # not where a word starts
        ("x" * 400 + " the end of it", " the end of it. Then", 14),
    ],
)
def test_overlap(delivered: str, head: str, cut: int) -> None:
    assert overlap(delivered, head) == cut
    assert join(delivered, head, final=True) == Join(cut=cut)


def test_overlap_looks_only_so_far_back() -> None:
    """A restated passage up to OVERLAP_WINDOW characters is cut; a longer one is not
    looked for (models restate a few words, not paragraphs)."""
    passage = " ".join(f"w{i:02d}" for i in range(100))  # 399 characters, no repeats
    delivered = "Start. " + passage
    fits = passage[-OVERLAP_WINDOW:]
    assert fits[0] == " "  # starts a word
    assert overlap(delivered, fits + " Next") == OVERLAP_WINDOW
    assert overlap(delivered, passage[-OVERLAP_WINDOW - 5 :] + " Next") == 0


@pytest.mark.parametrize(
    ("delivered", "head", "restart"),
    [
        ("x" * 300, "Once upon", False),
        (TALE + " It was old.", "Once upon a time, there was a dragon who", True),
        ("\n" + TALE + " It was old.", "  Once upon a time, there was a dragon who", True),
        (TALE + " It was old.", "Once upon a time, there was a cat", False),  # 30 < 32
        ("Once upon a time, a ", "Once upon a time, there was", True),  # 3/4 of a short reply
        ("Hi there", "Hi there, friend", False),  # a full restatement: a cut, not a restart
    ],
)
def test_restart(delivered: str, head: str, restart: bool) -> None:
    assert (restarted(delivered, head) > 0) is (restart or head.startswith(delivered))
    assert join(delivered, head, final=True) == (
        Join(restart=True) if restart else Join(cut=overlap(delivered, head))
    )


@pytest.mark.parametrize(
    ("head", "decided"),
    [
        ("Once", False),  # could be the reply's beginning again
        (" the", False),  # could be a longer restated passage
        (" ", False),
        (" And then", True),
        ("Once upon a time, there was a dragon who lived in a cave", True),
        (" the castle. And", True),
    ],
)
def test_join_waits_while_more_text_could_change_it(head: str, decided: bool) -> None:
    assert (join(TALE, head) is not None) is decided
    assert join(TALE, head, final=True) is not None


# -- chunks -----------------------------------------------------------------------------


def stamped(text: str | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {**chunk(text, finish), "id": "chatcmpl-2", "created": 2, "model": "m-2", **extra}


def test_restamp_takes_the_first_streams_identity_and_drops_the_role() -> None:
    event = stamped("Hi")
    event["choices"][0]["delta"]["role"] = "assistant"
    restamp(event, {"id": "chatcmpl-1", "model": "m", "created": 1})
    assert event["id"] == "chatcmpl-1" and event["model"] == "m" and event["created"] == 1
    assert event["choices"][0]["delta"] == {"content": "Hi"}


def test_trim_cuts_across_chunks_and_drops_emptied_ones() -> None:
    chunks = [stamped(""), stamped(" the"), stamped(" cas"), stamped("tle."), stamped(" On")]
    out = trim(chunks, 8)
    assert [text_of(c) for c in out] == ["tle.", " On"]


def test_trim_keeps_a_chunk_with_a_finish_reason() -> None:
    last = stamped(" end", finish="stop")
    out = trim([last], 4)
    assert out == [last] and text_of(last) == ""


@pytest.mark.parametrize(
    ("event", "nothing"),
    [
        (stamped(""), True),
        ({**stamped(""), "choices": [{"index": 0, "delta": {"role": None}}]}, True),
        (stamped("a"), False),
        (stamped(finish="stop"), False),
        ({"choices": [], "usage": {"completion_tokens": 1}}, False),
        ({"id": "x"}, False),
    ],
)
def test_says_nothing(event: dict[str, Any], nothing: bool) -> None:
    assert says_nothing(event) is nothing


def test_add_usage_counts_the_broken_streams_tokens() -> None:
    usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    event: dict[str, Any] = {"choices": [], "usage": usage}
    add_usage(event, 7)
    assert event["usage"] == {"prompt_tokens": 10, "completion_tokens": 12, "total_tokens": 22}
    assert usage["completion_tokens"] == 5  # the upstream's own object is not changed
    plain = stamped("a")
    add_usage(plain, 7)
    assert "usage" not in plain


# -- the reply so far -----------------------------------------------------------------


def data(event: dict[str, Any]) -> bytes:
    return orjson.dumps(event)


def test_transcript_keeps_the_text_and_the_first_identity() -> None:
    transcript = Transcript()
    for event in (chunk(role=True, text=""), chunk("Once"), chunk(" upon")):
        transcript.add_data(data(event))
    transcript.add_data(b"not json")
    assert transcript.text() == "Once upon"
    assert transcript.first == {"id": "chatcmpl-fake", "model": "fake-model", "created": 1700000000}
    assert transcript.problem() == ""
    transcript.add(stamped(" a time"))  # a continuation's chunk, after the first stream's
    assert transcript.text() == "Once upon a time"


@pytest.mark.parametrize(
    ("event", "problem"),
    [
        (chunk("x", finish="stop"), "the reply had already finished"),
        (chunk("x", index=1), "the reply has several choices"),
        (
            {**chunk(), "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0}]}}]},
            "the reply has tool calls",
        ),
    ],
)
def test_transcript_says_when_a_reply_cannot_be_continued(
    event: dict[str, Any], problem: str
) -> None:
    transcript = Transcript()
    transcript.add_data(data(chunk("Hello")))
    transcript.add_data(data(event))
    assert transcript.problem() == problem


def test_transcript_usage_of_broken_streams_adds_up() -> None:
    transcript = Transcript()
    transcript.add_data(data({**chunk("a"), "usage": {"completion_tokens": 3}}))
    transcript.add_data(data({**chunk("b"), "usage": {"completion_tokens": 4}}))
    transcript.end_stream()
    assert transcript.earlier == 4
    transcript.add({**stamped("c"), "usage": {"completion_tokens": 2}})
    transcript.end_stream()
    assert transcript.earlier == 6


# -- the seam ---------------------------------------------------------------------------


FIRST = {"id": "chatcmpl-1", "model": "m", "created": 1}


def test_seam_holds_until_joined_then_passes_through() -> None:
    seam = Seam(TALE, FIRST)
    assert seam.take(stamped("")) == []
    assert seam.take(stamped(" the")) == []
    out = seam.take(stamped(" castle. And"))
    assert out is not None and [text_of(c) for c in out] == [" And"]
    assert all(c["id"] == "chatcmpl-1" for c in out)
    assert seam.cut_text == " the castle."
    later = seam.take(stamped(" then"))
    assert later is not None and [c["id"] for c in later] == ["chatcmpl-1"]
    assert seam.take(stamped("")) == []


def test_seam_refuses_a_restart() -> None:
    seam = Seam(TALE + " It was very old.", FIRST)
    assert seam.take(stamped("Once upon a time,")) == []
    # Still the delivered text word for word: it may yet be a full restatement.
    assert seam.take(stamped(" there was a dragon who lived")) == []
    assert seam.take(stamped(" in a cave")) is None
    assert seam.joined == Join(restart=True)


def test_seam_decides_at_a_finish() -> None:
    seam = Seam(TALE, FIRST)
    assert seam.take(stamped(" the")) == []
    out = seam.take(stamped(finish="stop"))
    assert out is not None
    assert [(text_of(c), c["choices"][0]["finish_reason"]) for c in out] == [
        (" the", None),
        ("", "stop"),
    ]


def test_seam_decide_final_with_nothing_held() -> None:
    seam = Seam(TALE, FIRST)
    assert seam.decide(final=True) == []
    assert seam.joined == Join()
