"""TorchServe's keys, read and renewed in one place.

At start TorchServe writes key_file.json into its working directory: an inference and a management
key that expire after ``token_expiration_min`` (60 by default) and an API key that never expires
and is good for one thing, the token API (``GET <management>/token?type=inference``), which replaces
one key and rewrites the file. ``make predict``, the web app, the tagger, the benchmarks and the
tests all take their headers from ``Keys``, so an expired key is renewed before use and a key that
is refused anyway (it lapsed on the way, or another client renewed it) is retried once.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol, TypeVar

import httpx

RENEW_MARGIN = timedelta(seconds=5)  # a key this close to expiry could lapse on its way to the server


class TokenError(Exception):
    """No usable key: the key file is unreadable, or a refused key cannot be renewed."""


class Response(Protocol):  # an httpx.Response, or a test's stand-in
    status_code: int
    text: str


R = TypeVar("R", bound=Response)


def refused(status: int, body: str) -> bool:
    """TorchServe's answer to a missing, wrong or expired key: 0.12 says 400 InvalidKeyException."""
    return status in (400, 401, 403) and ("InvalidKeyException" in body or "expired" in body.lower())


def expired(entry: dict) -> bool:
    """Whether a key_file.json entry ({"key", "expiration time": "2026-11-29T08:39:19.716814438Z"}) is (nearly) out."""
    return datetime.fromisoformat(entry["expiration time"]) < datetime.now(UTC) + RENEW_MARGIN


class Keys:
    """The keys of one server's ``key_file``; ``management_url`` is where they are renewed.

    ``token`` is a fixed inference key (TORCHSERVE_TOKEN): sent as it is, and never renewed, since
    renewing needs the API key of the file. Without a key file (token auth off) no key is sent."""

    def __init__(self, key_file: Path | None, management_url: str | None = None, token: str | None = None) -> None:
        self.key_file = Path(key_file) if key_file else None
        self.management_url = management_url
        self.token = token
        self._lock = threading.Lock()  # one renewal at a time: a second one would revoke the first's new key
        self._cache: tuple[tuple[int, int, int], dict] | None = None  # (inode, size, mtime) -> parsed file

    def _read(self) -> dict | None:
        """The parsed key file, re-read only when its inode, size or mtime changed: the app asks for a key on
        every request, and a stat costs microseconds where a read + JSON parse costs tens of them."""
        if self.key_file is None:
            return None
        for _ in range(3):
            try:
                st = os.stat(self.key_file)
                stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
                if self._cache is not None and self._cache[0] == stamp:
                    return self._cache[1]
                keys = json.loads(self.key_file.read_text(encoding="utf-8"))
                self._cache = (stamp, keys)
                return keys
            except FileNotFoundError:
                return None
            except ValueError as e:  # TorchServe rewrites the file in place: a read may catch it half-written
                error = e
                time.sleep(0.05)
            except OSError as e:
                raise TokenError(f"cannot read the keys in {self.key_file}: {e}") from e
        raise TokenError(f"cannot read the keys in {self.key_file}: {error}")

    def _entry(self, keys: dict, kind: str) -> dict:
        entry = keys.get(kind) if isinstance(keys, dict) else None
        if not isinstance(entry, dict) or not entry.get("key"):
            raise TokenError(f"no {kind} key in {self.key_file}")
        return entry

    def due(self, kind: str = "inference") -> bool:
        """Whether ``key(kind)`` would first renew the key (a blocking call to the token API): an async
        caller runs it in a thread then, and inline otherwise."""
        if kind == "inference" and self.token:
            return False
        keys = self._read()
        entry = keys.get(kind) if isinstance(keys, dict) else None
        return isinstance(entry, dict) and "expiration time" in entry and expired(entry)

    def key(self, kind: str = "inference") -> str | None:
        """``kind``'s key (inference / management), renewed first if the file says it has expired."""
        if kind == "inference" and self.token:
            return self.token
        keys = self._read()
        if keys is None:
            return None
        entry = self._entry(keys, kind)
        return self.renew(kind, stale=entry["key"]) if "expiration time" in entry and expired(entry) else entry["key"]

    def headers(self, kind: str) -> dict[str, str]:
        key = self.key(kind)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def inference_headers(self) -> dict[str, str]:
        return self.headers("inference")

    def management_headers(self) -> dict[str, str]:
        return self.headers("management")

    def renew(self, kind: str = "inference", stale: str | None = None) -> str:
        """A new ``kind`` key from the token API, which rewrites the key file. With ``stale``, only while the
        file still holds that key: if another client renewed it already, its key is the one to use."""
        if kind == "inference" and self.token:
            raise TokenError("TorchServe refused the inference key of TORCHSERVE_TOKEN (expired?), and a fixed "
                             "token cannot be renewed: unset TORCHSERVE_TOKEN to use key_file.json, which is")
        with self._lock:
            self._cache = None  # a renewal always reads the file itself: another client may have just rewritten it
            keys = self._read()
            if keys is None:
                raise TokenError(f"TorchServe wants a key and there is no key file at {self.key_file} to renew it")
            current = self._entry(keys, kind)["key"]
            if stale is not None and current != stale:
                return current
            if not self.management_url:
                raise TokenError(f"the {kind} key is expired or refused and no management URL is known to renew it")
            try:
                r = httpx.get(f"{self.management_url.rstrip('/')}/token", params={"type": kind}, timeout=10,
                              headers={"Authorization": f"Bearer {self._entry(keys, 'API')['key']}"})
                r.raise_for_status()
            except httpx.HTTPError as e:
                raise TokenError(f"could not renew the {kind} key at {self.management_url}: {e}") from e
            self._cache = None
            new = self._entry(self._read() or {}, kind)["key"]
            if new == current:  # the token API answers 200 with an empty body: the file is the only proof
                raise TokenError(f"the token API at {self.management_url} left the {kind} key in {self.key_file} "
                                 f"unchanged: {r.text.strip()[:200]}")
            return new

    def send(self, post: Callable[[dict[str, str]], R], headers: dict[str, str] | None = None) -> R:
        """``post(headers + inference key)``; once more with a renewed key if TorchServe refused the key."""
        sent = {**(headers or {}), **self.inference_headers()}
        response = post(sent)
        if not _refused(response):
            return response
        return post(self._renewed(sent, self.renew("inference", _stale(sent))))

    async def send_async(self, post: Callable[[dict[str, str]], Awaitable[R]],
                         headers: dict[str, str] | None = None) -> R:
        """``send`` for an event loop: the key file is read inline (cached), a renewal (a blocking call to the
        token API, once an hour) runs in a thread so that the loop keeps serving."""
        key = await asyncio.to_thread(self.inference_headers) if self.due() else self.inference_headers()
        sent = {**(headers or {}), **key}
        response = await post(sent)
        if not _refused(response):
            return response
        return await post(self._renewed(sent, await asyncio.to_thread(self.renew, "inference", _stale(sent))))

    @staticmethod
    def _renewed(sent: dict[str, str], key: str) -> dict[str, str]:
        return {**sent, "Authorization": f"Bearer {key}"}


def _stale(sent: dict[str, str]) -> str:
    return sent.get("Authorization", "").removeprefix("Bearer ")


def _refused(response: Response) -> bool:
    """``refused`` that reads the body only for a status that can mean a refused key (not every photo's answer)."""
    return response.status_code in (400, 401, 403) and refused(response.status_code, response.text)
