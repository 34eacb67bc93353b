"""The locks: the admin token on the admin routes, the client keys on the chat endpoints.

The admin routes (:func:`guard.is_admin_path`: the dashboard and its API,
``/metrics``, ``/logs``, ``/health/detailed``) show prompts, replies and how the
proxy is set up. :mod:`guard` keeps other web pages away from them; once the
proxy listens beyond loopback, anyone on the network could still ask, so they
then need the admin token (``server.admin_token``, ``FHP_ADMIN_TOKEN``, or one
generated at start-up and printed once). ``server.api_keys`` optionally limits
the chat endpoints, which spend the upstream key, to clients that present one.

Every refusal is counted and error-logged without the secret that was
presented; past :data:`REFUSAL_LOGS_PER_MINUTE` a minute they are only counted,
and summed up in one event, so a hostile page cannot flush the error log.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import Server, is_local_host
from .demo import DEMO_PREFIX
from .guard import is_admin_path
from .logs.error_log import ErrorEvent

if TYPE_CHECKING:
    from .state import State

log = logging.getLogger("first_hop_proxy")

#: The admin routes that hold no data and so need no token: the page shell, which
#: has to load before it can ask for the token, and its static files.
PAGE_PATHS = frozenset({"/", "/dashboard"})
PAGE_PREFIX = "/dashboard/static/"
#: Client paths checked against ``server.api_keys``: chat and the model list.
CLIENT_SUFFIXES = ("/chat/completions", "/models")
#: Headers a client key may come in; with ``api_keys`` set they are not forwarded.
KEY_HEADERS = ("authorization", "x-api-key")
REFUSAL_LOGS_PER_MINUTE = 20
TOKEN_BYTES = 24
REALM = "first-hop-proxy"

#: (status, message, code) of a refusal.
Refusal = tuple[int, str, str]

TOKEN_MISSING: Refusal = (
    401,
    "This page needs the proxy's admin token: send 'Authorization: Bearer <token>' "
    "(server.admin_token in config.yaml or FHP_ADMIN_TOKEN, or the token the proxy "
    "printed when it started).",
    "admin_token_missing",
)
TOKEN_WRONG: Refusal = (
    401,
    "The admin token is wrong: use server.admin_token from config.yaml (or "
    "FHP_ADMIN_TOKEN), or the token the proxy printed when it started.",
    "admin_token_wrong",
)
KEY_MISSING: Refusal = (
    401,
    "This proxy needs an API key: enter one of its server.api_keys as the API key in "
    "SillyTavern (sent as 'Authorization: Bearer <key>').",
    "api_key_missing",
)
KEY_WRONG: Refusal = (
    401,
    "The API key is not one this proxy accepts: use one of server.api_keys from the "
    "proxy's config.yaml.",
    "api_key_wrong",
)


def is_page_path(path: str) -> bool:
    return path in PAGE_PATHS or path.startswith(PAGE_PREFIX)


def is_client_path(path: str) -> bool:
    return path.endswith(CLIENT_SUFFIXES) and not path.startswith(DEMO_PREFIX)


def presented_secret(headers: Mapping[str, str]) -> str | None:
    """The bearer token or ``X-API-Key`` a request carries, if any.

    ``Bearer undefined`` and a bare ``Bearer`` are what SillyTavern sends without a key.
    """
    scheme, _, token = headers.get("Authorization", "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() == "bearer" and token and token not in ("undefined", "null"):
        return token
    return headers.get("X-API-Key") or None


def matches(presented: str, allowed: tuple[str, ...]) -> bool:
    """Constant-time comparison against every allowed secret."""
    given = presented.encode("utf-8", "replace")
    found = False
    for secret in allowed:
        found |= hmac.compare_digest(given, secret.encode("utf-8"))
    return found


@dataclass(eq=False)
class Access:
    """The admin token in force, the accepted client keys, and the refusal log's budget."""

    admin_token: str | None  # None: the admin routes are open (loopback, no token set)
    generated: bool = False  # made up at start-up: printed once so the person can use it
    api_keys: tuple[str, ...] = ()
    host: str = "127.0.0.1"  # where the proxy listens
    _minute: int = 0
    _logged: int = 0
    _suppressed: int = 0

    @classmethod
    def from_config(cls, server: Server, host: str, previous: Access | None = None) -> Access:
        """``host`` is where the proxy listens; beyond loopback the admin side needs a token.

        A config reload (``previous``) keeps a generated token: the person was told it once.
        """
        token = server.admin_token or None
        generated = token is None and not is_local_host(host)
        if generated:
            kept = previous is not None and previous.generated
            token = (
                previous.admin_token if kept and previous else secrets.token_urlsafe(TOKEN_BYTES)
            )
        access = cls(token, generated, tuple(server.api_keys), host)
        if previous is not None:  # the refusal log's budget carries over too
            access._minute, access._logged = previous._minute, previous._logged
            access._suppressed = previous._suppressed
        return access

    @property
    def consumed_headers(self) -> frozenset[str]:
        """Client headers the proxy reads itself and does not forward: the client key."""
        return frozenset(KEY_HEADERS) if self.api_keys else frozenset()

    @property
    def secrets(self) -> list[str]:
        """Everything here the redactor must mask."""
        return [s for s in (self.admin_token, *self.api_keys) if s]

    def refusal(self, path: str, headers: Mapping[str, str]) -> Refusal | None:
        """Why a request to ``path`` may not go on, or None. Two attribute reads when
        neither lock is set (the usual loopback case)."""
        if self.admin_token is not None and is_admin_path(path) and not is_page_path(path):
            presented = presented_secret(headers)
            if presented is None:
                return TOKEN_MISSING
            return None if matches(presented, (self.admin_token,)) else TOKEN_WRONG
        if self.api_keys and is_client_path(path):
            presented = presented_secret(headers)
            if presented is None:
                return KEY_MISSING
            return None if matches(presented, self.api_keys) else KEY_WRONG
        return None

    def refused(self, state: State, event: ErrorEvent) -> None:
        """Count a refusal and log it, within the per-minute budget."""
        code = str(event.error_code)
        state.stats.refusals[code] += 1
        minute = int(time.time() // 60)
        if minute != self._minute:
            if self._suppressed:
                state.error_log.log(
                    ErrorEvent(
                        "refused",
                        "Refused",
                        f"{self._suppressed} more refused requests in the previous minute "
                        "(counted, not logged one by one)",
                        context={"suppressed": self._suppressed},
                    )
                )
            self._minute, self._logged, self._suppressed = minute, 0, 0
        if self._logged >= REFUSAL_LOGS_PER_MINUTE:
            self._suppressed += 1
            return
        self._logged += 1
        log.warning(
            "refused %s %s from %s: %s %s",
            event.method,
            event.path,
            event.client,
            event.status_code,
            code,
        )
        state.error_log.log(event)
