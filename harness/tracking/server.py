"""Bounded reachability check of a ClearML API server (standard library only, no clearml).

``Task.init`` against a configured but dead server can hang for minutes; this check runs first
and always returns within ``timeout_s`` plus a fraction of a second (DNS included: the probe runs
in a daemon thread that is abandoned when the deadline passes).
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["Reachability", "check_reachable"]


@dataclass(frozen=True)
class Reachability:
    """Result of :func:`check_reachable`."""

    ok: bool
    url: str
    detail: str
    seconds: float


def check_reachable(api_host: str, timeout_s: float) -> Reachability:
    """HTTP GET ``<api_host>/debug.ping``; an answer below 500 (even 401/404) counts as reachable.

    A 5xx answer is unreachable: it comes from a proxy or load balancer in front of a dead or
    starting API server, and ClearML's SDK retries those (503 forever, 502 with a long back-off),
    so ``Task.init`` would hang. Never raises; never takes (much) longer than ``timeout_s``.
    """
    start = time.monotonic()
    url = api_host.rstrip("/") + "/debug.ping"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return Reachability(False, url, f"not an http(s) URL: {api_host!r}", 0.0)
    result: list[tuple[bool, str]] = []

    def probe() -> None:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:
                result.append((True, f"HTTP {resp.status}"))
        except urllib.error.HTTPError as exc:  # something answered: a live server unless 5xx
            result.append((exc.code < 500, f"HTTP {exc.code}"))
        except Exception as exc:  # refused, timeout, DNS failure, TLS error ...
            reason = getattr(exc, "reason", exc)
            result.append((False, f"{type(exc).__name__}: {reason}"))

    thread = threading.Thread(target=probe, name="clearml-reachability", daemon=True)
    thread.start()
    thread.join(timeout_s + 0.5)
    elapsed = time.monotonic() - start
    if not result:
        return Reachability(False, url, f"no answer within {timeout_s:g} s", elapsed)
    ok, detail = result[0]
    return Reachability(ok, url, detail, elapsed)
