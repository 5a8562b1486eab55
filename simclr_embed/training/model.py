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
        proj_layers: int = 2,
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
        # (Linear → BN → ReLU) × (layers − 1) → Linear: the SimCLR head, 2 layers in v1, 3 in
        # v2 (whose features are taken from the first layer's output, ``forward_head1``); the
        # bias before BN is redundant. Hidden width: the feature width by default (the paper);
        # wider helps short runs of narrow trunks (a 512 → 1024 → 128 head for ResNet-18).
        # The module indices of the 2-layer head are those of every earlier checkpoint.
        if proj_layers < 1:
            raise ValueError(f"proj_layers must be >= 1, got {proj_layers}")
        hidden = proj_hidden or feature_dim
        blocks: list[nn.Module] = []
        width = feature_dim
        for _ in range(proj_layers - 1):
            blocks += [nn.Linear(width, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]  # fmt: skip
            width = hidden
        self.projector = nn.Sequential(*blocks, nn.Linear(width, proj_dim))
        self.proj_layers, self.proj_hidden = proj_layers, hidden
        self.arch, self.stem = arch, stem
        self.feature_dim, self.proj_dim = feature_dim, proj_dim

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] normalized float → [N, F]; flatten, never squeeze, so N=1 works."""
        return torch.flatten(self.backbone(x), 1)

    def forward_head(self, h: torch.Tensor) -> torch.Tensor:
        """[N, F] → [N, P] (not normalized)."""
        return self.projector(h)

    def forward_head1(self, h: torch.Tensor) -> torch.Tensor:
        """[N, F] → [N, hidden]: the first projection layer's output (after BN and ReLU), where
        SimCLRv2 takes its features from. Needs a head of 2 or more layers."""
        if self.proj_layers < 2:
            raise ValueError("a 1-layer projection head has no first hidden layer")
        return self.projector[:3](h)

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
        proj_layers=int(cfg.get("proj_layers") or 2),  # checkpoints before the flag: 2
    )


def load_init_weights(model: SimCLRModel, path: str | Path) -> tuple[list[str], list[str]]:
    """Load a local backbone state_dict (e.g. torchvision's ``resnet50-*.pth``, or a ``simclr
    train`` checkpoint's trunk) into the trunk; returns (missing, unexpected or unfit) keys."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = {
            k.removeprefix("backbone."): v
            for k, v in state["model"].items()
            if k.startswith("backbone.")
        }
    return load_backbone_state(model, state)


def load_backbone_state(
    model: SimCLRModel, state: Mapping[str, torch.Tensor]
) -> tuple[list[str], list[str]]:
    """The classifier (``fc.*``) is dropped, and so is any tensor whose shape does not fit —
    the small and medium stems' 3×3 ``conv1`` cannot take ImageNet's 7×7 one."""
    own = model.backbone.state_dict()
    fits = {k: v for k, v in state.items() if not k.startswith("fc.")}
    unfit = [k for k, v in fits.items() if k in own and own[k].shape != v.shape]
    result = model.backbone.load_state_dict(
        {k: v for k, v in fits.items() if k not in unfit}, strict=False
    )
    return list(result.missing_keys), list(result.unexpected_keys) + unfit


def torchvision_weights(arch: str, spec: str) -> tuple[dict[str, torch.Tensor], str]:
    """``torchvision`` or ``torchvision:NAME`` → (the ImageNet state_dict of ``arch``, its full
    name), through torchvision's weights API and torch.hub's cache (``$TORCH_HOME``): read from
    the cache when the file is there, downloaded once when not."""
    from simclr_embed.errors import SimclrError

    name = spec.partition(":")[2] or "DEFAULT"
    choices = torchvision.models.get_model_weights(arch)
    try:
        weights = choices.DEFAULT if name == "DEFAULT" else choices[name]
    except KeyError:
        known = ", ".join(w.name for w in choices)
        raise SimclrError(
            f"--init-weights {spec}: {arch} has no weights {name!r} ({known})"
        ) from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        state = weights.get_state_dict(progress=False)
    except Exception as exc:  # offline, a proxy, a torn download: say where the file goes
        raise SimclrError(
            f"--init-weights {spec}: could not fetch {weights.url} ({type(exc).__name__}: "
            f"{exc}); offline, put the file at {cached}"
        ) from None
    return state, f"{type(weights).__name__}.{weights.name}"
