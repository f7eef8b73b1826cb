"""The DCGAN, its alternating steps, the reference-classifier quality score and the image payloads.
Fast: no Ray (the end-to-end run is in test_zoo_jobs.py)."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
import torch
from torch import nn

from deepyard.data import load_splits
from deepyard.models import MODELS
from deepyard.models.pipeline import Pipeline
from deepyard.serve.payloads import BadRequest
from deepyard.tasks.generation import Generation, Sampler

codec = Generation.codec


@pytest.fixture(scope="module")
def digits():
    return load_splits("digits", {}, val_fraction=0.15, test_fraction=0.15, seed=0)


def gan_pipeline(in_shape=(1, 8, 8), pixel_max=16.0):
    torch.manual_seed(0)
    net = MODELS.build("dcgan", {"latent_dim": 8, "width": 8}, in_shape=in_shape, num_outputs=10)
    half = np.full((in_shape[0], 1, 1), pixel_max / 2, dtype=np.float32)
    return Pipeline(net, (half, half))


@pytest.mark.parametrize("in_shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_dcgan_shapes(in_shape):
    pipeline = gan_pipeline(in_shape)
    images = Sampler(pipeline).eval()(torch.randn(4, 8))
    assert images.shape == (4, *in_shape)
    assert images.min() >= 0 and images.max() <= 16  # tanh, mapped back to the data's pixel units
    assert pipeline(torch.rand(4, *in_shape) * 16).shape == (4, 2)  # [real, generated] logits
    with pytest.raises(ValueError, match="divisible by 4"):
        MODELS.build("dcgan", {}, in_shape=(1, 10, 10), num_outputs=10)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")  # the spy below
def test_one_alternating_step_moves_both_nets_and_reports_both_losses(digits):
    pipeline, task = gan_pipeline(), Generation(num_classes=10)
    optimizer = torch.optim.Adam(pipeline.parameters(), lr=1e-3, betas=(0.5, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    stepped = []  # the parameters holding a gradient at each optimizer step
    step = optimizer.step
    optimizer.step = lambda: (stepped.append({id(p) for p in pipeline.parameters() if p.grad is not None}), step())
    generator = [p.detach().clone() for p in pipeline.net.generator.parameters()]
    discriminator = [p.detach().clone() for p in pipeline.net.discriminator.parameters()]
    sums = task.train_step(pipeline, optimizer, scheduler, torch.from_numpy(digits.x_train[:32]), None,
                           use_amp=False, grad_clip=None)
    metrics = task.metrics(sums, "train")
    assert sums[-1] == 32 and np.isfinite(list(metrics.values())).all()
    generator_ids = {id(p) for p in pipeline.net.generator.parameters()}
    discriminator_ids = {id(p) for p in pipeline.net.discriminator.parameters()}
    assert stepped == [discriminator_ids, generator_ids]  # first D alone, then G alone
    assert all(not torch.equal(a, b) for a, b in zip(generator, pipeline.net.generator.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(discriminator, pipeline.net.discriminator.parameters()))


class Constant(nn.Module):
    """A collapsed generator: the same image whatever the noise."""

    def __init__(self, image: torch.Tensor):
        super().__init__()
        self.register_buffer("image", image)

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        return self.image.expand(len(noise), -1, -1, -1)


@pytest.mark.slow  # ~3 s of a core: make test-fast skips it
def test_quality_sees_mode_collapse_and_noise(digits):
    task = Generation(num_classes=10)
    task.fit_reference(digits, epochs=20)
    assert task.reference_accuracy > 0.9
    pipeline = gan_pipeline()
    real_seven = torch.from_numpy(digits.x_train[digits.y_train == 7][:1][0]) / 8.0 - 1.0  # scaled to [-1, 1]
    pipeline.net.generator = Constant(real_seven)
    collapsed = task.quality(pipeline, digits, "val")
    assert collapsed["val_confident_share"] > 0.9  # every sample is a convincing 7...
    assert collapsed["val_min_class_share"] == 0.0 and collapsed["val_quality"] == 0.0  # ...and only 7s
    untrained = task.quality(gan_pipeline(), digits, "val")
    assert untrained["val_quality"] < 0.5


def test_image_requests_and_png_answers():
    metadata = {"task": "generation", "input_shape": [8], "image_shape": [1, 8, 8], "pixel_max": 16.0}
    requests = codec.decode({"instances": [{"n": 3, "seed": 1}, {}]}, metadata, 4)
    assert requests == [(3, 1), (1, None)]
    answers = codec.run(Sampler(gan_pipeline()).eval(), requests, metadata)
    assert [len(a["images"]) for a in answers] == [3, 1]
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(answers[0]["images"][0])))
    assert image.format == "PNG" and image.size == (8, 8)
    again = codec.run(Sampler(gan_pipeline()).eval(), [(3, 1)], metadata)
    assert again[0]["images"] == answers[0]["images"]  # a seed makes the answer repeatable
    for body, message in [({"instances": [{"n": 0}]}, "n: 0; must be an integer from 1 to 64"),
                          ({"instances": [{"n": 2, "z": 1}]}, "unknown keys ['z']"),
                          ({"instances": [{"seed": -1}]}, "seed: -1"),
                          ({"instances": [3]}, "instances[0]: int"),
                          ({"instances": [{"seed": 2**64}]}, "seed: 18446744073709551616"),
                          ({"instances": [{"n": 64}] * 5}, "320 images in one request")]:
        with pytest.raises(BadRequest, match=re.escape(message)):
            codec.decode(body, metadata, 8)
