"""The batching console handler: every line written, in order, none lost at close."""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from first_hop_proxy import console
from first_hop_proxy.console import (
    DATE_FORMAT,
    FORMAT,
    BatchingHandler,
    ConsoleFormatter,
    mask_with,
)
from first_hop_proxy.redact import Redactor

from .keys import assert_no_leak, random_key


def test_lines_are_written_in_order_and_flushed_at_close() -> None:
    stream = io.StringIO()
    handler = BatchingHandler(stream, interval=0.01)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("first_hop_proxy.test_console")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    items = ["a"]
    for i in range(500):
        logger.info("line %d %s", i, items)
    items.append("changed later")  # arguments are rendered when logged
    handler.close()
    logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines == [f"INFO line {i} ['a']" for i in range(500)]


def render(*args: object, redactor: Redactor | None = None, message: str = "%s %s") -> str:
    """What the handler writes for one record logged with ``message % args``."""
    stream = io.StringIO()
    handler = BatchingHandler(stream, interval=0.01, redactor=redactor)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("first_hop_proxy.test_console.render")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        logger.info(message, *args)
    finally:
        handler.close()
        logger.removeHandler(handler)
    return stream.getvalue()


def test_a_value_cannot_forge_a_line_or_drive_the_terminal() -> None:
    model = "gpt\n12:00:00 INFO forged line\x1b[2J\x1b]0;title\x07\u202eevil\r"
    out = render("abc123", model)
    assert out.count("\n") == 1  # one line
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out and "\r" not in out
    assert out == (
        "INFO abc123 gpt\\n12:00:00 INFO forged line\\x1b[2J\\x1b]0;title\\x07\\u202eevil\\r\n"
    )


def test_keys_are_masked_in_every_line() -> None:
    configured = random_key("cfg-", 40)  # not key-shaped: only the redactor knows it
    key_shaped = random_key("sk-test-")
    out = render(f"model {key_shaped}", f"echo {configured}", redactor=Redactor([configured]))
    assert_no_leak(out, key_shaped)
    assert_no_leak(out, configured)
    assert "sk-…" in out and "cfg…" in out


def test_own_multi_line_messages_keep_their_lines_but_no_escape_sequences() -> None:
    out = render(message="DEMO MODE: first line\n  second line \x1b[31m")
    assert out == "INFO DEMO MODE: first line\n  second line \\x1b[31m\n"


def test_numbers_keep_their_format() -> None:
    assert render(3, 0.5, message="%d attempts, %.2f s") == "INFO 3 attempts, 0.50 s\n"


def test_a_reloaded_config_s_keys_are_masked_from_then_on() -> None:
    stream = io.StringIO()
    handler = BatchingHandler(stream, interval=0.01)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    logger = logging.getLogger("test_console_reload")
    logger.setLevel(logging.INFO)
    new_key = random_key("new-", 40)
    try:
        mask_with(Redactor([new_key]))
        logger.info("upstream said: %s", new_key)
    finally:
        root.removeHandler(handler)
        handler.close()
    assert_no_leak(stream.getvalue(), new_key)
    assert "upstream said: new…" in stream.getvalue()


def test_the_console_format_is_logging_s_own_made_cheaper() -> None:
    plain = logging.Formatter(FORMAT, DATE_FORMAT)
    ours = ConsoleFormatter()
    record = logging.LogRecord("x", logging.WARNING, "", 0, "%s -> %d", ("json", 200), None)
    assert ours.format(record) == plain.format(record)
    later = logging.LogRecord("x", logging.INFO, "", 0, "next", (), None)
    later.created = record.created + 1.0  # the next second: the time is worked out again
    assert ours.format(later) == plain.format(later)
    assert ours.format(later).split()[0] != ours.format(record).split()[0]
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord("x", logging.ERROR, "", 0, "failed", (), sys.exc_info())
    assert ours.format(failed) == plain.format(failed)
    assert "ValueError: boom" in ours.format(failed)


REQUEST_LINE = "%s %s %s -> %s%s, %d attempt%s, %.2f s%s"


@contextmanager
def console_alone() -> Iterator[io.StringIO]:
    """The root logger as the server sets it up: the console its only handler."""
    stream = io.StringIO()
    handler = BatchingHandler(stream, interval=0.01)
    handler.setFormatter(ConsoleFormatter())
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        handler.close()
        root.handlers[:] = saved
        root.setLevel(level)


def test_the_request_line_goes_straight_to_the_console_and_reads_the_same() -> None:
    logger = logging.getLogger("first_hop_proxy_test_line")
    made: list[logging.LogRecord] = []
    make_record = logger.makeRecord

    def counted(*args: object, **kwargs: object) -> logging.LogRecord:
        made.append(make_record(*args, **kwargs))  # type: ignore[arg-type]
        return made[-1]

    logger.makeRecord = counted  # type: ignore[method-assign]
    key, client_key = random_key(), random_key("cl-", 40)  # the client's: not key-shaped
    model = f"gpt\n12:00:00 INFO forged\x1b[2J {key} {client_key}" + "x" * 200
    headers = {"Authorization": f"Bearer {client_key}", "Content-Type": "application/json"}
    sent = console.ClientText(model, 100, headers, Redactor())
    args = ("abc123", sent, "json", 200, "", 1, "", 0.25, " (empty reply)")
    with console_alone() as stream:
        console.info(logger, REQUEST_LINE, *args)
        assert made == []  # no LogRecord: the line went to the console's queue
        logger.info(REQUEST_LINE, *args)
        assert len(made) == 1
    fast, usual = stream.getvalue().splitlines()
    assert fast.split(" ", 1)[1] == usual.split(" ", 1)[1]  # the same, but for the time
    assert fast.split(" ", 2)[1] == "INFO" and "-> 200, 1 attempt, 0.25 s (empty reply)" in fast
    assert "\x1b" not in fast and "gpt 12:00:00 INFO forged\\x1b[2J sk-…" in fast  # one line
    assert " cl-…" in fast and "x" * 50 in fast and "x" * 150 not in fast  # masked, then clipped
    assert_no_leak(key, stream.getvalue())
    assert_no_leak(client_key, stream.getvalue())


def test_the_request_line_reaches_any_other_handler_through_logging(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("first_hop_proxy")
    with caplog.at_level(logging.INFO, logger="first_hop_proxy"):
        console.info(logger, "%s -> %d", "json", 200)  # a capture handler on the way
        console.info(logger, "%s %s", "args that", ["may change"])  # not strings and numbers
    assert [r.getMessage() for r in caplog.records] == ["json -> 200", "args that ['may change']"]
    with console_alone() as stream:
        logger.setLevel(logging.WARNING)
        try:
            console.info(logger, "%s -> %d", "json", 200)  # below the level: nothing
        finally:
            logger.setLevel(logging.NOTSET)
    assert stream.getvalue() == ""
    with console_alone() as stream:
        handler = logging.getLogger().handlers[0]
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))  # reads any field
        console.info(logger, "%s -> %d", "json", 200)
    assert stream.getvalue() == "first_hop_proxy: json -> 200\n"
