"""TorchServe handler: photo -> the landmark it shows (or "no landmark I know"), with top-k and locations.

It wraps ``landmark.predict.Predictor`` (staged into the archive beside this file), so served and
offline answers come from the same decode, crop, network and softmax. It implements TorchServe's
handler contract itself (``initialize(context)`` + ``handle(data, context)``, split into preprocess /
inference / postprocess) instead of subclassing BaseHandler, which imports torch: an ONNX archive's
handler imports no torch (TorchServe's own worker still does, ``ts/protocol/otf_message_handler.py``;
docs/quantization.md measures what that costs). A bad item in a batch gets its own 400 with a JSON
error; the other items of the batch are answered normally and the worker keeps running.
TorchServe accepts only one class per handler module, so bad input is signalled with
``ImageError`` (the photo) and ``ValueError`` (topk) rather than an exception class of our own.

Every request is counted on TorchServe's metrics endpoint by outcome, with preprocess and inference
time and batch size per batch (declared in serve_config/metrics.yaml, which the frontend needs in
prometheus mode). An Open Inference Protocol v2 request (``POST /v2/models/<name>/infer``, which
TorchServe 0.12 routes to the handler with the JSON body as it came) carries the photo as a base64
BYTES input and gets the same answer JSON as the one BYTES output of a v2 response (``landmark.oip``,
the wire format the app's v2 endpoint shares).

A place index of the user's own geotagged photos (``landmark.places``) answers where the model's own decision
does not tag: ``places.npz`` shipped in the archive (``handlers.archive --index``), or a file mounted at the
path in env LANDMARK_INDEX or model-config.yaml's ``handler: index:`` (an empty value: none). One built with
another model stops the load with a message naming both models.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time
from pathlib import Path

import numpy as np
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes

from landmark import oip
from landmark.cli import positive_int, precision
from landmark.places import INDEX_FILE
from landmark.predict import Predictor, Prepared, rows  # Prepared lives there: one class per handler module
from landmark.preprocess import DEFAULT_MAX_PIXELS, ImageError

logger = logging.getLogger(__name__)

DEFAULT_TOPK = 5
TOPK_PARAM, TOPK_HEADER = "topk", "x-topk"
PRECISION_PARAM, PRECISION_HEADER = "min_precision", "x-min-precision"
IMAGE_FIELDS = ("body", "data", "file", "image", "img", "photo", "b64", "instances")  # preferred request fields
_BASE64 = re.compile(rb"[A-Za-z0-9+/=_\-\s]+")
# the start of each bad-input message (landmark.preprocess, this module) -> the Reason of its metric
BAD_INPUT_REASONS = {"topk": "bad_topk", "min_precision": "bad_min_precision", "image too large": "too_large",
                     "not an image": "not_an_image", "empty image": "empty", "corrupt or truncated": "corrupt",
                     "invalid base64": "bad_base64", "no image": "no_image",
                     "JSON body needs": "no_image", "v2 request needs": "no_image"}


def _setting(name: str, handler_cfg: dict, default: int) -> int:
    """A positive integer setting: env LANDMARK_<NAME> beats the archive's model-config.yaml ``handler:``
    section. A bad one stops the load with a message naming it (in model_log.log), not a bare int() error."""
    env = f"LANDMARK_{name.upper()}"
    value = os.environ.get(env, handler_cfg.get(name, default))
    try:
        return positive_int(str(value).strip())
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"handler setting {name} (env {env} or model-config.yaml): {e}") from None


def index_path(model_dir: Path, handler_cfg: dict) -> Path | None:
    """The place index to answer with: env LANDMARK_INDEX, else model-config.yaml's ``handler: index:`` (a path
    mounted into the container), else the archive's own places.npz; None where there is none (or the setting
    is empty)."""
    value = os.environ.get("LANDMARK_INDEX", handler_cfg.get("index"))
    if value is not None:
        return Path(str(value)) if str(value).strip() else None
    shipped = model_dir / INDEX_FILE
    return shipped if shipped.is_file() else None


def v2_request(item: dict) -> dict | None:
    """The JSON body of an Open Inference Protocol v2 request ({"inputs": [...]}), else None."""
    body = item.get("body")
    return body if oip.is_request(body) else None


def bad_input_reason(message: str) -> str:
    return next((r for start, r in BAD_INPUT_REASONS.items() if message.startswith(start)), "other")


def image_bytes(item: dict) -> bytes:
    """The photo of one request: raw body, multipart field, base64 text, or JSON {"data": base64}."""
    settings = (TOPK_PARAM, PRECISION_PARAM)
    fields = [k for k in IMAGE_FIELDS if k in item] + [k for k in item if k not in IMAGE_FIELDS and k not in settings]
    if not fields:
        raise ImageError("no image in the request: send the photo as the body, a form field or base64 JSON")
    value = item[fields[0]]
    if isinstance(value, dict):
        inner = next((value[k] for k in IMAGE_FIELDS if k in value), None)
        if not isinstance(inner, str):
            raise ImageError('JSON body needs {"data": "<base64 image>"}')
        return oip.b64_image(inner)
    if isinstance(value, list):
        raise ImageError("one image per request: TorchServe batches separate requests")
    if isinstance(value, str):
        return oip.b64_image(value)
    value = bytes(value)
    if value and _BASE64.fullmatch(value):  # no JPEG/PNG/WebP/GIF file is pure base64 text
        try:
            return oip.b64_image(value)
        except ImageError:
            pass  # plain text: decode() below reports "not an image"
    return value


def requested(item: dict, headers: dict, param: str, header: str) -> str | None:
    """A request setting as sent: a query/form field (TorchServe passes the query string only on
    /invocations and /<model>/predict, not on /predictions), a key of a JSON body or of a v2 request's
    ``parameters``, or a header."""
    json_body = next((v for v in item.values() if isinstance(v, dict) and param in v), {})
    v2_parameters = (v2_request(item) or {}).get("parameters")
    value = item.get(param, json_body.get(param, v2_parameters.get(param) if isinstance(v2_parameters, dict) else None))
    if value is None:
        return next((v for k, v in headers.items() if k.lower() == header and isinstance(v, str)), None)
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)


def parse_topk(raw: str | None, n_classes: int) -> int:
    """An integer in 1..n_classes, else ValueError (answered with 400); absent: 5 (or fewer classes)."""
    if raw is None:
        return min(DEFAULT_TOPK, n_classes)
    try:
        k = int(raw.strip())
    except ValueError:
        raise ValueError(f"topk must be an integer in 1..{n_classes}, got {raw!r}") from None
    if not 1 <= k <= n_classes:
        raise ValueError(f"topk must be in 1..{n_classes}, got {k}")
    return k


def parse_min_precision(raw: str | None) -> float | None:
    """The operating point asked for, in (0, 1], else ValueError (answered with 400); absent: the model's."""
    if raw is None:
        return None
    try:
        return precision(raw.strip())
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"min_precision: {e}") from None


class LandmarkHandler:
    """Loads model.onnx or model.ts (whichever the archive holds) with its model_meta.json."""

    def __init__(self) -> None:
        self.initialized, self.context = False, None

    def initialize(self, context) -> None:
        self.context = context
        props = context.system_properties
        model_dir = Path(props["model_dir"])
        handler_cfg = (getattr(context, "model_yaml_config", None) or {}).get("handler", {}) or {}
        threads = _setting("threads", handler_cfg, 1)  # 1 per worker: more oversubscribes a small CPU 40x
        max_pixels = _setting("max_pixels", handler_cfg, DEFAULT_MAX_PIXELS)
        gpu = props.get("gpu_id") is not None  # TorchServe assigns a GPU only where it has one
        device = "auto" if gpu else "cpu"  # auto: CUDA only where the ORT provider / torch really activates
        self.manifest = context.manifest
        self.model_dims = [Dimension("ModelName", self.manifest["model"]["modelName"]), Dimension("Level", "Model")]
        model_file = model_dir / self.manifest["model"]["serializedFile"]
        if gpu and model_file.suffix != ".onnx":
            import torch  # TorchScript needs it anyway; an ONNX worker never does

            if torch.cuda.is_available():
                torch.cuda.set_device(int(props["gpu_id"]))
        index = index_path(model_dir, handler_cfg)
        self.predictor = Predictor(model_file, device=device, threads=threads, max_pixels=max_pixels, index=index)
        self.n_classes = len(self.predictor.classes)
        self.initialized = True
        logger.info("landmark handler: %s on %s (%s), %d classes, threads=%d, max_pixels=%d, place index %s",
                    model_file.name, self.predictor.runner.device, self.predictor.runner.providers,
                    self.n_classes, threads, max_pixels, index)

    def handle(self, data: list[dict], context) -> list[str]:
        """TorchServe's entry point for every batch (and for a customized describe request)."""
        start = time.perf_counter()
        self.context = context
        if context.get_request_header(0, "describe") == "True":  # GET /models/<name>?customized=true
            return [json.dumps(self.describe())]
        output = self.postprocess(self.inference(self.preprocess(data)))
        context.metrics.add_time("HandlerTime", round((time.perf_counter() - start) * 1000, 2), None, "ms")
        return output

    def describe(self) -> dict:
        """What the management API's customized describe shows: which network answers, and how it decides."""
        p = self.predictor
        places = None
        if p.places is not None:
            m = p.places.meta
            places = {"photos": len(m.references), "places": len(m.places), "built_at": m.built_at,
                      "search": m.search.kind, "min_precision": m.operating_point.min_precision,
                      "threshold": m.operating_point.threshold}
        return {"model_file": self.manifest["model"]["serializedFile"], "device": p.runner.device,
                "providers": p.runner.providers, "classes": self.n_classes, "preprocess": p.cfg.to_dict(),
                "min_precision": p.open_set.min_precision, "place_index": places}

    def _metric(self, name: str, value: float, unit: str, kind: MetricTypes, **dims: str) -> None:
        """One value on TorchServe's metrics, with every dimension named in the order metrics.yaml lists them
        (the worker matches values to names by position). A metric the worker's yaml lacks (ts's default
        one in tests/test_handler.py) is added to its cache, not refused."""
        self.context.metrics.add_metric(name, value, unit, dimensions=[
            *(Dimension(k, v) for k, v in dims.items()), *self.model_dims], metric_type=kind)

    def _count(self, outcome: str, reason: str = "ok") -> None:
        self._metric("LandmarkRequests", 1, "Count", MetricTypes.COUNTER, Outcome=outcome, Reason=reason)

    def _prepare(self, idx: int, item: dict) -> Prepared:
        """One request item, decoded and checked; ImageError for a bad photo or setting."""
        headers = self.context.get_all_request_header(idx) or {}
        try:
            k = parse_topk(requested(item, headers, TOPK_PARAM, TOPK_HEADER), self.n_classes)
            min_precision = parse_min_precision(requested(item, headers, PRECISION_PARAM, PRECISION_HEADER))
        except ValueError as e:
            raise ImageError(str(e)) from e
        v2 = v2_request(item)
        photo = oip.request_photo(v2) if v2 is not None else image_bytes(item)
        return Prepared(idx, self.predictor.preprocess(photo), k, min_precision, v2)

    def preprocess(self, data: list[dict]) -> dict:
        """Decode and check every item; a bad one gets its 400 here and is left out of the batch."""
        start = time.perf_counter()
        good, errors = [], {}
        for idx, item in enumerate(data):
            self.context.set_response_content_type(idx, "application/json")
            try:
                good.append(self._prepare(idx, item))
            except ImageError as e:
                self.context.set_response_status(400, "Bad Request", idx)
                errors[idx] = str(e)
                self._count("bad_input", bad_input_reason(str(e)))
        logger.info("landmark batch: %d requests, %d bad", len(data), len(errors))
        self._metric("LandmarkBatchSize", len(data), "Count", MetricTypes.HISTOGRAM)
        self._metric("LandmarkPreprocessSeconds", time.perf_counter() - start, "s", MetricTypes.HISTOGRAM)
        return {"size": len(data), "good": good, "errors": errors}

    def inference(self, batch: dict) -> dict:
        """One network call for all good items of the batch."""
        crops = [p.crop for p in batch["good"]]
        start = time.perf_counter()
        batch["outputs"] = rows(self.predictor.outputs(np.stack(crops))) if crops else []
        if crops:
            self._metric("LandmarkInferenceSeconds", time.perf_counter() - start, "s", MetricTypes.HISTOGRAM)
        return batch

    def postprocess(self, batch: dict) -> list[str]:
        """The answer JSON per good item (``landmark.predict.answer``; inside a v2 response for a v2 request),
        ``{"error": ...}`` per bad one, in request order."""
        responses = [json.dumps({"error": msg}) for msg in batch["errors"].values()]
        out = dict(zip(batch["errors"], responses, strict=True))
        for p, row in zip(batch["good"], batch["outputs"], strict=True):
            answer = self.predictor.answer(row, p.k, p.min_precision)
            self._count("unknown" if answer["landmark"] is None else "known")
            model = self.manifest["model"]
            out[p.idx] = json.dumps(answer) if p.v2 is None else json.dumps(oip.response(
                str(p.v2.get("id", "")), model["modelName"], model.get("modelVersion"), json.dumps(answer)))
        return [out[i] for i in range(batch["size"])]
