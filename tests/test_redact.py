"""Secrets never reach a log file: masking of headers, URLs, text and JSON."""

from __future__ import annotations

import base64
import os
import secrets
import string
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from first_hop_proxy.redact import (
    KEY_SHAPES,
    Redactor,
    _has_unicode_escape,
    clip,
    header_secrets,
    is_secret_header,
    mask,
    redact_headers,
    redact_obj,
    redact_text,
    redact_url,
)

from .keys import ALNUM, assert_no_leak, random_key


def visible(masked: str) -> int:
    return len(masked.replace("…", "").replace("*", ""))


class TestMask:
    def test_openai_key_keeps_prefix_and_last_four(self) -> None:
        key = random_key()
        assert mask(key) == f"sk-…{key[-4:]}"

    def test_google_key(self) -> None:
        key = "AIza" + "B" * 31 + "wxyz"
        assert mask(key).startswith("AIza…")
        assert visible(mask(key)) <= 7

    def test_short_secret_is_stars(self) -> None:
        assert mask("hunter2") == "***"
        assert mask("a" * 11) == "***"

    @pytest.mark.parametrize("length", [12, 15, 19, 20, 32, 200])
    def test_never_more_than_seven_visible(self, length: int) -> None:
        secret = random_key("", length)
        masked = mask(secret)
        assert visible(masked) <= 7
        assert_no_leak(masked, secret)


class TestHeaders:
    def test_scheme_word_kept(self) -> None:
        key = random_key()
        out = redact_headers({"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        assert out == {
            "Authorization": f"Bearer sk-…{key[-4:]}",
            "Content-Type": "application/json",
        }

    @pytest.mark.parametrize(
        "name",
        [
            "Proxy-Authorization",
            "X-Api-Key",
            "Api-Key",
            "x-goog-api-key",
            "Cookie",
            "Set-Cookie",
            "X-Custom-Pass",
            "X-Passphrase",
            "X-Client-Secret",
            "X-Auth",
            "X-Session",
            "X-Amz-Security-Token",
            "X-Credential",
            "X-Signature",
        ],
    )
    def test_secret_headers_masked(self, name: str) -> None:
        value = "session=" + random_key("", 30)
        out = redact_headers([(name, value)])
        assert_no_leak(out[name], value[8:])

    def test_case_insensitive_names(self) -> None:
        key = random_key()
        assert_no_leak(str(redact_headers({"authorization": key})), key)

    def test_key_shaped_value_in_other_header_masked(self) -> None:
        key = random_key()
        assert_no_leak(str(redact_headers({"X-Debug": f"used {key}"})), key)

    def test_header_secrets_strips_scheme(self) -> None:
        assert header_secrets({"Authorization": "Bearer abc.def.ghi", "Accept": "x"}) == [
            "abc.def.ghi"
        ]


class TestUrl:
    @pytest.mark.parametrize("param", ["key", "api_key", "apikey", "access_token"])
    def test_query_values_masked(self, param: str) -> None:
        secret = random_key("", 30)
        url = f"https://host.example/v1/models?alt=sse&{param}={secret}&x=1"
        out = redact_url(url)
        assert_no_leak(out, secret)
        assert out.startswith("https://host.example/v1/models?alt=sse&")
        assert out.endswith("&x=1")

    def test_userinfo_password_masked(self) -> None:
        out = redact_url("https://alice:s3cr3t-passw0rd@host.example/v1")
        assert out == "https://alice:***@host.example/v1"

    def test_plain_url_unchanged(self) -> None:
        url = "https://host.example/v1/chat/completions?stream=true"
        assert redact_url(url) == url


class TestText:
    def test_key_shapes(self) -> None:
        sk, aiza, tok = random_key(), random_key("AIza", 35), random_key("", 24)
        text = f"sk={sk} google={aiza} header: bearer {tok}"
        out = redact_text(text)
        for secret in (sk, aiza, tok):
            assert_no_leak(out, secret)
        assert "bearer " in out

    def test_json_fields(self) -> None:
        secret = "not-key-shaped-but-secret-123"
        out = redact_text(f'{{"api_key": "{secret}", "password":"{secret}", "model": "x"}}')
        assert_no_leak(out, secret)
        assert '"model": "x"' in out

    def test_prose_untouched(self) -> None:
        text = "They asked for a key. The token count was 12. Email me at a@b.c"
        assert redact_text(text) == text

    def test_idempotent(self) -> None:
        once = redact_text(f"Bearer {random_key()}")
        assert redact_text(once) == once

    def test_large_text_is_fast(self) -> None:
        text = base64.b64encode(os.urandom(3_000_000)).decode() + " key token Bearer sk-"
        start = time.perf_counter()
        redact_text(text)
        assert time.perf_counter() - start < 3


class TestObj:
    def test_nested(self) -> None:
        key = random_key()
        obj: dict[str, Any] = {
            "api_key": "short-key",
            "messages": [{"role": "user", "content": f"my key is {key}"}],
            "max_tokens": 100,
            "nested": {"Authorization": f"Bearer {key}", "n": [1, 2.5, None, True]},
        }
        out = redact_obj(obj)
        assert_no_leak(str(out), key)
        assert out["api_key"] == "***"
        assert out["max_tokens"] == 100
        assert out["nested"]["n"] == [1, 2.5, None, True]
        assert obj["messages"][0]["content"].endswith(key)  # input untouched

    def test_inline_image_kept(self) -> None:
        image = "data:image/png;base64," + base64.b64encode(os.urandom(30_000)).decode()
        assert redact_obj({"url": image}) == {"url": image}


class TestKnownSecrets:
    def test_exact_secret_masked_anywhere(self) -> None:
        secret = "correct horse battery staple"
        redactor = Redactor([secret])
        for out in (
            redactor.text(f"upstream said: {secret}!"),
            str(redactor.obj({"note": [f"x{secret}x"]})),
            str(redactor.headers({"X-Note": secret})),
            redactor.url(f"https://h/?q={secret}"),
        ):
            assert_no_leak(out, secret)

    def test_with_secrets_adds(self) -> None:
        base = Redactor(["first-secret-value"])
        both = base.with_secrets(["second-secret-value"])
        out = both.text("first-secret-value second-secret-value")
        assert "first-secret" not in out and "second-secret" not in out
        assert base.with_secrets([]) is base

    def test_tiny_known_secret_ignored(self) -> None:
        assert Redactor(["abc"]).text("abc abc") == "abc abc"

    @pytest.mark.parametrize("prefix", ["sk-", "sk-proj-", "sk-ant-api03-", "sk_live_", "AIza"])
    def test_body_without_its_prefix_masked(self, prefix: str) -> None:
        """An upstream echoing the configured key without its ``sk-`` prefix."""
        key = random_key(prefix, 40)
        body = key[len(prefix) :]
        out = Redactor([key]).text(f"invalid key {body}, check it")
        assert_no_leak(out, body)
        assert out == f"invalid key {mask(key)}, check it"  # the same stand-in as the whole key

    @pytest.mark.parametrize("cut", [6, 12, 20, 47])
    @pytest.mark.parametrize("after", ["", "…", "...", '"', " )", "\n"])
    def test_stump_at_the_end_of_a_cut_text_masked(self, cut: int, after: str) -> None:
        key = random_key("sk-test-", 40)
        out = Redactor([key]).text("the upstream said: " + key[:cut] + after)
        assert out == f"the upstream said: {mask(key)}{after}"

    def test_stump_needs_six_characters_and_the_end(self) -> None:
        key = random_key("ab", 40)
        redactor = Redactor([key])
        assert redactor.text("ends with " + key[:5]) == "ends with " + key[:5]
        inside = f"{key[:10]} and more"  # a key's start inside a text is not a cut
        assert redactor.text(inside) == inside


class TestClip:
    def test_masks_before_cutting(self) -> None:
        key = random_key("sk-test-", 40)
        text = "x" * 90 + key
        assert clip(text, 100) == "x" * 90 + mask(key)
        assert text[:100].endswith(key[:10])  # what cutting first would have left

    def test_one_line_and_an_ellipsis(self) -> None:
        assert clip("a\n b\t\r c " * 20, 10) == "a b c a b…"
        assert clip("  short\n", 10) == "short"
        assert clip("abc", 3) == "abc"

    def test_with_a_request_redactor(self) -> None:
        client_key = random_key("cl-", 45)
        out = clip("z" * 40 + client_key, 60, Redactor([client_key]).text)
        assert out == "z" * 40 + mask(client_key)


@pytest.mark.parametrize("name", ["Keep-Alive", "Content-Type", "X-Title", "Accept-Encoding"])
def test_ordinary_headers_are_not_credentials(name: str) -> None:
    assert not is_secret_header(name)


class TestParsedJson:
    """``parsed_json`` narrows the search to what the raw text holds: same result as ``obj``."""

    KNOWN = ("sk-known-0123456789abcdef", "plain-secret-1234", 'odd"/\\secret-5678')

    CASES = (
        b'{"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}',
        b'{"api_key": "abcdefghijklmnop", "x": [1, 2.5, true, null]}',
        b'{"aPi_kEy": "abcdefghijklmnop"}',
        b'{"Cookie": "session=abc", "SET-COOKIE": "x"}',
        b'{"content": "use sk-abcdefghijklmnopqrstuvwx please"}',
        b'{"content": "my \\u0073k-abcdefghijklmnopqrstuvwx"}',
        b'{"content": "rewritten \\\\u002d text, sk-abcdefghijklmnopqrstuvwx"}',
        b'{"content": "odd \\\\\\u0073k-abcdefghijklmnopqrstuvwx"}',
        b'{"content": "Bearer abcdefghijklmnopq and user@host"}',
        b'{"content": "the key is plain-secret-1234"}',
        b'{"content": "odd\\"\\/\\\\secret-5678"}',
        b'{"content": "see https://u:pw1234567@host/x?key=abcdef123456"}',
        b'{"nested": {"deeper": [{"token": "abcdefghijklmn"}, {"token": 12}]}}',
        b'{"content": "AIzaSyA1234567890abcdefghijklmnopqrstu"}',
        b'["sk-known-0123456789abcdef", "x"]',
        b'"just a string with sk-known-0123456789abcdef"',
        b"123",
    )

    @pytest.mark.parametrize("raw", CASES)
    def test_same_as_obj(self, raw: bytes) -> None:
        redactor = Redactor(self.KNOWN)
        parsed = orjson.loads(raw)
        assert redactor.parsed_json(raw, parsed) == redactor.obj(parsed)

    def test_inline_image_with_hint_letters_and_a_known_key(self) -> None:
        image = "data:image/png;base64," + "QUJDkeyREVG" * 1000
        raw = orjson.dumps(
            {"messages": [{"content": [{"image_url": {"url": image}}, "plain-secret-1234"]}]}
        )
        redactor = Redactor(self.KNOWN)
        parsed = orjson.loads(raw)
        out = redactor.parsed_json(raw, parsed)
        assert out == redactor.obj(parsed)
        assert out["messages"][0]["content"][0]["image_url"]["url"] == image
        assert "plain-secret-1234" not in orjson.dumps(out).decode()

    def test_nothing_to_mask_returns_the_parsed_object(self) -> None:
        raw = self.CASES[0]
        parsed = orjson.loads(raw)
        assert Redactor(self.KNOWN).parsed_json(raw, parsed) is parsed
        secret = b'{"max_tokens": 5, "api_key": "abcdefghijklmnop"}'
        parsed = orjson.loads(secret)
        assert Redactor().parsed_json(secret, parsed) is not parsed

    def test_masks_through_the_narrowed_path(self) -> None:
        raw = b'{"max_tokens": 5, "content": "a token: sk-abcdefghijklmnopqrstuvwx"}'
        out = Redactor().parsed_json(raw, orjson.loads(raw))
        assert "sk-abcdefghijklmnopqrstuvwx" not in out["content"]
        assert out["max_tokens"] == 5


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        (rb'"a\u0041"', True),
        (rb'"a\\u0041"', False),  # an escaped backslash, then a plain "u"
        (rb'"a\\\u0041"', True),  # an escaped backslash, then an escape
        (rb'"\"\\u"', False),
        (rb'"\\\\u007c"', False),
        (rb'"plain"', False),
        (rb'"\\\\\\\u00e9"', True),
    ],
)
def test_unicode_escape_found_only_where_one_begins(raw: bytes, escaped: bool) -> None:
    assert _has_unicode_escape(raw) is escaped
    assert isinstance(orjson.loads(raw), str)  # every case is valid JSON


# -- placeholders: what a client sends when it holds no key ---------------------------


@pytest.mark.parametrize(
    "value", ["Bearer undefined", "Bearer null", "Bearer ", "Bearer", "undefined", "NULL", ""]
)
def test_placeholder_is_no_secret(value: str) -> None:
    assert header_secrets({"Authorization": value}) == []
    redactor = Redactor(header_secrets({"Authorization": value}))
    assert redactor.text("Why is my variable undefined? x is null") == (
        "Why is my variable undefined? x is null"
    )
    assert redact_headers({"Authorization": value})["Authorization"] == value


def test_real_key_still_masked_beside_placeholder_words() -> None:
    key = "pw-0123456789abcdef"
    secrets = header_secrets({"Authorization": f"Bearer {key}", "X-Api-Key": "undefined"})
    assert secrets == [key]
    assert Redactor(secrets).text(f"undefined {key}") == "undefined …cdef"


# --- Key shapes: each one masked in free text, each near miss left alone -----------------

UPPER_B32 = string.ascii_uppercase + "234567"
LETTERS = string.ascii_letters
TOKEN = ALNUM + "_-"


def key(prefix: str, length: int, alphabet: str = ALNUM, suffix: str = "") -> str:
    return prefix + "".join(secrets.choice(alphabet) for _ in range(length)) + suffix


# Examples of each shape in KEY_SHAPES, as the providers issue them.
SHAPE_EXAMPLES: dict[str, list[Callable[[], str]]] = {
    "sk": [
        lambda: key("sk-", 48),  # OpenAI, legacy
        lambda: key("sk-proj-", 156, TOKEN),  # OpenAI project key
        lambda: key("sk-svcacct-", 120, TOKEN),
        lambda: key("sk-ant-api03-", 93, TOKEN, "AA"),  # Anthropic, hyphens inside
        lambda: key("sk-ant-admin01-", 93, TOKEN, "AA"),
        lambda: key("sk-or-v1-", 64, "0123456789abcdef"),  # OpenRouter
    ],
    "google": [lambda: key("AIza", 35, TOKEN)],
    "xai": [lambda: key("xai-", 80, ALNUM + "_")],
    "groq": [lambda: key("gsk_", 52)],
    "huggingface": [lambda: key("hf_", 34, LETTERS)],
    "huggingface_org": [lambda: key("api_org_", 34, LETTERS)],
    "aws": [lambda: key("AKIA", 16, UPPER_B32), lambda: key("ASIA", 16, UPPER_B32)],
    "github": [lambda p=p: key(p, 36) for p in ("ghp_", "gho_", "ghu_", "ghs_", "ghr_")],
    "github_fine_grained": [lambda: key("github_pat_11", 80, ALNUM + "_")],
}

# Text that looks a little like a key and must come out exactly as it went in.
NEAR_MISSES = {
    "sk": [
        "Her task-management-system-design was due; a brisk-and-businesslike-manner helped.",
        "the sk-short one",
    ],
    "google": ["AIza is how the key starts, AIzaSyShort too"],
    "xai": ["switch the model to xai-grok-2-1212 or grok-beta"],
    "groq": ["the gsk_test_placeholder value"],
    "huggingface": ["- (id)hf_requiredCharacteristicTypesForDisplayMetadata;", "hf_token = None"],
    "huggingface_org": ["const api_org_controller = require('./organizations');"],
    "aws": ["TODAYINASIAASACKOFRICEFELLOVER", "AKIA is an AWS prefix; ASIA TOUR 2024 TICKETS"],
    "github": ["ghp_short and the ghost_of_the_opera_house_and_other_stories_told"],
    "github_fine_grained": ["a github_pat_example in the docs"],
}

STORY = (
    "The courier handed over request 123e4567-e89b-12d3-a456-426614174000 and said the "
    "seal's hash was 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08, "
    "commit 4b825dc642cb6eb9a060e54bf8d69288fbee4904. She was the bearer of bad news, "
    "gave a token of thanks and asked for the key to the old tower."
)


def test_every_shape_has_examples_and_near_misses() -> None:
    names = [shape.name for shape in KEY_SHAPES]
    assert len(set(names)) == len(names)
    assert set(SHAPE_EXAMPLES) == set(names) == set(NEAR_MISSES)
    assert all(shape.source for shape in KEY_SHAPES)


@pytest.mark.parametrize(
    ("shape", "make"),
    [(name, make) for name, makers in SHAPE_EXAMPLES.items() for make in makers],
)
def test_key_shape_masked_in_free_text(shape: str, make: Callable[[], str]) -> None:
    secret = make()
    hints = next(s.hints for s in KEY_SHAPES if s.name == shape)
    assert any(h in secret for h in hints)  # the fast path looks for it
    contexts = [
        f"Invalid API key: {secret}. Check your settings.",
        f"my key is {secret}",
        f'{{"error": {{"message": "Incorrect API key provided:\\n{secret}"}}}}',
        f"https://host.example/v1?x=1&k=%20{secret}",
        f"({secret})",
    ]
    for text in contexts:
        out = redact_text(text)
        assert_no_leak(out, secret)
        assert "…" in out
        assert visible(mask(secret)) <= 7
    # The same key in a parsed JSON body (the request log's narrowed path).
    body = {"messages": [{"role": "user", "content": f"here: {secret}"}], "max_tokens": 5}
    raw = orjson.dumps(body)
    assert_no_leak(orjson.dumps(Redactor().parsed_json(raw, orjson.loads(raw))).decode(), secret)


@pytest.mark.parametrize(
    "text", [text for texts in NEAR_MISSES.values() for text in texts] + [STORY]
)
def test_near_misses_left_alone(text: str) -> None:
    assert redact_text(text) == text
    raw = orjson.dumps({"content": text})
    assert Redactor().parsed_json(raw, orjson.loads(raw)) == {"content": text}


def test_bearer_token_in_free_text() -> None:
    token = key("", 40, TOKEN + ".")
    out = redact_text(f"curl -H 'Authorization: Bearer {token}' and then bearer {token}")
    assert_no_leak(out, token)
    assert out.count("Bearer ") == 1 and "bearer " in out
    assert redact_text("Bearer 12345 and the bearer of bad news") == (
        "Bearer 12345 and the bearer of bad news"
    )


def test_a_word_before_a_key_is_kept() -> None:
    secret = key("ghp_", 36)
    assert redact_text(f"Bearer {secret}") == f"Bearer ghp…{secret[-4:]}"
    assert redact_text(f'{{"token": "{secret}"}}') == f'{{"token": "ghp…{secret[-4:]}"}}'


def test_a_redactor_with_a_client_key_is_made_once_per_key_and_bounded() -> None:
    base = Redactor(["configured-secret-123456"])
    key = random_key("sk-")
    first = base.with_secrets([key])
    assert base.with_secrets([key]) is first  # the same client key: the same redactor
    assert key not in first.text(f"said {key}") and "configured-secret-123456" not in first.text(
        "configured-secret-123456"
    )
    assert base.with_secrets([""]) is base
    others = [base.with_secrets([random_key("sk-")]) for _ in range(200)]
    assert len(base._derived) <= 64
    assert others[-1] is not first
    again = base.with_secrets([key])  # made again after the bound cleared it: still masks
    assert key not in again.text(key)
