"""Where the TorchServe inference API is, its key, and what its answers mean.

The key comes from TorchServe's ``key_file.json`` through ``handlers.tokens.Keys`` on every request
(renewed there when expired or refused), or from ``TORCHSERVE_TOKEN`` (never renewed); it only
ever travels from this process to TorchServe.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import httpx

from handlers.settings import KEY_FILE, MODEL_NAME, server_urls
from handlers.tokens import Keys, TokenError, refused

DEFAULT_MODEL = os.environ.get("TORCHSERVE_MODEL", MODEL_NAME)
HEADERS = {"Content-Type": "application/octet-stream"}  # raw photo bytes, never a form


class ServeError(Exception):
    """TorchServe answered with an error, or could not be reached (``status`` 503)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


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


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300] or response.reason_phrase
    if isinstance(body, dict):
        return str(body.get("error") or body.get("message") or body)
    return str(body)


def parse_answer(response: httpx.Response) -> dict:
    """TorchServe's answer (``landmark.predict.answer``: landmark or null, reason, confidence, top_k), or
    ServeError with a status meant for the caller."""
    if response.status_code in (401, 403) or refused(response.status_code, response.text):
        raise ServeError(502, "TorchServe refused the inference token (was the server restarted with a new key?)")
    if response.status_code == 404:
        raise ServeError(503, f"the model is not registered on TorchServe: {_message(response)}")
    if response.status_code == 503:
        raise ServeError(503, f"TorchServe has no worker ready: {_message(response)}")
    if 400 <= response.status_code < 500:
        raise ServeError(response.status_code, _message(response))
    if response.status_code >= 500:
        raise ServeError(502, f"TorchServe failed on this photo: {_message(response)}")
    body = response.json()
    top_k = body.get("top_k") if isinstance(body, dict) else None
    if (not isinstance(top_k, list) or not all(isinstance(p, dict) and "label" in p for p in top_k)
            or "landmark" not in body):
        raise ServeError(502, f"unexpected answer from TorchServe: {str(body)[:200]}")
    return body


def unreachable(target: ServeTarget, error: Exception) -> ServeError:
    return ServeError(503, f"the inference server is not reachable at {target.url} ({error.__class__.__name__}); "
                           "start it with `make serve`")
