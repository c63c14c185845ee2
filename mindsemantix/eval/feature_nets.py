"""Feature networks for the image metrics (2-way identification) and CLIP for CLIP-S / RefCLIP-S.

Every net here maps a uint8 RGB batch `(B, 3, H, W)` to one float feature vector per image `(B, D)`,
with the preprocessing MindEye2's `final_evaluations` uses for that net (bilinear resize of the
whole image, then the net's normalisation). Names become metric keys: `TwoWay-<name>`.

| name               | layer                          | resize | weights                                      |
|--------------------|--------------------------------|--------|----------------------------------------------|
| EfficientNetLite0  | global average of last feature map (1280) | 224 | offline (registry package), pretrained.py |
| AlexNet2, AlexNet5 | `features.4`, `features.11` (post-ReLU)   | 256 | torchvision `alexnet` state dict, by path  |
| InceptionV3        | `avgpool` (2048)               | 342    | torchvision `inception_v3` state dict, by path (needs torchvision) |
| EffNetB1           | `avgpool` (1280)               | 255    | torchvision `efficientnet_b1` state dict, by path (needs torchvision) |
| SwAV               | `avgpool` of ResNet-50 (2048)  | 224    | facebookresearch/swav ResNet-50 checkpoint, by path (needs torchvision) |
| CLIP               | image embedding (projection)   | 224    | transformers CLIP folder (hub id or path)    |

Weights are read as data only (`torch.load(weights_only=True)` / safetensors via transformers).
AlexNet's convolutional trunk is defined here (a few standard layers) so it works without
torchvision, which does not import beside the CPU torch build this project uses (see docs/offline.md).
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from mindsemantix.models.pretrained import PretrainedNotFound, load_efficientnet_lite0

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class FeatureNet:
    """A named image -> feature-vector function; `extract` takes uint8 (B,3,H,W), returns (B,D) float32."""

    name: str
    extract: Callable[[torch.Tensor], torch.Tensor]
    batch_size: int = 32
    description: str = ""
    # The seen images are scored against the model and every image baseline (the shuffled-image
    # baseline is the seen images again): features are kept per image (by content hash), so each net
    # sees each distinct image once per run.
    _cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    max_cached: int = 20_000

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N,3,H,W) uint8 -> (N, D) float32, in batches."""
        digests = [hashlib.sha1(im.contiguous().numpy().tobytes()).hexdigest() + str(tuple(im.shape)) for im in images]
        first: dict[str, int] = {}
        for i, d in enumerate(digests):
            first.setdefault(d, i)
        todo = [i for d, i in first.items() if d not in self._cache]
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            feats = self.extract(images[chunk]).float().flatten(1).cpu()
            for i, f in zip(chunk, feats):
                self._cache[digests[i]] = f
        out = torch.stack([self._cache[d] for d in digests])
        while len(self._cache) > self.max_cached:
            self._cache.pop(next(iter(self._cache)))
        return out


def resize_normalize(images: torch.Tensor, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 (B,3,H,W) -> float (B,3,size,size) in [0,1], bilinear, then (x - mean) / std.

    MindEye2 resizes with torchvision `Resize(size)` on square tensors (bilinear, antialiased when
    shrinking in torchvision >= 0.17); this is the same operation in plain torch.
    """
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if x.shape[-2:] != (size, size):
        shrink = x.shape[-1] > size or x.shape[-2] > size
        x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
    mean_t = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (offline)


@lru_cache(maxsize=1)
def _efficientnet_lite0() -> nn.Module:
    """Loaded once per process: frozen and in eval mode, so every FeatureNet can share it."""
    # channels_last: ~1.5x faster depthwise convolutions on a CPU, same features to ~1e-5
    net = load_efficientnet_lite0().eval().requires_grad_(False).to(memory_format=torch.channels_last)
    for module in net.modules():  # each ReLU6 follows a batch norm or a convolution: in place saves a copy
        if isinstance(module, nn.ReLU6):
            module.inplace = True
    return net


def efficientnet_lite0_net() -> FeatureNet:
    """ImageNet EfficientNet-Lite0: its own normalisation (x*2-1 at 224), global-average feature (1280)."""
    net = _efficientnet_lite0()

    def extract(images: torch.Tensor) -> torch.Tensor:
        x = resize_normalize(images, 224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # = x*2-1
        fmap = net.extract_features(x.to(_device_of(net)).contiguous(memory_format=torch.channels_last))  # (B, 1280, 7, 7)
        return fmap.mean(dim=(2, 3))

    return FeatureNet("EfficientNetLite0", extract, description="EfficientNet-Lite0 (ImageNet), pooled last feature map")


# ---------------------------------------------------------------------------------------------
# AlexNet (torchvision layout of `features`, weights by path)


class AlexNetTrunk(nn.Module):
    """torchvision AlexNet's `features` Sequential (indices matter: state-dict keys are `features.<i>.*`)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=False),  # 0, 1
            nn.MaxPool2d(kernel_size=3, stride=2),                                          # 2
            nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=False),           # 3, 4  <- "AlexNet(2)"
            nn.MaxPool2d(kernel_size=3, stride=2),                                          # 5
            nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=False),          # 6, 7
            nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=False),          # 8, 9
            nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=False),          # 10, 11 <- "AlexNet(5)"
        )

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        outs = {}
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in (4, 11):
                outs[i] = x
        return outs


def _load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise PretrainedNotFound(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):  # checkpoints that wrap the state dict
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    return {k.removeprefix("module."): v for k, v in state.items()}


def alexnet_nets(weights_path: str | Path) -> list[FeatureNet]:
    """AlexNet(2) and AlexNet(5) of MindEye: ReLU outputs `features.4` and `features.11` at 256 px."""
    trunk = AlexNetTrunk()
    state = {k: v for k, v in _load_state_dict(weights_path).items() if k.startswith("features.")}
    missing, _ = trunk.load_state_dict(state, strict=False)
    if missing:
        raise PretrainedNotFound(f"{weights_path}: not a torchvision AlexNet state dict (missing {missing[:3]}...)")
    trunk.eval().requires_grad_(False)

    def layer(index: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def extract(images: torch.Tensor) -> torch.Tensor:
            return trunk(resize_normalize(images, 256).to(_device_of(trunk)))[index]
        return extract

    return [FeatureNet("AlexNet2", layer(4), description="AlexNet features.4 (ImageNet)"),
            FeatureNet("AlexNet5", layer(11), description="AlexNet features.11 (ImageNet)")]


# ---------------------------------------------------------------------------------------------
# torchvision nets (InceptionV3, EfficientNet-B1, SwAV ResNet-50): need an importable torchvision


def _torchvision_avgpool_net(name: str, builder: str, weights_path: str | Path, size: int,
                             description: str, **build_kwargs) -> FeatureNet:
    if importlib.util.find_spec("torchvision") is None:
        raise PretrainedNotFound(f"{name} needs torchvision (not installed; the CPU torch build here has no "
                                 "matching torchvision wheel)")
    import torchvision.models as tvm

    net = getattr(tvm, builder)(weights=None, **build_kwargs)
    state = _load_state_dict(weights_path)
    if builder == "resnet50":  # SwAV checkpoints have no classifier head
        state = {k: v for k, v in state.items() if not k.startswith(("fc.", "projection_head", "prototypes"))}
        net.fc = nn.Identity()
    net.load_state_dict(state, strict=True)
    net.eval().requires_grad_(False)
    pooled: dict[str, torch.Tensor] = {}
    net.avgpool.register_forward_hook(lambda _m, _i, out: pooled.__setitem__("x", out))

    def extract(images: torch.Tensor) -> torch.Tensor:
        net(resize_normalize(images, size).to(_device_of(net)))
        return pooled.pop("x").flatten(1)

    return FeatureNet(name, extract, description=description)


def inception_v3_net(weights_path: str | Path) -> FeatureNet:
    return _torchvision_avgpool_net("InceptionV3", "inception_v3", weights_path, 342, "InceptionV3 avgpool (ImageNet)",
                                    aux_logits=True, init_weights=False)


def efficientnet_b1_net(weights_path: str | Path) -> FeatureNet:
    return _torchvision_avgpool_net("EffNetB1", "efficientnet_b1", weights_path, 255, "EfficientNet-B1 avgpool (ImageNet)")


def swav_net(weights_path: str | Path) -> FeatureNet:
    return _torchvision_avgpool_net("SwAV", "resnet50", weights_path, 224, "SwAV ResNet-50 avgpool")


# ---------------------------------------------------------------------------------------------
# CLIP (image side for 2-way identification; both sides for CLIP-S / RefCLIP-S)


@dataclass
class ClipBundle:
    model: nn.Module
    tokenizer: object
    image_processor: object
    source: str
    extra: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return _device_of(self.model)

    @torch.no_grad()
    def encode_text(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """(N,) strings -> (N, D) projected text embeddings (not normalised); truncated at 77 tokens."""
        out = []
        for i in range(0, len(texts), batch_size):
            tok = self.tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=77,
                                 return_tensors="pt").to(self.device)
            out.append(_projected(self.model.get_text_features(input_ids=tok["input_ids"],
                                                               attention_mask=tok["attention_mask"])).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def encode_images(self, images: list, batch_size: int = 32) -> torch.Tensor:
        """Images through the CLIP image processor (resize shortest side, centre crop): (N, D)."""
        out = []
        for i in range(0, len(images), batch_size):
            pixels = self.image_processor(images=list(images[i:i + batch_size]), return_tensors="pt")["pixel_values"]
            out.append(_projected(self.model.get_image_features(pixel_values=pixels.to(self.device))).float().cpu())
        return torch.cat(out)


def _projected(output) -> torch.Tensor:
    """transformers 5 returns a model output whose pooler_output is the projection; 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def load_clip(name_or_path: str | Path) -> ClipBundle:
    """CLIPModel + tokenizer + image processor from a local folder or hub id (weights a user supplies)."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    try:
        model = CLIPModel.from_pretrained(str(name_or_path)).eval().requires_grad_(False)
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
        processor = CLIPImageProcessor.from_pretrained(str(name_or_path))
    except OSError as e:
        raise PretrainedNotFound(f"{name_or_path}: cannot load a CLIP model there ({e})") from e
    return ClipBundle(model, tokenizer, processor, str(name_or_path))


def clip_net(clip: ClipBundle | str | Path) -> FeatureNet:
    """MindEye's CLIP 2-way: bilinear resize to 224 + CLIP normalisation, image embedding."""
    bundle = clip if isinstance(clip, ClipBundle) else load_clip(clip)
    mean = tuple(bundle.image_processor.image_mean)
    std = tuple(bundle.image_processor.image_std)

    def extract(images: torch.Tensor) -> torch.Tensor:
        x = resize_normalize(images, 224, mean=mean, std=std).to(bundle.device)
        return _projected(bundle.model.get_image_features(pixel_values=x))

    return FeatureNet("CLIP", extract, description=f"CLIP image embedding ({bundle.source})")


# ---------------------------------------------------------------------------------------------


def build_feature_nets(weights: dict[str, str | Path | None] | None = None, offline: bool = True
                       ) -> tuple[list[FeatureNet], dict[str, str]]:
    """Nets for `score_images`: the offline one plus each one whose weights are given.

    `weights` keys: alexnet, inception, effnet_b1, swav, clip. Returns (nets, unavailable) where
    `unavailable` maps a net name to the reason it was left out (recorded in the report). A net
    whose weights are given but do not load raises (PretrainedNotFound / RuntimeError).
    """
    weights = {k: v for k, v in (weights or {}).items() if v}
    unknown = set(weights) - {"alexnet", "inception", "effnet_b1", "swav", "clip"}
    if unknown:
        raise ValueError(f"unknown feature nets {sorted(unknown)}; known: alexnet, inception, effnet_b1, swav, clip")
    nets: list[FeatureNet] = []
    unavailable: dict[str, str] = {}
    if offline:  # a missing offline package is recorded, not fatal: the other metrics still run
        try:
            nets.append(efficientnet_lite0_net())
        except (PretrainedNotFound, ImportError) as e:
            unavailable["EfficientNetLite0"] = str(e)
    makers = {"alexnet": ("AlexNet", alexnet_nets), "inception": ("InceptionV3", lambda p: [inception_v3_net(p)]),
              "clip": ("CLIP", lambda p: [clip_net(p)]), "effnet_b1": ("EffNetB1", lambda p: [efficientnet_b1_net(p)]),
              "swav": ("SwAV", lambda p: [swav_net(p)])}
    for key, (name, make) in makers.items():
        if key in weights:  # asked for by path: a failure to load is the caller's error, raised
            nets.extend(make(weights[key]))
        else:
            unavailable[name] = "no weights given"
    return nets, unavailable
