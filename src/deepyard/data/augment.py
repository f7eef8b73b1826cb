"""Image augmentation applied to a batch on the worker: random shifts and small rotations."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_affine(images: torch.Tensor, max_shift: float, max_rotation_deg: float) -> torch.Tensor:
    """Shift by up to ``max_shift`` of the image size and rotate by up to ``max_rotation_deg``, per image."""
    n = images.shape[0]
    angle = (torch.rand(n, device=images.device) * 2 - 1) * math.radians(max_rotation_deg)
    shift = (torch.rand(n, 2, device=images.device) * 2 - 1) * (2 * max_shift)  # grid spans [-1, 1]
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, padding_mode="zeros", align_corners=False)
