"""Image generation with a GAN: alternating discriminator and generator steps with the
non-saturating loss, and a quality score that losses cannot give.

A GAN's losses say who is winning, not whether the images are any good, so each epoch a reference
classifier (trained once, on the job's own training split) reads a fixed batch of generated
images: ``confident_share`` is the share it classifies with probability >= 0.9, and
``min_class_share`` the share of the rarest class among them (1/classes when balanced). Mode
collapse shows in the second even when the first looks fine. ``quality`` multiplies the first by
the second's shortfall from balance, and is what checkpoints are ranked by.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CONFIDENT = 0.9
QUALITY_SAMPLES = 1000


class Sampler(nn.Module):
    """Serving head: noise (batch, latent_dim) -> images in the data set's own pixel units."""

    def __init__(self, pipeline: nn.Module):
        super().__init__()
        self.generator = pipeline.net.generator
        self.register_buffer("mean", pipeline.standardize.mean.clone())
        self.register_buffer("std", pipeline.standardize.std.clone())

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        return self.generator(noise) * self.std + self.mean


def _bce(logits: torch.Tensor, real: bool) -> torch.Tensor:
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits, target)


class Generation:
    name = "generation"
    monitor, monitor_mode = "val_quality", "max"
    metric_names = ("d_loss", "g_loss", "quality", "confident_share", "min_class_share")

    def __init__(self, num_classes: int, **_: object):
        self.num_classes = num_classes
        self.reference: nn.Module | None = None
        self.reference_accuracy: float | None = None

    def train_step(self, model, optimizer, scheduler, real, targets, *, use_amp: bool,
                   grad_clip: float | None) -> torch.Tensor:
        """One discriminator step, then one generator step; one optimizer, so each step clears the
        other net's gradients (Adam leaves a parameter without a gradient alone)."""
        pipeline = getattr(model, "module", model)
        gan = pipeline.net
        real = pipeline.standardize(real)
        fake = gan.generator(gan.noise(len(real), real.device))

        d_loss = _bce(gan.discriminator(real), True) + _bce(gan.discriminator(fake.detach()), False)
        optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        self._step(gan.discriminator, optimizer, grad_clip)

        g_loss = _bce(gan.discriminator(fake), True)  # non-saturating: maximize log D(G(z))
        optimizer.zero_grad(set_to_none=True)
        g_loss.backward()
        for parameter in gan.discriminator.parameters():
            parameter.grad = None
        self._step(gan.generator, optimizer, grad_clip)
        scheduler.step()
        count = torch.full((), float(len(real)), device=real.device)
        return torch.stack([d_loss.detach() * count, g_loss.detach() * count, count])

    @staticmethod
    def _step(net: nn.Module, optimizer, grad_clip: float | None) -> None:
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
        optimizer.step()

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return _bce(outputs[:, :1], True) + _bce(outputs[:, 1:], False)

    def batch_sums(self, outputs: torch.Tensor, targets: torch.Tensor,
                   loss: torch.Tensor | None = None) -> torch.Tensor:
        """[summed discriminator loss, summed generator loss, images] from (real, fake) logits."""
        count = torch.full((), float(len(outputs)), device=outputs.device)
        d_loss = self.loss(outputs, targets) * count
        g_loss = _bce(outputs[:, 1:], True) * count
        return torch.stack([d_loss.detach(), g_loss.detach(), count])

    def metrics(self, sums: torch.Tensor, prefix: str) -> dict[str, float]:
        d_loss, g_loss, count = sums.tolist()
        count = max(count, 1.0)
        return {f"{prefix}_d_loss": d_loss / count, f"{prefix}_g_loss": g_loss / count}

    def fit_reference(self, splits, epochs: int = 30, seed: int = 0) -> None:
        """A small CNN trained on the training split: the judge of generated images."""
        with torch.random.fork_rng():  # training's own random stream goes on untouched
            torch.manual_seed(seed)
            self._fit_reference(splits, epochs, torch.Generator().manual_seed(seed))

    def _fit_reference(self, splits, epochs: int, generator: torch.Generator) -> None:
        from deepyard.models import MODELS
        from deepyard.models.pipeline import Pipeline

        net = MODELS.build("cnn", {"channels": [32, 64], "hidden_sizes": [128], "dropout": 0.25},
                           in_shape=splits.in_shape, num_outputs=self.num_classes)
        model = Pipeline(net, splits.input_stats())
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        x, y = torch.from_numpy(splits.x_train), torch.from_numpy(splits.y_train)
        steps = max(1, epochs * len(x) // 128)
        model.train()
        for _ in range(min(steps, 3000)):
            index = torch.randint(len(x), (128,), generator=generator)
            loss = F.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        self.reference = model.eval()
        with torch.inference_mode():
            predicted = model(torch.from_numpy(splits.x_test)).argmax(-1).numpy()
        self.reference_accuracy = float((predicted == splits.y_test).mean())

    @torch.inference_mode()
    def quality(self, pipeline: nn.Module, splits, prefix: str, seed: int = 0,
                judge_seed: int = 0) -> dict[str, float]:
        """How the reference classifier (fitted on ``splits`` the first time) sees a fixed batch of
        generated images."""
        if self.reference is None:
            with torch.inference_mode(False):
                self.fit_reference(splits, seed=judge_seed)
        gan = pipeline.net
        was_training = gan.training
        gan.eval()
        device = next(gan.parameters()).device
        noise = gan.noise(QUALITY_SAMPLES, generator=torch.Generator().manual_seed(seed)).to(device)
        images = Sampler(pipeline)(noise).cpu()
        gan.train(was_training)
        probabilities = torch.softmax(self.reference(images), dim=-1)
        confident = probabilities.max(-1).values >= CONFIDENT
        shares = torch.bincount(probabilities.argmax(-1), minlength=self.num_classes).float() / QUALITY_SAMPLES
        confident_share, min_share = float(confident.float().mean()), float(shares.min())
        balance = min(1.0, min_share * self.num_classes)
        return {f"{prefix}_confident_share": confident_share, f"{prefix}_min_class_share": min_share,
                f"{prefix}_quality": confident_share * balance}

    def serving_module(self, pipeline: nn.Module) -> nn.Module:
        return Sampler(pipeline)
