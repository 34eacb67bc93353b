"""The upstream's limits, as upstreams say them in their error bodies.

Google's 429 ``RESOURCE_EXHAUSTED`` carries a ``QuotaFailure`` (whose
``quotaId`` says whether the quota is per minute or per day) and a
``RetryInfo`` (``retryDelay: "26s"``); other upstreams write "Please retry in
51.2s" into the message. A per-day quota resets only the next day, so retrying
before then cannot help: the proxy fails fast and says when it resets.
Google's OpenAI-compatible endpoints wrap the error in a list; OpenRouter puts
the provider's own words in ``error.metadata``. Pure functions, no I/O.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, tzinfo
from functools import cache
from typing import Any, Final

import orjson

from .dialects import json_error_message


@cache
def pacific() -> tzinfo:
    """Google's daily quotas reset at midnight Pacific time (loaded when first needed)."""
    from zoneinfo import ZoneInfo

    return ZoneInfo("America/Los_Angeles")


_DELAY: Final = re.compile(
    r"\b(?:retry|try again)(?: the request)? (?:in|after) (\d+(?:\.\d+)?) ?"
    r"(ms|milliseconds?|s|secs?|seconds?|m|mins?|minutes?|h|hours?)\b",
    re.IGNORECASE,
)
_DAILY: Final = re.compile(
    r"\b(?:daily (?:quota|limit|request limit)|(?:requests|tokens|quota) per day|per[- ]day"
    r" (?:quota|limit)|free-models-per-day|RPD\b)",
    re.IGNORECASE,
)
_GOOGLE_DURATION: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")


def unwrap(doc: Any) -> Any:
    """``[{"error": {...}}]`` (Google's OpenAI-compatible and Vertex endpoints) -> the object."""
    if isinstance(doc, list) and doc and isinstance(doc[0], dict) and "error" in doc[0]:
        return doc[0]
    return doc


def _details(doc: Any) -> list[dict[str, Any]]:
    error = doc.get("error") if isinstance(doc, dict) else None
    details = error.get("details") if isinstance(error, dict) else None
    return [d for d in details if isinstance(d, dict)] if isinstance(details, list) else []


def _of_type(doc: Any, name: str) -> list[dict[str, Any]]:
    return [d for d in _details(doc) if str(d.get("@type", "")).endswith(name)]


def body_retry_delay(doc: Any, text: str) -> float | None:
    """Seconds the upstream asks to wait, said in its body: Google's ``RetryInfo``, or a
    "Please retry in 51.2s" sentence. None when the body says nothing of it."""
    for info in _of_type(doc, "google.rpc.RetryInfo"):
        delay = info.get("retryDelay")
        if isinstance(delay, str):
            found = _GOOGLE_DURATION.match(delay)
            if found:
                return float(found[1])
        elif isinstance(delay, dict):
            seconds = delay.get("seconds", 0)
            nanos = delay.get("nanos", 0)
            if isinstance(seconds, int | float | str) and isinstance(nanos, int | float):
                try:
                    return float(seconds) + float(nanos) / 1e9
                except ValueError:
                    return None
    found = _DELAY.search(text[:4096])
    if found is None:
        return None
    return float(found[1]) * _unit_seconds(found[2])


def _unit_seconds(unit: str) -> float:
    unit = unit.lower()
    if unit.startswith(("ms", "milli")):
        return 0.001
    if unit.startswith("s"):
        return 1.0
    if unit.startswith("m"):
        return 60.0
    return 3600.0


def daily_quota(doc: Any, text: str) -> str | None:
    """What says a per-day quota is used up (a Google quota id, or the words), else None."""
    for failure in _of_type(doc, "google.rpc.QuotaFailure"):
        for violation in failure.get("violations") or ():
            if isinstance(violation, dict):
                quota = str(violation.get("quotaId") or violation.get("quotaMetric") or "")
                if "perday" in quota.lower().replace("_", ""):
                    return quota
    found = _DAILY.search(text[:4096])
    return found[0] if found else None


def is_google_quota(doc: Any) -> bool:
    """The quota is Google's (its reset time is known: midnight Pacific)."""
    return bool(_of_type(doc, "google.rpc.QuotaFailure"))


def next_pacific_midnight(now: float) -> float:
    """The Unix time of the next midnight in the US Pacific time zone after ``now``."""
    local = datetime.fromtimestamp(now, pacific())
    midnight = (local + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return midnight.timestamp()


def provider_detail(doc: Any) -> str:
    """OpenRouter's ``error.metadata``: which provider failed and what it said."""
    error = doc.get("error") if isinstance(doc, dict) else None
    metadata = error.get("metadata") if isinstance(error, dict) else None
    if not isinstance(metadata, dict):
        return ""
    raw = metadata.get("raw")
    said = ""
    if isinstance(raw, str) and raw.strip():
        try:
            said = json_error_message(unwrap(orjson.loads(raw))) or raw.strip()
        except orjson.JSONDecodeError:
            said = raw.strip()
    elif isinstance(raw, dict):
        said = json_error_message(raw)
    provider = metadata.get("provider_name")
    name = provider.strip() if isinstance(provider, str) else ""
    if name and said:
        return f"{name}: {said}"
    return name or said
