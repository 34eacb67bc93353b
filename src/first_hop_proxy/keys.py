"""A pool of keys for one upstream: which key a request uses, and what each key's limits are.

People collect several free keys and rotate them by hand; here each request
uses one key of the pool (``round_robin``: the next in turn, ``fill_first``:
the first ready one), and each key keeps its own state:

- **retired**: the upstream refused it (401, 403, "invalid API key"), until the
  config is reloaded; the request goes on at once with the next key;
- **cooling**: it hit a rate limit; for as long as the upstream asked (or the
  backoff delay), while requests move on to ready keys without waiting;
- **out**: its daily quota is used up, until the quota resets.

When every key gets plain 429s at about the same time, the upstream is
throttling the address, not the keys: no key is cooled, and the request backs
off as it would with one key. No clock is read here: ``now`` (Unix time) is
passed in. A key is only ever shown by its last four characters.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any, Final

from .config import KEY_HEADERS, KeyStrategy
from .decisions import Action, Decision

#: Plain 429s on every key within this many seconds: the address is throttled.
THROTTLE_WINDOW: Final = 10.0
#: An upstream's words for a key it does not accept (with a 400, as Google sends it).
INVALID_KEY: Final = re.compile(
    r"\b(?:invalid|incorrect|unknown|revoked|expired)[ _-]?(?:api[ _-]?)?key\b"
    r"|\bapi[ _-]?key[ _-](?:is )?(?:not valid|invalid|expired|revoked)\b"
    r"|\bAPI_KEY_INVALID\b|\binvalid_api_key\b",
    re.IGNORECASE,
)


class KeyState(enum.StrEnum):
    READY = "ready"
    COOLING = "cooling"
    OUT = "out"
    RETIRED = "retired"


class Verdict(enum.Enum):
    """What an attempt said about the key it used."""

    FINE = "fine"
    REFUSED = "refused"
    RATE_LIMITED = "rate_limited"
    DAILY = "daily"
    NEUTRAL = "neutral"  # a failure that has nothing to do with the key (a 503)


def verdict_of(decision: Decision) -> Verdict:
    if decision.quota is not None:
        return Verdict.DAILY
    if decision.action is Action.DELIVER:
        return Verdict.FINE
    if decision.status in (401, 403) or (
        decision.status < 500 and INVALID_KEY.search(decision.upstream_message)
    ):
        return Verdict.REFUSED
    if decision.status == 429:
        return Verdict.RATE_LIMITED
    return Verdict.NEUTRAL


def label_of(secret: str, position: int) -> str:
    """``...x7Qa``: enough to tell keys apart, never enough to use one. A key too short
    for its last four characters to be harmless is shown by its place in the list."""
    if len(secret) < 16:
        return f"key #{position + 1}"
    return f"...{secret[-4:]}"


@dataclass(slots=True, eq=False)
class Key:
    secret: str
    label: str
    state: KeyState = KeyState.READY
    until: float = 0.0  # COOLING and OUT: when it is ready again (Unix time)
    reason: str = ""
    plain_429_at: float | None = None


@dataclass(frozen=True, slots=True)
class Blocked:
    """Why no key is ready: ``refused`` (all retired), ``out`` (daily quotas), ``cooling``."""

    kind: str
    wait: float  # seconds until the first key is back (0 for refused)
    message: str


class Step(enum.Enum):
    """What the request does after an attempt's verdict on its key."""

    STAY = "stay"  # as the decision says (deliver, retry after the delay, fail)
    NEXT_KEY = "next_key"  # at once, with another key
    BACK_OFF = "back_off"  # the address is throttled: retry after the delay, any key


class KeyPool:
    """The keys of one upstream, and how each one fares."""

    __slots__ = ("_turn", "header", "keys", "strategy")

    def __init__(self, secrets: list[str], header: str, strategy: KeyStrategy) -> None:
        self.keys = [Key(s, label_of(s, i)) for i, s in enumerate(dict.fromkeys(secrets))]
        self.header = header
        self.strategy = strategy
        self._turn = 0

    def headers(self, key: Key) -> tuple[tuple[str, ...], str, str]:
        """(the client's key headers to drop, the header to set, its value)."""
        value = f"Bearer {key.secret}" if self.header.lower() == "authorization" else key.secret
        return KEY_HEADERS, self.header, value

    def _refresh(self, now: float) -> None:
        for key in self.keys:
            if key.state in (KeyState.COOLING, KeyState.OUT) and key.until <= now:
                key.state, key.reason = KeyState.READY, ""

    def pick(self, now: float) -> Key | None:
        """The key for the next attempt, or None when none is ready."""
        self._refresh(now)
        ready = [k for k in self.keys if k.state is KeyState.READY]
        if not ready:
            return None
        if self.strategy == "fill_first":
            return ready[0]
        count = len(self.keys)
        for step in range(count):
            key = self.keys[(self._turn + step) % count]
            if key.state is KeyState.READY:
                self._turn = (self._turn + step + 1) % count
                return key
        return ready[0]  # not reached: a ready key was found above

    def has_ready(self, now: float) -> bool:
        self._refresh(now)
        return any(k.state is KeyState.READY for k in self.keys)

    def record(self, key: Key, decision: Decision, now: float) -> Step:
        """Update ``key`` after an attempt with it; say what the request does next."""
        verdict = verdict_of(decision)
        if verdict is Verdict.FINE:
            key.plain_429_at = None
            return Step.STAY
        if verdict is Verdict.REFUSED:
            key.state, key.reason = KeyState.RETIRED, decision.upstream_message or "refused"
            key.reason = f"refused ({decision.status}): {key.reason}"
            return Step.NEXT_KEY
        if verdict is Verdict.DAILY:
            key.state, key.until = KeyState.OUT, now + (decision.retry_after or 3600.0)
            key.reason = f"daily quota used up ({decision.quota})"
            return Step.NEXT_KEY
        if verdict is Verdict.RATE_LIMITED:
            if decision.retry_after is None:
                key.plain_429_at = now
                if self._throttled(now):
                    return Step.BACK_OFF
            wait = decision.retry_after if decision.retry_after is not None else decision.delay
            key.state, key.until = KeyState.COOLING, now + max(wait, 0.0)
            key.reason = f"rate limited for {wait:.1f} s"
            return Step.NEXT_KEY
        return Step.STAY

    def _throttled(self, now: float) -> bool:
        """Every usable key had a plain 429 just now: it is the address, not the keys.
        Their individual cool-downs are lifted: backing off helps, not another key."""
        usable = [k for k in self.keys if k.state in (KeyState.READY, KeyState.COOLING)]
        recent = [
            k
            for k in usable
            if k.plain_429_at is not None and now - k.plain_429_at <= THROTTLE_WINDOW
        ]
        if len(usable) < 2 or len(recent) < len(usable):
            return False
        for key in usable:
            if key.reason.startswith("rate limited"):
                key.state, key.reason = KeyState.READY, ""
            key.plain_429_at = None
        return True

    def blocked(self, now: float) -> Blocked:
        """Why no key is ready, and how long until one is."""
        self._refresh(now)
        waiting = [k for k in self.keys if k.state in (KeyState.COOLING, KeyState.OUT)]
        if not waiting:
            reasons = "; ".join(f"{k.label}: {k.reason}" for k in self.keys)
            return Blocked(
                "refused",
                0.0,
                f"The upstream refused every key of the pool ({reasons}). Check the keys in "
                "config.yaml; a reload of the config tries them again.",
            )
        first = min(waiting, key=lambda k: k.until)
        wait = max(first.until - now, 0.0)
        if all(k.state is KeyState.OUT for k in waiting):
            return Blocked(
                "out",
                wait,
                f"Every key's daily quota is used up; the first key ({first.label}) comes back "
                f"in {wait / 3600:.1f} h. Retrying before then cannot help.",
            )
        return Blocked(
            "cooling",
            wait,
            f"Every key is resting after a rate limit; the first ({first.label}) is ready "
            f"again in {wait:.1f} s.",
        )

    def adopt(self, old: KeyPool) -> None:
        """Keep the limits of keys that are still in the pool after a reload; a key that
        was refused gets another chance (a reload is how a person says "try again")."""
        states = {k.secret: k for k in old.keys}
        for key in self.keys:
            before = states.get(key.secret)
            if before is not None and before.state in (KeyState.COOLING, KeyState.OUT):
                key.state, key.until, key.reason = before.state, before.until, before.reason
        self._turn = old._turn % max(len(self.keys), 1)

    def snapshot(self, now: float) -> list[dict[str, Any]]:
        """Each key by its label, with its state and until when (Unix time)."""
        self._refresh(now)
        return [
            {
                "key": k.label,
                "state": str(k.state),
                "until": k.until if k.state in (KeyState.COOLING, KeyState.OUT) else None,
                "reason": k.reason or None,
            }
            for k in self.keys
        ]
