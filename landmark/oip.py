"""The Open Inference Protocol v2 (KServe / Triton REST) wire format of the landmark service, in one place
for the TorchServe handler and the app: a request carries the photo as the one element of a BYTES input,
base64 in the JSON (JSON cannot hold raw bytes) or raw in the binary tensor extension (what tritonclient
sends: a JSON header of ``Inference-Header-Content-Length`` bytes, then each binary input's bytes, a BYTES
element as a 4-byte little-endian length and its bytes); the answer JSON, the service's one format, comes
back as the one BYTES output "answer". ``topk`` and ``min_precision`` ride in the request's parameters.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
from dataclasses import dataclass, field

from landmark.preprocess import ImageError

HEADER_LENGTH = "inference-header-content-length"  # the binary extension's header (lower case: ASGI's)
INPUT, OUTPUT = "photo", "answer"
SETTINGS = ("topk", "min_precision")
NEEDS_ONE_PHOTO = ('v2 request needs one BYTES input with one base64 photo: {"inputs": [{"name": "photo", '
                   '"shape": [1], "datatype": "BYTES", "data": ["<base64>"]}]}')
_DATA_URL = re.compile(r"^data:[\w/+.-]*;base64,")


def b64_image(text: str | bytes) -> bytes:
    """Standard or URL-safe base64, with or without a data: URL prefix and line breaks; ImageError otherwise."""
    if isinstance(text, bytes):
        text = text.decode("ascii")
    text = _DATA_URL.sub("", text.strip())
    try:
        return base64.b64decode("".join(text.split()), altchars=b"-_" if "-" in text or "_" in text else None,
                                validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"invalid base64 image: {e}") from e


def is_request(body: object) -> bool:
    """Whether a parsed JSON body is a v2 inference request ({"inputs": [...]})."""
    return isinstance(body, dict) and isinstance(body.get("inputs"), list)


def _one_element(raw: bytes) -> bytes:
    """The single element of a binary BYTES tensor: <uint32 little-endian length><bytes>."""
    if len(raw) < 4 or struct.unpack_from("<I", raw)[0] != len(raw) - 4:
        raise ImageError(NEEDS_ONE_PHOTO)
    return raw[4:]


def request_photo(body: dict, binary: bytes = b"") -> bytes:
    """The photo of a v2 request: the first BYTES input's one element, from ``binary`` (the bytes after the
    JSON header) where the input names its ``binary_data_size``, else base64 from its ``data``."""
    offset = 0
    for spec in body["inputs"]:
        if not isinstance(spec, dict):
            break
        size = (spec.get("parameters") or {}).get("binary_data_size")
        if spec.get("datatype") == "BYTES":
            if isinstance(size, int) and size >= 0:
                return _one_element(binary[offset:offset + size])
            data = spec.get("data")
            while isinstance(data, list) and len(data) == 1 and isinstance(data[0], list):  # shape [1, 1]
                data = data[0]
            if isinstance(data, list) and len(data) == 1 and isinstance(data[0], str):
                return b64_image(data[0])
            break
        offset += size if isinstance(size, int) else 0
    raise ImageError(NEEDS_ONE_PHOTO)


def response(request_id: str, model_name: str, model_version: str | None, answer: str) -> dict:
    """The v2 response around the answer JSON text."""
    return {"id": request_id, "model_name": model_name, "model_version": model_version,
            "outputs": [{"name": OUTPUT, "datatype": "BYTES", "shape": [1], "data": [answer]}]}


@dataclass(frozen=True)
class InferRequest:
    """What the app forwards of one v2 request: the photo and the settings, as TorchServe's headers take them."""

    photo: bytes
    id: str = ""
    settings: dict[str, str] = field(default_factory=dict)


def parse(body: bytes, header_length: str | None = None) -> InferRequest:
    """An HTTP request body by its content, whatever its Content-Type: the binary extension where the header
    says so, a JSON v2 request where it starts with "{" (no photo format does), else the photo itself."""
    if header_length is None and body[:64].lstrip()[:1] != b"{":
        return InferRequest(body)
    try:
        n = len(body) if header_length is None else int(header_length)
        if not 0 <= n <= len(body):
            raise ValueError(f"{HEADER_LENGTH} {n} is outside the body's {len(body)} bytes")
        request = json.loads(body[:n])
    except ValueError as e:
        raise ImageError(f"v2 request is not valid JSON: {e}") from e
    if not is_request(request):
        raise ImageError(NEEDS_ONE_PHOTO)
    params = request.get("parameters") if isinstance(request.get("parameters"), dict) else {}
    settings = {name: str(params[name]) for name in SETTINGS if params.get(name) is not None}
    return InferRequest(request_photo(request, body[n:]), str(request.get("id", "")), settings)
