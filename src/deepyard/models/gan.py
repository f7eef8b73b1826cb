"""DCGAN: a generator of images from noise and a discriminator that tells them from real ones.

Images are scaled to [-1, 1] (the generator ends in tanh); the job's pipeline does that scaling,
so the generator's output maps back to the data set's own pixel units with the same constants.
Sizes follow the DCGAN paper's rules: strided (transposed) convolutions instead of pooling, batch
norm in both nets except the discriminator's input layer, ReLU in the generator and leaky ReLU in
the discriminator.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field, PositiveInt
from torch import nn

from deepyard.models.registry import MODELS


class GAN(nn.Module):
    generative = True  # trained by the generation task's alternating steps, not by a loss on labels

    def __init__(self, in_shape: tuple[int, ...], latent_dim: int, width: int):
        super().__init__()
        channels, height, width_px = in_shape
        self.latent_dim, self.image_shape = latent_dim, tuple(in_shape)
        base = (height // 4, width_px // 4)
        self.generator = nn.Sequential(
            nn.Linear(latent_dim, 2 * width * base[0] * base[1]), nn.Unflatten(1, (2 * width, *base)),
            nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.ConvTranspose2d(width, width // 2, 4, stride=2, padding=1), nn.BatchNorm2d(width // 2), nn.ReLU(),
            # a 3x3 convolution at full resolution: smoother strokes than ending on a transposed conv
            nn.Conv2d(width // 2, channels, 3, padding=1), nn.Tanh(),
        )
        self.discriminator = nn.Sequential(
            nn.Conv2d(channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.LeakyReLU(0.2),
            nn.Flatten(), nn.Linear(2 * width * base[0] * base[1], 1),
        )
        for module in self.modules():  # the DCGAN paper's initialization
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def noise(self, count: int, device: torch.device | None = None,
              generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(count, self.latent_dim, device=device, generator=generator)

    def forward(self, real: torch.Tensor) -> torch.Tensor:
        """(batch, 2) discriminator logits: [real images, as many generated ones]."""
        fake = self.generator(self.noise(len(real), real.device))
        return torch.cat([self.discriminator(real), self.discriminator(fake)], dim=1)


@MODELS.register("dcgan")
def dcgan(in_shape: tuple[int, ...], num_outputs: int, latent_dim: PositiveInt = 64,
          width: Annotated[int, Field(ge=2)] = 64) -> nn.Module:
    """Generator and discriminator for (channels, height, width) images, height and width divisible by 4."""
    if len(in_shape) != 3 or in_shape[1] % 4 or in_shape[2] % 4:
        raise ValueError(f"dcgan generates (channels, height, width) images with height and width divisible "
                         f"by 4 (digits, fashion_mnist), not {in_shape}")
    return GAN(in_shape, latent_dim, width)
