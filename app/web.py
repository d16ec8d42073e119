"""The tagging web page and its JSON API, proxying photos to TorchServe's inference API.

Usage: python -m app.web [--port 8000] [--inference-url http://127.0.0.1:8080] [--key-file key_file.json]
The browser talks only to this process (loopback); the TorchServe token stays here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from app.client import ServeError, ServeTarget, add_target_args, parse_answer, target_from_args, unreachable
from handlers.health import unready
from landmark.cli import port, positive_float, positive_int
from landmark.preprocess import photo_format

STATIC = Path(__file__).with_name("static")
DEFAULT_MAX_UPLOAD = 10 * 1024 * 1024
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def read_limited(request: Request, limit: int) -> bytes | None:
    """The request body, or None as soon as it is known to exceed ``limit`` bytes."""
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
               timeout: float = 30.0) -> FastAPI:
    app = FastAPI(title="Landmark tagger", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    limit_mb = f"{max_upload / 1024 / 1024:g} MB"

    def forward(data: bytes, headers: dict) -> httpx.Response:
        """In a worker thread: renewing an expired key is a blocking call to the token API."""
        with httpx.Client(timeout=timeout) as client:
            return target.post(client, data, headers)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/api/config")
    async def config() -> dict:
        return {"max_upload_bytes": max_upload, "topk": topk, "model": target.model}

    @app.get("/api/health")
    async def health() -> JSONResponse:
        """"ok" only while the model has a READY worker (the management API's describe: TorchServe's /ping
        says Healthy with every worker dead); the page shows a banner otherwise."""
        try:
            headers = await run_in_threadpool(target.headers)
            async with httpx.AsyncClient(timeout=5) as client:
                response = await client.get(f"{target.url.rstrip('/')}/ping", headers=headers)
        except httpx.HTTPError as e:
            return JSONResponse({"app": "ok", "server": "down", "error": unreachable(target, e).message})
        except ServeError as e:
            return JSONResponse({"app": "ok", "server": "down", "error": e.message})
        if response.status_code != 200:
            return JSONResponse({"app": "ok", "server": "unhealthy",
                                 "error": f"TorchServe /ping answered {response.status_code}"})
        reason = await run_in_threadpool(unready, target.keys.management_url, target.keys, target.model)
        return JSONResponse({"app": "ok", "server": "not_ready" if reason else "ok", "error": reason})

    @app.post("/api/predict")
    async def predict(request: Request) -> JSONResponse:
        data = await read_limited(request, max_upload)
        if data is None:
            return error(413, f"file too large: the limit is {limit_mb}")
        if not data:
            return error(400, "empty upload: the request body has no bytes")
        if photo_format(data) is None:  # header only: TorchServe does the real check
            return error(415, "not an image: the file is not in a photo format (JPEG, PNG, WebP, HEIC, ...)")
        headers = {"X-Topk": str(topk)} if topk else {}  # none: the handler's default, min(5, classes)
        try:
            answer = parse_answer(await run_in_threadpool(forward, data, headers))
        except httpx.HTTPError as e:
            return error(503, unreachable(target, e).message)
        except ServeError as e:
            return error(e.status, e.message)
        return JSONResponse(answer)

    return app


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m app.web",
                                description="Web page for tagging photos with the served landmark model.")
    p.add_argument("--host", default="127.0.0.1", help="bind address (keep it loopback)")
    p.add_argument("--port", type=port, default=8000)
    add_target_args(p)
    p.add_argument("--max-upload-mb", type=positive_float, default=DEFAULT_MAX_UPLOAD / 1024 / 1024)
    p.add_argument("--topk", type=positive_int, default=None, help="landmarks per photo (default: the server's, 5)")
    return p


def main(args: argparse.Namespace) -> int:
    target = target_from_args(args)
    app = create_app(target, max_upload=int(args.max_upload_mb * 1024 * 1024), topk=args.topk)
    print(f"Landmark tagger: open http://{args.host}:{args.port}/ (TorchServe at {target.url})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
