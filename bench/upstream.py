"""A fast fake upstream for the benchmarks (loopback only).

POST /v1/chat/completions answers about 1 KB of JSON, or, with ``"stream": true``,
a stream of ``EVENTS`` SSE events ``--gap-ms`` apart followed by ``data: [DONE]``.
A request for the model ``bench-fail`` gets a 400 (the failure mix of the benchmark).
GET /v1/models lists one model; GET /stats counts the answers by kind.

Run: python bench/upstream.py --port 9001 [--gap-ms 50]
"""

from __future__ import annotations

import argparse
import asyncio

import orjson
from aiohttp import web

EVENTS = 20
MODEL = "bench-model"
FAIL_MODEL = "bench-fail"
GAP = web.AppKey("gap", float)
COUNTS = web.AppKey("counts", dict[str, int])
FAILURE = orjson.dumps(
    {
        "error": {
            "message": "bench: this request fails on purpose",
            "type": "invalid_request_error",
            "code": "bench_failure",
        }
    }
)


def stream_token(i: int) -> str:
    """The text of event ``i``: plain ASCII, untouched by any rewrite rule."""
    return f"tok{i} "


def expected_text() -> str:
    return "".join(stream_token(i) for i in range(EVENTS))


def _reply() -> bytes:
    text = ("The quick brown fox jumps over the lazy dog and keeps on running. " * 12)[:800]
    return orjson.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1700000000,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 120, "completion_tokens": 180, "total_tokens": 300},
        }
    )


REPLY = _reply()
MODELS = orjson.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]})
EVENT_BYTES = [
    b"data: "
    + orjson.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": stream_token(i)},
                    "finish_reason": "stop" if i == EVENTS - 1 else None,
                }
            ],
        }
    )
    + b"\n\n"
    for i in range(EVENTS)
]


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    try:
        payload = orjson.loads(body)
        stream = bool(payload.get("stream"))
    except (orjson.JSONDecodeError, AttributeError):
        return web.Response(status=400, body=b'{"error":{"message":"bad json"}}')
    counts = request.app[COUNTS]
    if payload.get("model") == FAIL_MODEL:
        counts["failed"] += 1
        return web.Response(status=400, body=FAILURE, content_type="application/json")
    if not stream:
        counts["ok"] += 1
        return web.Response(body=REPLY, content_type="application/json")
    counts["streams"] += 1
    gap = request.app[GAP]
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await resp.prepare(request)
    for i, event in enumerate(EVENT_BYTES):
        if i:
            await asyncio.sleep(gap)
        await resp.write(event)
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def models(_: web.Request) -> web.Response:
    return web.Response(body=MODELS, content_type="application/json")


async def stats(request: web.Request) -> web.Response:
    return web.Response(body=orjson.dumps(request.app[COUNTS]), content_type="application/json")


def make_app(gap_ms: float) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[GAP] = gap_ms / 1000
    app[COUNTS] = {"ok": 0, "failed": 0, "streams": 0}
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/stats", stats)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--gap-ms", type=float, default=50.0)
    args = parser.parse_args()
    web.run_app(
        make_app(args.gap_ms),
        host="127.0.0.1",
        port=args.port,
        backlog=4096,
        access_log=None,
        print=None,
    )


if __name__ == "__main__":
    main()
