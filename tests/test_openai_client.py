"""A chat through the proxy with the ``openai`` package, streaming and not."""

from __future__ import annotations

from collections.abc import AsyncIterator

import openai
import pytest

from first_hop_proxy.server import RunningServer

from .fake_upstream import FakeUpstream, Json, Sse, completion, text_chunks


@pytest.fixture
async def openai_client(proxy: RunningServer) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(
        base_url=proxy.url + "/v1", api_key="sk-test", max_retries=0, timeout=10
    )
    yield client
    await client.close()


async def test_chat(openai_client: openai.AsyncOpenAI, upstream: FakeUpstream) -> None:
    upstream.queue(Json(body=completion("Hi from upstream")))
    reply = await openai_client.chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": "Hello"}],
        temperature=0.7,
    )
    assert reply.choices[0].message.content == "Hi from upstream"
    assert reply.choices[0].finish_reason == "stop"
    sent = upstream.received[0]
    assert sent.headers["Authorization"] == "Bearer sk-test"
    assert sent.json["messages"] == [{"role": "user", "content": "Hello"}]
    assert sent.json["temperature"] == 0.7


async def test_chat_stream(openai_client: openai.AsyncOpenAI, upstream: FakeUpstream) -> None:
    upstream.queue(Sse(text_chunks("Hel", "lo", " world"), gap=0.02))
    stream = await openai_client.chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": "Hello"}],
        stream=True,
    )
    text = ""
    finish = None
    async for part in stream:
        text += part.choices[0].delta.content or ""
        finish = part.choices[0].finish_reason or finish
    assert text == "Hello world"
    assert finish == "stop"
    assert upstream.received[0].json["stream"] is True


async def test_models(openai_client: openai.AsyncOpenAI) -> None:
    models = await openai_client.models.list()
    assert [m.id for m in models.data] == ["fake-model"]


async def test_error_reaches_client(
    openai_client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.queue(Json(400, body={"error": {"message": "context too long", "type": "bad"}}))
    with pytest.raises(openai.BadRequestError) as caught:
        await openai_client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "Hello"}]
        )
    assert "context too long" in str(caught.value)
