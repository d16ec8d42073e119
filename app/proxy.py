"""The app's one road to TorchServe, built to cost the workers as little CPU as it can on a small machine.

One pooled async HTTP client for the process's life (a new client per request built an SSL context and a
TCP connection each time, in a worker thread); the inference key read inline from ``handlers.tokens.Keys``
(cached, renewed in a thread when due); TorchServe's answer bytes passed through as they came, never parsed
and re-serialised; and a ``Gate`` on the photos in flight, past which a request gets an immediate 503 with
Retry-After instead of a queue.
"""

from __future__ import annotations

import asyncio

import httpx

from app.client import HEADERS, ServeError, ServeTarget, unreachable, upstream_error
from handlers.health import no_description, workers_unready
from handlers.settings import RETRY_AFTER_S
from handlers.tokens import TokenError


class Gate:
    """At most ``limit`` requests in flight. The event loop runs one coroutine at a time, so a plain
    counter is exact; a request turned away never waits and never reads its body."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    def enter(self) -> ServeError | None:
        """None, and the request counts as in flight until ``leave``; else the 503 to answer at once."""
        if self.in_flight >= self.limit:
            return ServeError(503, f"the tagger is at capacity ({self.limit} requests in progress): "
                                   f"retry in {RETRY_AFTER_S} s", RETRY_AFTER_S)
        self.in_flight += 1
        return None

    def leave(self) -> None:
        self.in_flight -= 1


class Upstream:
    """TorchServe's inference and management APIs through one connection pool of ``connections``."""

    def __init__(self, target: ServeTarget, timeout: float, connections: int) -> None:
        self.target = target
        self.timeout = timeout
        self.client = httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(
            max_connections=connections, max_keepalive_connections=connections))
        self.model_version: str | None = None  # from the management API's describe, once it answered

    async def aclose(self) -> None:
        await self.client.aclose()

    async def predict(self, photo: bytes, headers: dict[str, str] | None = None) -> bytes:
        """TorchServe's answer JSON for ``photo`` as it came, or ServeError: the handler's own 4xx for a bad
        photo or setting, 503 + Retry-After when TorchServe is full or down, 502 when it failed."""
        try:
            r = await self.target.keys.send_async(
                lambda h: self.client.post(self.target.predict_url, content=photo, headers=h),
                {**HEADERS, **(headers or {})})
        except TokenError as e:
            raise ServeError(503, str(e)) from e
        except httpx.TimeoutException as e:
            raise ServeError(504, f"TorchServe did not answer within {self.timeout:g} s "
                                  f"({e.__class__.__name__})") from e
        except httpx.HTTPError as e:
            raise unreachable(self.target, e) from e
        if (error := upstream_error(r.status_code, r.content)) is not None:
            raise error
        return r.content

    async def ping(self) -> ServeError | None:
        """None while TorchServe's frontend answers /ping (it does with every worker dead), else why not."""
        try:
            r = await self.target.keys.send_async(
                lambda h: self.client.get(f"{self.target.url.rstrip('/')}/ping", headers=h, timeout=5))
        except TokenError as e:
            return ServeError(503, str(e))
        except httpx.HTTPError as e:
            return unreachable(self.target, e)
        return None if r.status_code == 200 else ServeError(503, f"TorchServe /ping answered {r.status_code}")

    async def unready(self) -> str | None:
        """None while the model has a READY worker (the management API's describe), else why not; remembers
        the model's version for the v2 metadata."""
        keys, url = self.target.keys, self.target.keys.management_url
        if not url:
            return "no management URL known to ask for the model's workers"
        try:
            auth = await asyncio.to_thread(keys.management_headers) if keys.due("management") \
                else keys.management_headers()
            r = await self.client.get(f"{url.rstrip('/')}/models/{self.target.model}", headers=auth, timeout=10)
            r.raise_for_status()
            described = r.json()[0]
            workers = described["workers"]
        except (httpx.HTTPError, TokenError, ValueError, KeyError, IndexError) as e:
            return no_description(self.target.model, url, e)
        self.model_version = described.get("modelVersion", self.model_version)
        return workers_unready(self.target.model, workers)
