"""Who may use the proxy from a browser: the ``Host`` and ``Origin`` checks.

Every web page the person opens can send requests to 127.0.0.1. Without these
checks any of them could read the logs (prompts and replies) or send chats that
spend the configured key. SillyTavern calls the proxy from its server, as do
curl and the SDKs: they send no ``Origin`` and are not affected.

- A ``Host`` that is not the proxy's (an IP address, ``localhost``, the machine's
  name when it listens beyond loopback, or ``server.allowed_hosts``) is refused:
  that is how DNS rebinding, a hostile name resolving to 127.0.0.1, looks.
- A browser request from another origin, not listed in ``server.cors_origins``,
  is refused on everything but ``/health``, "simple" requests included.
- CORS headers go only to listed origins, and never on the admin pages (logs,
  detailed health, dashboard, metrics), whatever ``cors_origins`` says.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Server

#: Paths that show what the proxy saw (prompts, replies, keys masked) or how it is set up.
ADMIN_PREFIXES = ("/logs", "/health/detailed", "/dashboard", "/metrics", "/admin", "/usage")
#: Paths any page may reach: they say only that the proxy runs.
PUBLIC_PATHS = frozenset({"/health"})
#: ``Sec-Fetch-Site`` values of a request a page on another site made.
FOREIGN_SITES = frozenset({"cross-site", "same-site"})


def is_admin_path(path: str) -> bool:
    return path == "/" or path.startswith(ADMIN_PREFIXES)


def host_name(host: str) -> str:
    """The name in a ``Host`` header, without its port, brackets and trailing dot."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host[1:]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@lru_cache(maxsize=64)
def local_name(host: str) -> tuple[bool, str]:
    """(Is ``host`` an IP address or a ``localhost`` name, its bare name).

    Remembered: a client sends the same ``Host`` on every request, and parsing
    it as an address each time was 1 % of a request's event-loop time.
    """
    name = host_name(host)
    local = is_ip_literal(name) or name == "localhost" or name.endswith(".localhost")
    return local, name


@dataclass(frozen=True, slots=True)
class Guard:
    """The checks for one config's ``server`` section."""

    allowed_hosts: frozenset[str]
    cors_origins: frozenset[str]
    any_origin: bool = False

    @classmethod
    def from_config(cls, server: Server) -> Guard:
        from .config import is_local_host

        hosts = {host_name(h) for h in server.allowed_hosts}
        if not is_local_host(server.host):
            # Other machines reach it by this machine's name, or by an address.
            name = socket.gethostname().lower()
            hosts |= {name, f"{name}.local"}
        origins = frozenset(o.rstrip("/").lower() for o in server.cors_origins if o != "*")
        return cls(frozenset(hosts), origins, "*" in server.cors_origins)

    def host_allowed(self, host: str | None) -> bool:
        """An IP address (no DNS name, so no rebinding), ``localhost`` or a listed name."""
        if host is None:
            return True  # HTTP/1.0 clients; a browser always sends Host
        local, name = local_name(host)
        return local or name in self.allowed_hosts

    def origin_allowed(self, origin: str | None, fetch_site: str | None, host: str | None) -> bool:
        """A request no page made, a page of the proxy's own, or a listed origin."""
        if origin is None:
            # Browsers send no Origin on plain GETs; Sec-Fetch-Site still tells.
            return fetch_site not in FOREIGN_SITES or self.any_origin
        origin = origin.rstrip("/").lower()
        if host is not None and origin == f"http://{host.strip().lower()}":
            return True
        return self.any_origin or origin in self.cors_origins

    def cors_origin(self, origin: str | None, path: str) -> str | None:
        """The ``Access-Control-Allow-Origin`` value for this request, if any."""
        if origin is None or is_admin_path(path):
            return None
        if self.any_origin:
            return "*"
        return origin if origin.rstrip("/").lower() in self.cors_origins else None
