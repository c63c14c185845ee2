"""Training targets from frozen models (stage 2's vision features, stage 3's VAE latents and image
embeddings): computed once per image id and kept on the CPU, since the models never change."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


class FrozenFeatures:
    """`features(image_ids, images, device)` -> {name: (B, ...)} for named extractors, each a frozen
    function uint8 (1, 3, H, W) -> (1, ...). Images run one at a time: a batched convolution's last
    bits depend on the batch it runs in, and a resumed run meets an image in another batch than the
    uninterrupted run did (exact resume)."""

    def __init__(self, **extractors: Callable[[Tensor], Tensor]):
        self.extractors = extractors
        self.cache: dict[int, dict[str, Tensor]] = {}  # image id -> {name: features on the CPU}

    def __len__(self) -> int:
        return len(self.cache)

    @torch.no_grad()
    def __call__(self, image_ids: Tensor, images: Tensor, device: torch.device | str) -> dict[str, Tensor]:
        ids = image_ids.tolist()
        for i, image_id in enumerate(ids):
            if image_id not in self.cache:
                self.cache[image_id] = {name: f(images[i:i + 1]).float().cpu()[0] for name, f in self.extractors.items()}
        return {name: torch.stack([self.cache[i][name] for i in ids]).to(device) for name in self.extractors}


__all__ = ["FrozenFeatures"]
