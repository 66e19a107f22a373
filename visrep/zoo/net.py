"""The one network probe: can a TCP connection to a host be opened within a bounded time? Used before a
download (pretrained weights, the Hub) so that an unreachable network fails at once with a clear
message instead of after a library's retries with back-off. Imports nothing of ours."""
from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "VISREP_OFFLINE", "TRANSFORMERS_OFFLINE")


def offline() -> bool:
    """Whether an offline flag (``HF_HUB_OFFLINE``, ``VISREP_OFFLINE``, ``TRANSFORMERS_OFFLINE``) is set, read
    at each call: nothing is then downloaded."""
    return any(os.environ.get(f, "").strip().lower() in ("1", "true", "yes", "on") for f in OFFLINE_FLAGS)


def connect(host_or_url: str, timeout: float, port: int | None = None) -> None:
    """Open and close one TCP connection to ``host_or_url`` (a host name, or a URL whose scheme gives the
    default port: https 443, http 80); raises ``OSError`` (a timeout included) when it cannot."""
    if "://" in host_or_url:
        url = urlparse(host_or_url)
        host, port = url.hostname or "", port or url.port or (443 if url.scheme == "https" else 80)
    else:
        host, port = host_or_url, port or 443
    with socket.create_connection((host, port), timeout=timeout):
        pass


def reachable(host_or_url: str, timeout: float, port: int | None = None) -> bool:
    """Whether :func:`connect` succeeds."""
    try:
        connect(host_or_url, timeout, port)
        return True
    except OSError:
        return False
