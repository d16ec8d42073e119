"""Liveness and readiness of a TorchServe 0.12 model, for ``make ready``, the web app and the tests.

Measured on 0.12 with token auth on: ``/ping`` answers 200 Healthy while the only worker is dead and
being restarted, and while a model that never loads is retried forever, so it only shows that the
frontend answers (liveness). ``/v2/health/ready`` answers 404, and with ts_open_inference_protocol=true
``{"ready": true}`` even for a model that never loads; ``/v2/models/<name>/ready`` is 404 either way.
The management API's describe lists each worker with its status, so a model is ready while at least
one of its workers is READY.
"""

from __future__ import annotations

import httpx

from handlers.tokens import Keys, TokenError


def describe(management_url: str, keys: Keys, model: str) -> dict:
    """The management API's description of ``model`` (workers, batch settings); raises on any failure."""
    r = httpx.get(f"{management_url.rstrip('/')}/models/{model}", headers=keys.management_headers(), timeout=10)
    r.raise_for_status()
    return r.json()[0]


def unready(management_url: str | None, keys: Keys, model: str) -> str | None:
    """None while ``model`` has a READY worker, else one line saying why it cannot answer."""
    if not management_url:
        return "no management URL known to ask for the model's workers"
    try:
        workers = describe(management_url, keys, model)["workers"]
    except (httpx.HTTPError, TokenError, ValueError, KeyError, IndexError) as e:
        return no_description(model, management_url, e)
    return workers_unready(model, workers)


def no_description(model: str, management_url: str, error: Exception) -> str:
    return f"no description of {model} from {management_url}: {error.__class__.__name__}: {str(error)[:200]}"


def workers_unready(model: str, workers: list[dict]) -> str | None:
    """None while one of the described ``workers`` is READY, else why the model cannot answer."""
    if any(w.get("status") == "READY" for w in workers):
        return None
    states = ", ".join(f"{w.get('pid')} {w.get('status')}" for w in workers) or "none"
    return f"{model} has no READY worker (workers: {states})"


def live(inference_url: str, keys: Keys) -> bool:
    """Whether the frontend answers ``/ping`` (it does even when no worker can answer)."""
    try:
        return httpx.get(f"{inference_url.rstrip('/')}/ping", headers=keys.inference_headers(),
                         timeout=5).status_code == 200
    except (httpx.HTTPError, TokenError):
        return False
