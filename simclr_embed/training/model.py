"""SimCLR model: a torchvision ResNet trunk (fc removed) plus a projection head.

``forward_features`` gives the pooled backbone output h ``[N, F]`` (what downstream tasks use),
``forward_head`` maps it to the projection z ``[N, P]`` (the space the loss is computed in).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from simclr_embed.training.config import ARCHS, STEMS

RESNETS = ARCHS  # the list lives in simclr_embed.training.config, which --help reads without torch


def default_stem(image_size: int) -> str:
    """The SimCLR paper's CIFAR stem (3×3 conv, stride 1, no max-pool) for images ≤ 64 px."""
    return "small" if image_size <= 64 else "standard"


class SimCLRModel(nn.Module):
    def __init__(
        self,
        arch: str = "resnet50",
        stem: str = "standard",
        proj_dim: int = 128,
        proj_hidden: int | None = None,
    ) -> None:
        super().__init__()
        if arch not in RESNETS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(RESNETS)}")
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {', '.join(STEMS)}, got {stem!r}")
        # weights=None: never download; a local state_dict can be loaded with load_init_weights.
        backbone = getattr(torchvision.models, arch)(weights=None)
        # The stem sets the feature-map side at layer1 for an S px input: standard (7×7/2 conv +
        # 3×3/2 max-pool) S/4, medium (3×3/1 conv + the max-pool) S/2, small (3×3/1 conv, no
        # pool) S. Trunk compute grows with that area: at 32 px, medium costs ~4× standard and
        # small ~15× — medium is the middle ground for small images on a small budget.
        if stem in ("small", "medium"):
            backbone.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        if stem == "small":
            backbone.maxpool = nn.Identity()
        feature_dim: int = backbone.fc.in_features  # 512 for resnet18/34, 2048 for resnet50+
        backbone.fc = nn.Identity()
        self.backbone = backbone
        # Linear → BN → ReLU → Linear (SimCLR v2's head; the bias before BN is redundant).
        # Hidden width: the feature width by default (the paper); wider helps short runs of
        # narrow trunks (a 512 → 1024 → 128 head for ResNet-18, docs/benchmarks.md).
        hidden = proj_hidden or feature_dim
        self.projector = nn.Sequential(
            nn.Linear(feature_dim, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, proj_dim),
        )
        self.arch, self.stem = arch, stem
        self.feature_dim, self.proj_dim = feature_dim, proj_dim

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] normalized float → [N, F]; flatten, never squeeze, so N=1 works."""
        return torch.flatten(self.backbone(x), 1)

    def forward_head(self, h: torch.Tensor) -> torch.Tensor:
        """[N, F] → [N, P] (not normalized)."""
        return self.projector(h)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.forward_features(x)
        return h, self.forward_head(h)


def build_model(cfg: Mapping[str, Any]) -> SimCLRModel:
    """Build from a (resolved) config mapping with keys ``arch``, ``stem``, ``image_size``, ``proj_dim``."""
    stem = cfg.get("stem") or default_stem(int(cfg["image_size"]))
    hidden = cfg.get("proj_hidden")
    return SimCLRModel(
        arch=cfg["arch"],
        stem=stem,
        proj_dim=int(cfg["proj_dim"]),
        proj_hidden=int(hidden) if hidden else None,
    )


def load_init_weights(model: SimCLRModel, path: str | Path) -> tuple[list[str], list[str]]:
    """Load a local backbone state_dict (e.g. torchvision's ``resnet50-*.pth``) into the trunk.

    The classifier (``fc.*``) is dropped; returns (missing, unexpected) keys.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = {
            k.removeprefix("backbone."): v
            for k, v in state["model"].items()
            if k.startswith("backbone.")
        }
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    result = model.backbone.load_state_dict(state, strict=False)
    return list(result.missing_keys), list(result.unexpected_keys)
