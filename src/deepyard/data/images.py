"""Image files to arrays: the one decoder that streamed training, the driver's samples and the
checks share, so a model sees the same pixels in each."""

from __future__ import annotations

import numpy as np

MODES = {1: "L", 3: "RGB"}


def decode(data: bytes, channels: int, size: tuple[int, int] | None) -> np.ndarray:
    """An encoded image -> uint8 (channels, height, width) levels, resized to ``size`` (height,
    width) where given. Raises OSError/ValueError on bytes that are no image. (uint8: a quarter of
    float32's bytes through Ray's object store; the loop's edge makes them float.)"""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        if image.mode.startswith("I;16"):  # 16-bit grey: scaled to 8 bits (convert("L") would clip it)
            image = Image.fromarray(((np.asarray(image, dtype=np.uint32) + 128) // 257).astype(np.uint8))
        elif image.mode in ("I", "F"):
            raise ValueError(f"{image.mode!r} images (32-bit integers or floats) are not read yet; save them as "
                             "8- or 16-bit")
        image = image.convert(MODES[channels])
        if size is not None and image.size != (size[1], size[0]):
            image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        pixels = np.asarray(image, dtype=np.uint8)
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
