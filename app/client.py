"""Where the TorchServe inference API is, its token, and what its answers mean.

The token is read from TorchServe's ``key_file.json`` on every request (a restarted server writes
a new one) or taken from ``TORCHSERVE_TOKEN``; it only ever travels from this process to TorchServe.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import httpx

from handlers.server import DEFAULT_WORKDIR, STATE_FILE

DEFAULT_MODEL = os.environ.get("TORCHSERVE_MODEL", "landmark")
DEFAULT_KEY_FILE = DEFAULT_WORKDIR / "key_file.json"  # where `make serve` has TorchServe write its keys
HEADERS = {"Content-Type": "application/octet-stream"}  # raw photo bytes, never a form


def default_url() -> str:
    """TORCHSERVE_URL, else the inference port of the server `make serve` started, else 8080."""
    if os.environ.get("TORCHSERVE_URL"):
        return os.environ["TORCHSERVE_URL"]
    try:
        port = json.loads((DEFAULT_WORKDIR / STATE_FILE).read_text(encoding="utf-8"))["ports"]["inference"]
    except (OSError, ValueError, KeyError, TypeError):
        port = 8080
    return f"http://127.0.0.1:{port}"


class ServeError(Exception):
    """TorchServe answered with an error, or could not be reached (``status`` 503)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ServeTarget:
    url: str
    model: str = DEFAULT_MODEL
    key_file: Path | None = DEFAULT_KEY_FILE
    token: str | None = None

    @property
    def predict_url(self) -> str:
        return f"{self.url.rstrip('/')}/predictions/{self.model}"

    def headers(self) -> dict[str, str]:
        token = self.token or os.environ.get("TORCHSERVE_TOKEN") or read_inference_key(self.key_file)
        return {**HEADERS, "Authorization": f"Bearer {token}"} if token else dict(HEADERS)


def read_inference_key(key_file: Path | None) -> str | None:
    """The inference key from TorchServe's key_file.json; None where there is no file (auth off)."""
    if key_file is None or not Path(key_file).is_file():
        return None
    try:
        return json.loads(Path(key_file).read_text(encoding="utf-8"))["inference"]["key"]
    except (ValueError, KeyError, TypeError) as e:
        raise ServeError(503, f"cannot read the inference key from {key_file}: {e}") from e


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300] or response.reason_phrase
    if isinstance(body, dict):
        return str(body.get("error") or body.get("message") or body)
    return str(body)


def parse_predictions(response: httpx.Response) -> list[dict]:
    """TorchServe's answer -> the top-k list, or ServeError with a status meant for the caller."""
    if response.status_code in (401, 403):
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
    predictions = body.get("predictions") if isinstance(body, dict) else body
    if not isinstance(predictions, list) or not all(isinstance(p, dict) and "label" in p for p in predictions):
        raise ServeError(502, f"unexpected answer from TorchServe: {str(body)[:200]}")
    return predictions


def unreachable(target: ServeTarget, error: Exception) -> ServeError:
    return ServeError(503, f"the inference server is not reachable at {target.url} ({error.__class__.__name__}); "
                           "start it with `make serve`")
