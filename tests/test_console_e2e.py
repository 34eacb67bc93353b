"""What a client or an upstream sends cannot forge a console line or get a key printed:
the proxy run as a user runs it, its console read from the process's stderr."""

from __future__ import annotations

import signal
from pathlib import Path

import aiohttp

from .conftest import chat_body, free_port
from .fake_upstream import FakeUpstream, Json
from .keys import random_key
from .leak_helpers import Outputs
from .test_cli import MODULE, serving, write_config


async def test_console_lines_escaped_and_masked_and_credential_headers_logged_masked(
    tmp_path: Path,
) -> None:
    upstream = await FakeUpstream().start()
    key = random_key("sk-live-", 40)
    client_key = random_key("cl-", 45)  # not key-shaped: only exact masking knows it
    password = random_key("pw-", 30)
    try:
        port = free_port()
        write_config(
            tmp_path / "config.yaml",
            f"target_proxy:\n  url: {upstream.chat_url}\n"
            f"  headers:\n    Authorization: Bearer {key}\n"
            f"server:\n  port: {port}\n  debug: true\n"
            "error_handling:\n  max_retries: 0\n",
        )
        # The upstream echoes the configured key without its "sk-live-" prefix.
        body = key.removeprefix("sk-live-")
        upstream.queue(Json(200), Json(401, {"error": {"message": f"bad key {body}"}}))
        forged = "FORGED 12:00:00 INFO all fine"
        model = f"m\n{forged}\x1b[2J\x1b]0;pwned\x07 {random_key('sk-test-')} {client_key}"
        out = Outputs()
        async with serving([*MODULE], tmp_path, port) as proxy:
            async with aiohttp.ClientSession() as session:
                headers = {"X-Api-Key": client_key, "X-Custom-Pass": password}
                for _ in range(2):
                    async with session.post(
                        proxy.url + "/v1/chat/completions",
                        json=chat_body(model=model),
                        headers=headers,
                    ) as resp:
                        out.add(f"client body {resp.status}", await resp.read())
            assert await proxy.stop(signal.SIGTERM) == 0
        console = proxy.stderr
        out.add("console", console)
        for path in (tmp_path / "logs").rglob("*.log"):
            out.add(f"file {path.name}", path.read_text())
    finally:
        await upstream.close()
    assert sorted(out.texts) and "client body 401" in out.texts
    lines = console.splitlines()
    assert not [line for line in lines if line.startswith("FORGED")]
    assert not any(c in console for c in "\x1b\x07\r")
    assert sum(f"m {forged}\\x1b[2J\\x1b]0;pwned\\x07 sk-…" in line for line in lines) == 2
    assert "bad key sk-…" in out.texts["client body 401"]
    request_logs = "".join(t for w, t in out.texts.items() if w.startswith("file 2"))
    assert "X-Custom-Pass: pw-…" in request_logs
    secrets = {"key": key, "its body": body, "client key": client_key, "password": password}
    assert out.leaks(secrets) == {}
