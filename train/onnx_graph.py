"""Clean up an exported ONNX graph so ONNX Runtime runs it fast on every provider.

EfficientNet's TF "SAME" padding exports as a separate ``Pad`` before each strided conv, built
from a chain of shape ops. ONNX Runtime does not fuse it, and on CPU each ``Pad`` forces the
NCHWc layout back to NCHW and again (about 20% of Lite0's batch-1 latency here). Conv has
its own asymmetric ``pads``, so the Pad folds into it exactly.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx
from onnx import numpy_helper


def _ort_basic(model: bytes) -> onnx.ModelProto:
    """ONNX Runtime's provider-independent (basic) rewrites: constant folding, BN into conv.
    The result holds only standard ONNX ops, so it runs on CPU and CUDA alike."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = str(Path(tmp) / "basic.onnx")
        opts.log_severity_level = 3
        ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        return onnx.load(opts.optimized_model_filepath)


def _fold_pads(model: onnx.ModelProto) -> None:
    """Merge each zero ``Pad`` (spatial dims only, constant pads) into the one Conv it feeds."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}
    folded = []
    for pad in graph.node:
        if pad.op_type != "Pad" or len(pad.input) < 2 or pad.input[1] not in inits:
            continue
        users = consumers.get(pad.output[0], [])
        if len(users) != 1 or users[0].op_type != "Conv" or pad.output[0] in graph_outputs:
            continue
        mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
        value = pad.input[2] if len(pad.input) > 2 else ""
        if mode != b"constant" or (value and (value not in inits or numpy_helper.to_array(inits[value]).any())):
            continue
        pads = numpy_helper.to_array(inits[pad.input[1]]).tolist()
        rank = len(pads) // 2
        if any(pads[:2] + pads[rank:rank + 2]) or min(pads) < 0:
            continue
        conv = users[0]
        if any(a.name == "auto_pad" and a.s not in (b"", b"NOTSET") for a in conv.attribute):
            continue
        extra = pads[2:rank] + pads[rank + 2:]
        attr = next((a for a in conv.attribute if a.name == "pads"), None)
        if attr is None:
            attr = onnx.helper.make_attribute("pads", [0] * len(extra))
            conv.attribute.append(attr)
        attr.ints[:] = [a + b for a, b in zip(attr.ints, extra, strict=True)]
        conv.input[0] = pad.input[0]
        folded.append(pad)
    for pad in folded:
        graph.node.remove(pad)
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def optimize(model: bytes) -> bytes:
    """The exporter's graph, simplified and with every foldable Pad merged into its Conv."""
    proto = _ort_basic(model)
    _fold_pads(proto)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()
