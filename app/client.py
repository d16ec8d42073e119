"""Where the TorchServe inference API is, its key, and what its answers mean.

The key comes from TorchServe's ``key_file.json`` through ``handlers.tokens.Keys`` on every request
(renewed there when expired or refused), or from ``TORCHSERVE_TOKEN`` (never renewed); it only
ever travels from this process to TorchServe.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

import httpx

from handlers.settings import KEY_FILE, MODEL_NAME, RETRY_AFTER_S, server_urls
from handlers.tokens import Keys, TokenError, refused

DEFAULT_MODEL = os.environ.get("TORCHSERVE_MODEL", MODEL_NAME)
HEADERS = {"Content-Type": "application/octet-stream"}  # raw photo bytes, never a form


class ServeError(Exception):
    """TorchServe answered with an error, or could not be reached (``status`` 503); ``retry_after`` (seconds)
    where trying again later may succeed: a 503 tells the caller when."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after if retry_after is not None or status != 503 else RETRY_AFTER_S


@dataclass(frozen=True)
class ServeTarget:
    url: str
    keys: Keys
    model: str = DEFAULT_MODEL

    @property
    def predict_url(self) -> str:
        return f"{self.url.rstrip('/')}/predictions/{self.model}"

    def headers(self) -> dict[str, str]:
        try:
            return {**HEADERS, **self.keys.inference_headers()}
        except TokenError as e:
            raise ServeError(503, str(e)) from e

    def post(self, client: httpx.Client, data: bytes, headers: dict | None = None) -> httpx.Response:
        """The photo to TorchServe with the inference key (renewed and resent once if refused); ``headers``
        carry per-request settings (X-Topk, X-Min-Precision)."""
        try:
            return self.keys.send(lambda h: client.post(self.predict_url, content=data, headers=h),
                                  {**HEADERS, **(headers or {})})
        except TokenError as e:
            raise ServeError(503, str(e)) from e


def add_target_args(p: argparse.ArgumentParser) -> None:
    """The flags naming the server, shared by the web app and the tagger."""
    p.add_argument("--inference-url", default=None,
                   help="TorchServe inference API base URL (default: TORCHSERVE_URL, else the `make serve` server)")
    p.add_argument("--management-url", default=None,
                   help="management API base URL, to renew an expired key (default: TORCHSERVE_MANAGEMENT_URL, "
                        "else the server.json beside the key file, else config.properties)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="registered model name")
    p.add_argument("--key-file", type=Path, default=KEY_FILE,
                   help="TorchServe's key_file.json (or set TORCHSERVE_TOKEN, which cannot be renewed)")


def target_from_args(args: argparse.Namespace) -> ServeTarget:
    """Flags, else environment, else the server that `start` left beside the key file (`make serve`'s)."""
    urls = server_urls(args.key_file.parent)
    keys = Keys(args.key_file, args.management_url or os.environ.get("TORCHSERVE_MANAGEMENT_URL") or urls["management"],
                token=os.environ.get("TORCHSERVE_TOKEN"))
    return ServeTarget(args.inference_url or os.environ.get("TORCHSERVE_URL") or urls["inference"], keys, args.model)


def message(body: bytes) -> str:
    """The error text of a TorchServe answer: the handler's {"error"}, TorchServe's own {"message"}, or the text."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()[:300]
    if isinstance(parsed, dict):
        return str(parsed.get("error") or parsed.get("message") or parsed)
    return str(parsed)


def upstream_error(status: int, body: bytes) -> ServeError | None:
    """None for TorchServe's 200, else the error its answer means for the caller: the handler's own 4xx keeps
    its status (a bad photo or setting), a refused key or a TorchServe failure is the gateway's 502, and
    TorchServe's 503 (queue full, no worker) stays a 503 with a time to retry after."""
    if status == 200:
        return None
    text = body.decode("utf-8", "replace")
    if status in (401, 403) or refused(status, text):
        return ServeError(502, "TorchServe refused the inference token (was the server restarted with a new key?)")
    if status == 404:
        return ServeError(503, f"the model is not registered on TorchServe: {message(body)}")
    if status == 503:
        return ServeError(503, f"TorchServe is at capacity or has no worker ready: {message(body)}")
    if status == 413:
        return ServeError(413, "file too large for TorchServe's max_request_size")
    if 400 <= status < 500:
        return ServeError(status, message(body) or f"TorchServe answered {status}")
    return ServeError(502, f"TorchServe failed on this photo: {message(body) or status}")


def parse_answer(response: httpx.Response) -> dict:
    """TorchServe's answer (``landmark.predict.answer``: landmark or null, reason, confidence, top_k), or
    ServeError with a status meant for the caller."""
    if (error := upstream_error(response.status_code, response.content)) is not None:
        raise error
    body = response.json()
    top_k = body.get("top_k") if isinstance(body, dict) else None
    if (not isinstance(top_k, list) or not all(isinstance(p, dict) and "label" in p for p in top_k)
            or "landmark" not in body):
        raise ServeError(502, f"unexpected answer from TorchServe: {str(body)[:200]}")
    return body


def unreachable(target: ServeTarget, error: Exception) -> ServeError:
    return ServeError(503, f"the inference server is not reachable at {target.url} ({error.__class__.__name__}); "
                           "start it with `make serve`")
