"""The tagging web page, its JSON API and an Open Inference Protocol v2 endpoint, in front of TorchServe.

Usage: python -m app.web [--port 8000] [--inference-url http://127.0.0.1:8080] [--key-file key_file.json]
The browser talks only to this process; the TorchServe token stays here. The app is a thin proxy
(``app.proxy``): it checks only what is its own (the upload limit, the photos in flight) and passes every
photo to TorchServe, whose handler is the one judge of a photo, so a bad upload gets the handler's JSON 4xx
through the app exactly as from TorchServe. ``POST /v2/models/<name>/infer`` takes a v2 request (JSON or
binary tensor data, as tritonclient sends it) or the photo itself, by its content, whatever its Content-Type.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from app.client import ServeError, ServeTarget, add_target_args, target_from_args
from app.proxy import Gate, Upstream
from handlers.settings import APP_MAX_IN_FLIGHT, RESPONSE_TIMEOUT_S
from landmark import oip
from landmark.cli import port, positive_float, positive_int
from landmark.preprocess import ImageError

STATIC = Path(__file__).with_name("static")
DEFAULT_MAX_UPLOAD = 10 * 1024 * 1024
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer")]
SETTING_HEADERS = {"topk": "X-Topk", "min_precision": "X-Min-Precision"}  # v2 parameters -> the handler's headers
EXTRA_CONNECTIONS = 4  # beyond the photos in flight: health and metadata calls never wait for a connection


class SecurityHeaders:
    """CSP and friends on every answer, as plain ASGI: FastAPI's @middleware("http") runs each request
    through extra tasks and memory streams, a cost on every photo."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_secured(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        return await self.app(scope, receive, send_secured)


def error(status: int, message: str, retry_after: int | None = None) -> Response:
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return Response(json.dumps({"error": message}).encode(), status, headers, media_type="application/json")


def failed(e: ServeError) -> Response:
    return error(e.status, e.message, e.retry_after)


async def read_limited(request: Request, limit: int) -> bytes | None:
    """The request body, or None as soon as it is known to exceed ``limit`` bytes (a declared length at
    once, a chunked body without one as it arrives)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(target: ServeTarget, max_upload: int = DEFAULT_MAX_UPLOAD, topk: int | None = None,
               timeout: float = RESPONSE_TIMEOUT_S + 5, max_in_flight: int = APP_MAX_IN_FLIGHT) -> FastAPI:
    upstream = Upstream(target, timeout, max_in_flight + EXTRA_CONNECTIONS)
    gate = Gate(max_in_flight)
    limit_mb = f"{max_upload / 1024 / 1024:g} MB"
    default_headers = {"X-Topk": str(topk)} if topk else {}  # none: the handler's default, min(5, classes)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await upstream.aclose()

    app = FastAPI(title="Landmark tagger", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(SecurityHeaders)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        """Whatever slipped through still gets JSON (and the traceback goes to the log as before)."""
        return error(500, f"internal error in the tagging app: {exc.__class__.__name__}")

    async def gated(request: Request, work: Callable[[bytes], Awaitable[Response]]) -> Response:
        """``work(body)`` while there is room, else an immediate 503; the upload limit; errors as JSON."""
        if (busy := gate.enter()) is not None:
            return failed(busy)
        try:
            data = await read_limited(request, max_upload)
            if data is None:
                return error(413, f"file too large: the limit is {limit_mb}")
            return await work(data)
        except ServeError as e:
            return failed(e)
        except ImageError as e:  # a v2 request the app itself cannot read (landmark.oip)
            return error(400, str(e))
        finally:
            gate.leave()

    def known(name: str) -> Response | None:
        return None if name == target.model else error(404, f"unknown model {name!r}: this app serves "
                                                            f"{target.model!r}")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/api/config")
    async def config() -> dict:
        return {"max_upload_bytes": max_upload, "topk": topk, "model": target.model, "max_in_flight": max_in_flight,
                "in_flight": gate.in_flight}

    @app.get("/api/health")
    async def health() -> JSONResponse:
        """"ok" only while the model has a READY worker (the management API's describe: TorchServe's /ping
        says Healthy with every worker dead); the page shows a banner otherwise."""
        if (down := await upstream.ping()) is not None:
            return JSONResponse({"app": "ok", "server": "down" if down.status == 503 else "unhealthy",
                                 "error": down.message})
        reason = await upstream.unready()
        return JSONResponse({"app": "ok", "server": "not_ready" if reason else "ok", "error": reason})

    @app.post("/api/predict")
    async def predict(request: Request) -> Response:
        async def answer(photo: bytes) -> Response:
            return Response(await upstream.predict(photo, default_headers), media_type="application/json")

        return await gated(request, answer)

    # --- Open Inference Protocol v2 (KServe / Triton REST) ---------------------------------------------

    @app.get("/v2")
    async def server_metadata() -> dict:
        return {"name": "landmark-tagger", "version": "1", "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live")
    async def live() -> dict:
        """This process answers (TorchServe's own liveness is its container's probe)."""
        return {"live": True}

    async def ready_answer() -> JSONResponse:
        reason = await upstream.unready()
        return JSONResponse({"ready": True} if reason is None else {"ready": False, "error": reason},
                            200 if reason is None else 503)

    @app.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        """200 while the model has a READY worker, else 503 and why (TorchServe 0.12's own is 404 or
        always true)."""
        return await ready_answer()

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str) -> Response:
        return known(name) or await ready_answer()

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str) -> Response:
        if (unknown := known(name)) is not None:
            return unknown
        if upstream.model_version is None:
            await upstream.unready()  # learns the version where the management API answers
        tensor = {"datatype": "BYTES", "shape": [1]}
        return JSONResponse({"name": name, "versions": [upstream.model_version] if upstream.model_version else [],
                             "platform": "torchserve", "inputs": [{"name": oip.INPUT, **tensor}],
                             "outputs": [{"name": oip.OUTPUT, **tensor}]})

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request) -> Response:
        if (unknown := known(name)) is not None:
            return unknown

        async def answer(body: bytes) -> Response:
            req = oip.parse(body, request.headers.get(oip.HEADER_LENGTH))
            headers = {**default_headers, **{SETTING_HEADERS[k]: v for k, v in req.settings.items()}}
            answer_json = await upstream.predict(req.photo, headers)
            if upstream.model_version is None:
                await upstream.unready()
            return JSONResponse(oip.response(req.id, name, upstream.model_version, answer_json.decode()))

        return await gated(request, answer)

    return app


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m app.web",
                                description="Web page for tagging photos with the served landmark model.")
    p.add_argument("--host", default="127.0.0.1", help="bind address (keep it loopback)")
    p.add_argument("--port", type=port, default=8000)
    add_target_args(p)
    p.add_argument("--max-upload-mb", type=positive_float, default=DEFAULT_MAX_UPLOAD / 1024 / 1024)
    p.add_argument("--topk", type=positive_int, default=None, help="landmarks per photo (default: the server's, 5)")
    p.add_argument("--max-in-flight", type=positive_int, default=APP_MAX_IN_FLIGHT,
                   help="photos forwarded at once; the next gets an immediate 503 + Retry-After "
                        "(default: handlers.settings.APP_MAX_IN_FLIGHT)")
    return p


def main(args: argparse.Namespace) -> int:
    target = target_from_args(args)
    app = create_app(target, max_upload=int(args.max_upload_mb * 1024 * 1024), topk=args.topk,
                     max_in_flight=args.max_in_flight)
    print(f"Landmark tagger: open http://{args.host}:{args.port}/ (TorchServe at {target.url})", flush=True)
    # uvloop and httptools (requirements.txt) where installed: uvicorn's "auto" picks them
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
