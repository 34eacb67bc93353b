"""The config as shown to a person (``check-config``, the dashboard): secrets masked."""

from __future__ import annotations

from typing import Any

from .config import LoadedConfig
from .redact import is_secret_header, masked_url


def mask_secret(value: str) -> str:
    """Enough to recognize a key, never enough to use it."""
    scheme, _, token = value.partition(" ")
    if not token:
        scheme, token = "", value
    shown = token[-4:] if len(token) >= 12 else ""
    return f"{scheme} ***{shown}".strip()


def effective_config(loaded: LoadedConfig) -> dict[str, Any]:
    """The config as the proxy will use it, safe to paste into a bug report."""
    data = loaded.config.model_dump(mode="json")
    for target in [data["target_proxy"], *data["upstreams"]]:
        target["url"] = masked_url(target["url"]) if target["url"] else ""
        headers = target["headers"]
        for name, value in headers.items():
            if is_secret_header(name):
                headers[name] = mask_secret(value)
        target["keys"] = [mask_secret(key) for key in target.get("keys") or ()]
    server = data["server"]
    if server["admin_token"]:
        server["admin_token"] = mask_secret(server["admin_token"])
    server["api_keys"] = [mask_secret(key) for key in server["api_keys"]]
    return data
