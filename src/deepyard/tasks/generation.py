"""Image generation with a GAN: alternating discriminator and generator steps with the
non-saturating loss, and a quality score that losses cannot give.

A GAN's losses say who is winning, not whether the images are any good, so each epoch a reference
classifier (trained once, on the job's own training split) reads a fixed batch of generated
images: ``confident_share`` is the share it classifies with probability >= 0.9, and
``min_class_share`` the share of the rarest class among them (1/classes when balanced). Mode
collapse shows in the second even when the first looks fine. ``quality`` multiplies the first by
the second's shortfall from balance, and is what checkpoints are ranked by.

Served: a count and a seed per instance -> that many images as base64 PNGs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deepyard.serve.payloads import BadRequest, JsonOutputs, instances_of, png_base64, seed_of
from deepyard.tasks.base import Supervised

CONFIDENT = 0.9
QUALITY_SAMPLES = 1000
MAX_IMAGES = 64  # per instance
MAX_TOTAL_IMAGES = 256  # per request: one forward pass per batch of images


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


class Images(JsonOutputs):
    """``{"instances": [{"n": 8, "seed": 1}, ...]}`` -> that many images per instance, as base64 PNGs."""

    batchable = False

    def expected(self, metadata: dict[str, Any]) -> str:
        return f'each instance: {{"n": images to generate (1 to {MAX_IMAGES}, default 1), "seed": int (optional)}}'

    def decode(self, body: Any, metadata: dict[str, Any], max_batch: int) -> list[tuple[int, int | None]]:
        requests = []
        for index, item in enumerate(instances_of(body, self.expected(metadata), max_batch)):
            if not isinstance(item, dict) or set(item) - {"n", "seed"}:
                problem = (f"unknown keys {sorted(set(item) - {'n', 'seed'})}" if isinstance(item, dict)
                           else type(item).__name__)
                raise BadRequest(f"instances[{index}]: {problem}; " + self.expected(metadata))
            count = item.get("n", 1)
            if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_IMAGES:
                raise BadRequest(f"instances[{index}].n: {count!r}; must be an integer from 1 to {MAX_IMAGES}")
            requests.append((count, seed_of(item.get("seed"), f"instances[{index}].seed")))
        if (total := sum(count for count, _ in requests)) > MAX_TOTAL_IMAGES:
            raise BadRequest(f"{total} images in one request is over the limit of {MAX_TOTAL_IMAGES}; "
                             "split the request", status=413)
        return requests

    def run(self, module, requests: list[tuple[int, int | None]], metadata: dict[str, Any]) -> list[dict]:
        latent_dim = int(metadata["input_shape"][0])
        results = []
        for count, seed in requests:
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
            with torch.inference_mode():
                images = module(torch.randn(count, latent_dim, generator=generator)).numpy()
            pixel_max = float(metadata.get("pixel_max", 255.0))
            results.append({"images": [png_base64(image, pixel_max) for image in images], "seed": seed})
        return results

    def encode(self, outputs: list[dict], metadata: dict[str, Any], body: dict, options: Any) -> list[Any]:
        return outputs

    def example(self, logged_input, metadata: dict[str, Any]) -> Any:
        return {"n": 4, "seed": 0}


class Generation(Supervised):
    name = "generation"
    directions = {"d_loss": "min", "g_loss": "min", "quality": "max", "confident_share": "max",
                  "min_class_share": "max"}
    monitor = "val_quality"
    shown = ("train_d_loss", "train_g_loss", "val_confident_share", "val_min_class_share")
    data_parallel = False  # the alternating steps are not data-parallel yet
    tie_breaker = None  # a lower loss is not a better GAN
    codec = Images()

    def __init__(self, num_classes: int, **_: object):
        self.num_classes = num_classes
        self.reference: nn.Module | None = None
        self.reference_accuracy: float | None = None

    @staticmethod
    def fits(net: nn.Module, splits) -> str | None:
        if not splits.is_image or splits.task != "classification":
            return ("a GAN generates labelled images; this is not an image classification data set "
                    "(use digits, fashion_mnist or mnist_idx)")
        return None

    def input_stats(self, splits) -> tuple:
        """Pixels scaled to [-1, 1]: mean = std = half the largest pixel value."""
        half = np.full((splits.in_shape[0], 1, 1), float(splits.x_train.max()) / 2, dtype=np.float32)
        return half, half

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

    def epoch_metrics(self, model: nn.Module, splits, seed: int) -> dict[str, float]:
        return self.quality(model, splits, "val", judge_seed=seed)

    def epoch_artifacts(self, model: nn.Module, splits, epoch: int, rows: int = 8) -> dict[str, Any]:
        """An 8x8 grid of generated images (fixed noise, so epochs compare)."""
        from deepyard import plots

        model.eval()
        with torch.inference_mode():
            noise = model.net.noise(rows * rows, generator=torch.Generator().manual_seed(0))
            images = Sampler(model)(noise.to(next(model.parameters()).device)).cpu().numpy()
        pixel_max = float(model.standardize.mean.max() * 2)  # the GAN's scaling: mean = std = max / 2
        return {f"samples/epoch_{epoch:04d}.png": plots.image_grid(images, rows, pixel_max, title=f"epoch {epoch}")}

    def test_metrics(self, model, loader, device, splits, seed: int) -> tuple[dict[str, float], dict[str, Any]]:
        """The losses, the judge's verdict on fresh noise, and how good the judge itself is on real images."""
        test, _ = super().test_metrics(model, loader, device, splits, seed)
        test.update(self.quality(model, splits, "test", seed=1, judge_seed=seed),
                    test_reference_accuracy=self.reference_accuracy)
        return test, {}

    def input_example(self, model: nn.Module, splits) -> torch.Tensor:
        return model.net.noise(5, generator=torch.Generator().manual_seed(0))

    def serving_module(self, pipeline: nn.Module) -> nn.Module:
        return Sampler(pipeline)

    def serving_metadata(self, pipeline: nn.Module, splits) -> dict[str, Any]:
        """The served model takes noise and answers images."""
        return {"input_shape": [pipeline.net.latent_dim], "image_shape": list(splits.in_shape)}
