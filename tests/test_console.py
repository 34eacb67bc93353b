"""The batching console handler: every line written, in order, none lost at close."""

from __future__ import annotations

import io
import logging

from first_hop_proxy.console import BatchingHandler


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
