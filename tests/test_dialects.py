"""Errors that community reverse proxies send as a reply's text never reach the chat.

The pure recogniser first (:mod:`first_hop_proxy.dialects`), then the decision
core's use of it, then the real proxy against a fake upstream that speaks the
dialect: JSON and streams, transient and persisting, queue heartbeats, an error
after content, and genuine replies that merely mention "proxy error".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from first_hop_proxy.decisions import Action, Outcome, Policy, decide, error_body
from first_hop_proxy.dialects import DEFAULT_TITLE, Title, disguised_error, message_of

from .conftest import StartProxy, chat_body
from .fake_upstream import (
    FakeUpstream,
    Json,
    Sse,
    chunk,
    completion,
    disguised_chunk,
    disguised_reply,
    proxy_error_text,
    queue_comments,
    raw_events,
    text_chunks,
)
from .log_helpers import error_logs, request_logs, settle
from .test_decisions import make_policy

QUOTA = "You exceeded your current quota, please wait."
CHAT = "/v1/chat/completions"


# -- recognising the shapes ------------------------------------------------------------


@pytest.mark.parametrize("style", ["current", "old"])
@pytest.mark.parametrize(
    ("status", "reason"),
    [(429, "Too Many Requests"), (503, "Service Unavailable"), (401, "Unauthorized")],
)
def test_banner_reply(style: str, status: int, reason: str) -> None:
    found = disguised_error(disguised_reply(status=status, reason=reason, style=style))
    assert found is not None
    assert found.status == status
    assert found.title == f"Proxy error (HTTP {status} {reason})"
    assert found.message == QUOTA
    assert found.text == f"Proxy error (HTTP {status} {reason}): {QUOTA}"


@pytest.mark.parametrize("lead", ["", " ", "\n\n", "\t", "\u3000", "## ", "\n# "])
def test_a_banner_after_any_whitespace_or_heading_marks(lead: str) -> None:
    text = f"{lead}**Proxy error (HTTP 503 Service Unavailable)**\n\n*{QUOTA}*"
    found = disguised_error(completion(text))
    assert found is not None and found.status == 503 and found.message == QUOTA
    assert disguised_error(completion("x" + text)) is None  # not at the start: a reply


def test_stream_chunk_and_queue_kill() -> None:
    found = disguised_error(disguised_chunk(status=503, reason="Service Unavailable"))
    assert found is not None and found.status == 503
    killed = disguised_error(
        chunk("[proxy queue error: waited too long]", finish="proxy queue error")
    )
    assert killed is not None
    assert (killed.status, killed.title, killed.message) == (
        502,
        "proxy queue error",
        "waited too long",
    )


@pytest.mark.parametrize(
    "title",
    [
        "Proxy queue error (too many concurrent requests)",
        "Proxy queue error (streaming required)",
        "Proxy stream error",
        "Proxy streaming error (Bad Request)",
    ],
)
def test_titles_without_a_status_are_502(title: str) -> None:
    found = disguised_error(disguised_reply(title=title))
    assert found is not None
    assert (found.status, found.title) == (502, title)


def test_finish_reason_title_alone_counts() -> None:
    doc = completion("The request could not be served.", finish="Proxy error (HTTP 500 Oops)")
    found = disguised_error(doc)
    assert found is not None
    assert (found.status, found.message) == (500, "The request could not be served.")


def test_header_marker_counts() -> None:
    doc = completion("Something failed.")
    found = disguised_error(doc, {"x-oai-proxy-error": "Proxy error (HTTP 502 Bad Gateway)"})
    assert found is not None and found.status == 502


@pytest.mark.parametrize(
    "text",
    [
        "My character said: **Proxy error (HTTP 429 Too Many Requests)** is what I saw.",
        "Sure. A proxy error usually means the server in between failed.",
        "**Bold opening** then the story.",
        "[Narrator: the night falls]",
        "",
    ],
)
def test_genuine_replies_are_replies(text: str) -> None:
    assert disguised_error(completion(text)) is None
    assert disguised_error(chunk(text)) is None


def test_after_content_only_the_finish_reason_counts() -> None:
    text, title = proxy_error_text()
    assert disguised_error(chunk(text), anywhere=False) is None
    assert disguised_error(chunk(text, finish=title), anywhere=False) is not None


def test_message_of_prefers_the_json_then_the_italic_line() -> None:
    fenced = '**T**\n\n*italic words*\n\n```json\n{"error": {"error": {"message": "deep"}}}\n```'
    assert message_of(fenced) == "deep"
    assert message_of("\n\nThe proxy encountered an error.\n\n*the cause*\n") == "the cause"
    note = '```\n{"proxy_note": "only a note"}\n```'
    assert message_of(note) == "only a note"
    assert message_of("```json\nnot json\n```") == ""


def test_a_custom_title_pattern() -> None:
    title = Title("gateway failure")
    doc = completion("**Gateway failure (HTTP 503)**\nbusy", finish="stop")
    found = disguised_error(doc, title=title)
    assert found is not None and (found.status, found.message) == (503, "busy")
    assert disguised_error(doc, title=DEFAULT_TITLE) is None


def test_a_runaway_title_pattern_is_cut_off() -> None:
    title = Title("(x|xx)+$")
    assert not title.matches("x" * 150 + "!")


# -- the decision core --------------------------------------------------------------------


def judge(outcome: Outcome, policy: Policy | None = None) -> Any:
    return decide(outcome, _history(), policy or make_policy(), jitter=0.5, now=0.0)


def _history() -> Any:
    from first_hop_proxy.decisions import History

    return History()


def test_disguised_429_is_retried_with_its_words() -> None:
    d = judge(Outcome(200, body=orjson.dumps(disguised_reply()).decode()))
    assert (d.action, d.status, d.budget) == (Action.RETRY, 429, "retry")
    assert d.upstream_message == f"Proxy error (HTTP 429 Too Many Requests): {QUOTA}"
    assert "sent as a 200 reply" in d.reason


def test_disguised_401_fails_at_once() -> None:
    d = judge(
        Outcome(200, body=orjson.dumps(disguised_reply(status=401, reason="Unauthorized")).decode())
    )
    assert (d.action, d.client_status) == (Action.FAIL, 401)
    message = error_body(d, 1, 0.2)["error"]["message"]
    assert "Proxy error (HTTP 401 Unauthorized): " + QUOTA in message
    assert "```" not in message and "###" not in message and "{" not in message


def test_disguised_stream_error_event() -> None:
    text = orjson.dumps(disguised_chunk(status=503, reason="Service Unavailable")).decode()
    d = judge(Outcome(200, body=text, stream=True, stream_error_event=text))
    assert (d.action, d.status) == (Action.RETRY, 503)


def test_recategorization_and_hard_stops_see_the_text() -> None:
    policy = make_policy(
        error_handling={"hard_stop_conditions": {"rules": [{"pattern": "content policy"}]}},
        response_parsing={
            "status_recategorization": {
                "rules": [{"pattern": "HTTP 503", "original_status": 200, "new_status": 400}]
            }
        },
    )
    recat = judge(Outcome(200, body=orjson.dumps(disguised_reply(status=503)).decode()), policy)
    assert (recat.action, recat.status) == (Action.FAIL, 400)
    assert recat.recategorized is not None
    stopped = judge(
        Outcome(
            200, body=orjson.dumps(disguised_reply(message="blocked by content policy")).decode()
        ),
        policy,
    )
    assert stopped.action is Action.HARD_STOP


def test_switched_off_the_reply_is_delivered() -> None:
    policy = make_policy(response_parsing={"disguised_errors": {"enabled": False}})
    d = judge(Outcome(200, body=orjson.dumps(disguised_reply()).decode()), policy)
    assert d.action is Action.DELIVER


def test_top_level_proxy_error_message_is_what_the_person_reads() -> None:
    body = {"type": "proxy_error", "message": "Your IP is already in the queue.", "proxy_note": "n"}
    d = judge(Outcome(429, body=orjson.dumps(body).decode()))
    assert d.upstream_message == "Your IP is already in the queue."


# -- through the real proxy -----------------------------------------------------------------

FAST: dict[str, Any] = {"error_handling": {"max_retries": 2}}


async def post(proxy: Any, body: dict[str, Any]) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(proxy.url + CHAT, json=body) as resp,
    ):
        return resp.status, await resp.read()


def sse_data(raw: bytes) -> list[Any]:
    out = []
    for event in raw.split(b"\n\n"):
        if event.startswith(b"data: "):
            data = event[6:]
            out.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return out


def content_of(events: list[Any]) -> str:
    return "".join(
        (e["choices"][0]["delta"].get("content") or "")
        for e in events
        if isinstance(e, dict) and e.get("choices")
    )


async def test_json_transient_is_retried_unseen(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    proxy = await start_proxy()
    upstream.queue(Json(200, disguised_reply()), Json(200, completion("The real reply.")))
    status, raw = await post(proxy, chat_body())
    assert status == 200
    assert orjson.loads(raw)["choices"][0]["message"]["content"] == "The real reply."
    assert upstream.calls == 2
    await settle(proxy)
    (error_file,) = error_logs(tmp_path / "logs" / "errors", "429")
    assert "Proxy error (HTTP 429 Too Many Requests)" in error_file.read_text()
    (log,) = request_logs(tmp_path / "logs").values()
    text = log.read_text()
    assert "sent as a 200 reply" in text and "Decision: retry" in text
    assert "### **Proxy error (HTTP 429 Too Many Requests)**" in text  # the original body


async def test_json_persisting_is_a_real_error(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy(FAST)
    upstream.default = Json(200, disguised_reply())
    status, raw = await post(proxy, chat_body())
    assert status == 503  # a 429 that outlasts the retries: SillyTavern must not retry it again
    error = orjson.loads(raw)["error"]
    message = error["message"]
    assert f"Proxy error (HTTP 429 Too Many Requests): {QUOTA}" in message
    assert "3 attempts over" in message
    assert "```" not in message and "###" not in message and '"error"' not in message
    assert upstream.calls == 3


async def test_json_unauthorized_fails_at_once(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy()
    upstream.default = Json(200, disguised_reply(status=401, reason="Unauthorized", style="old"))
    status, raw = await post(proxy, chat_body())
    assert status == 401
    assert "Proxy error (HTTP 401 Unauthorized)" in orjson.loads(raw)["error"]["message"]
    assert upstream.calls == 1


async def test_stream_after_queue_comments_is_retried_unseen(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy()
    queued = Sse(raw_events(*queue_comments(3), disguised_chunk()), raw=True, gap=0.01)
    upstream.queue(queued, Sse(text_chunks("Fine", " now.")))
    status, raw = await post(proxy, chat_body(stream=True))
    assert status == 200
    events = sse_data(raw)
    assert content_of(events) == "Fine now."
    assert b"Proxy error" not in raw and b"queue heartbeat" not in raw
    assert events[-1] == "[DONE]"
    assert upstream.calls == 2


async def test_stream_persisting_ends_as_an_error_event(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    proxy = await start_proxy(
        {"error_handling": {"max_retries": 2, "stream_keepalive_seconds": 0.01}}
    )
    upstream.default = Sse([disguised_chunk(status=503, reason="Service Unavailable")])
    status, raw = await post(proxy, chat_body(stream=True))
    assert status == 200  # committed by the keep-alive
    events = sse_data(raw)
    assert content_of(events) == ""
    error = events[0]["error"]
    assert "Proxy error (HTTP 503 Service Unavailable): " + QUOTA in error["message"]
    assert events[-1] == "[DONE]"
    await settle(proxy)
    (log,) = request_logs(tmp_path / "logs").values()
    text = log.read_text()
    assert "Final Status: 503" in text
    assert "HTTP Status Sent: 200" in text


async def test_stream_persisting_before_commit_is_a_json_error(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy(FAST)
    upstream.default = Sse([disguised_chunk(style="queue", message="killed after 5 minutes")])
    status, raw = await post(proxy, chat_body(stream=True))
    assert status == 502
    assert "proxy queue error: killed after 5 minutes" in orjson.loads(raw)["error"]["message"]
    assert upstream.calls == 3


async def test_queue_longer_than_the_timeout_is_alive(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    """Heartbeats for 1 s against a 0.3 s read timeout: alive, then the reply arrives."""
    proxy = await start_proxy({"target_proxy": {"timeout": 0.3}})
    events = raw_events(*queue_comments(10, size=64 * 1024), *text_chunks("Queued", " reply."))
    upstream.default = Sse(events, raw=True, gap=0.1)
    status, raw = await post(proxy, chat_body(stream=True))
    assert status == 200
    assert content_of(sse_data(raw)) == "Queued reply."
    assert upstream.calls == 1


async def test_disguised_error_after_content_ends_the_stream(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    proxy = await start_proxy()
    text, title = proxy_error_text(status=500, reason="Internal Server Error")
    upstream.default = Sse(
        [chunk("Once upon", role=True), chunk(" a time"), chunk(text, finish=title)]
    )
    status, raw = await post(proxy, chat_body(stream=True))
    assert status == 200
    events = sse_data(raw)
    assert content_of(events) == "Once upon a time"
    assert b"Proxy error (HTTP 500" not in raw.split(b'"error"')[0]
    error = events[-2]["error"]
    assert error["code"] == "stream_interrupted"
    assert "Proxy error (HTTP 500 Internal Server Error)" in error["message"]
    assert events[-1] == "[DONE]"
    await settle(proxy)
    (log,) = request_logs(tmp_path / "logs").values()
    log_text = log.read_text()
    assert "Final Status: 500" in log_text and "HTTP Status Sent: 200" in log_text
    assert "stream ended with an error event" in log_text
    (err,) = error_logs(tmp_path / "logs" / "errors", "stream_error_event")
    assert '"decision": "retry"' not in err.read_text()


async def test_genuine_replies_mentioning_proxy_errors_pass(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy()
    words = "A proxy error (HTTP 429 Too Many Requests) means the proxy is busy."
    upstream.queue(Json(200, completion(words)), Sse(text_chunks("Sure: ", words)))
    status, raw = await post(proxy, chat_body())
    assert status == 200 and orjson.loads(raw)["choices"][0]["message"]["content"] == words
    status, raw = await post(proxy, chat_body(stream=True))
    assert status == 200 and content_of(sse_data(raw)) == "Sure: " + words
    assert upstream.calls == 2


async def test_switch_off_delivers_the_text(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy({"response_parsing": {"disguised_errors": {"enabled": False}}})
    upstream.default = Json(200, disguised_reply())
    status, raw = await post(proxy, chat_body())
    assert status == 200 and "Proxy error" in orjson.loads(raw)["choices"][0]["message"]["content"]
    assert upstream.calls == 1


async def test_top_level_proxy_error_reaches_the_person(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy(FAST)
    body = {"type": "proxy_error", "message": "Your token is not valid.", "proxy_note": "x"}
    upstream.default = Json(403, body)
    status, raw = await post(proxy, chat_body())
    assert status == 403
    assert "Upstream said: Your token is not valid." in orjson.loads(raw)["error"]["message"]


def test_title_answers_are_remembered_but_bounded() -> None:
    title = Title()
    assert title.matches(" Proxy error (HTTP 429 Too Many Requests) ")
    assert title.matches("Proxy error (HTTP 429 Too Many Requests)")  # remembered, same answer
    assert not title.matches("stop") and not title.matches("stop")
    for n in range(1_000):  # an upstream inventing finish reasons cannot grow it
        assert not title.matches(f"reason {n}")
    assert len(title._seen) <= 256
    assert title.matches("proxy error") and not title.matches("length")
