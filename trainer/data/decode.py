"""Bytes → uint8 RGB tensor, safely for any input.

JPEG (and WebP/GIF) go through ``torchvision.io.decode_image``. PNG goes through Pillow: torchvision's libpng
binding crashes the whole process (SIGSEGV) on some corrupt PNGs ("IDAT: invalid distance too far back", found by
tests/integration/test_fuzz.py), which would take a loader worker, a training rank or ``trainer predict`` down
with it; Pillow reports the same files as an exception. Callers check the header's pixel count first
(``trainer.annotations.image_size.pixel_problem``).
"""

from __future__ import annotations

import io
import warnings
import zlib

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class DecodeError(ValueError):
    """The bytes are not a decodable image; the message is one short line."""


def decode_rgb(data: bytes) -> torch.Tensor:
    """(3, H, W) uint8, EXIF orientation applied; DecodeError for anything that is not a decodable image."""
    if data.startswith(PNG_SIGNATURE):
        return _decode_png(data)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        try:
            return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                                apply_exif_orientation=True)
        except (RuntimeError, ValueError) as exc:
            raise DecodeError(f"cannot decode image ({str(exc).splitlines()[0][:200]})") from exc


def _decode_png(data: bytes) -> torch.Tensor:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            oriented = ImageOps.exif_transpose(image)
            if oriented.mode.startswith("I;16") or oriented.mode == "I":  # 16-bit grey: keep the high byte
                grey = (np.asarray(oriented, dtype=np.uint32) >> 8).astype(np.uint8)
                array = np.repeat(grey[:, :, None], 3, axis=2)
            else:
                array = np.asarray(oriented.convert("RGB"))
    except (OSError, ValueError, SyntaxError, EOFError, zlib.error, Image.DecompressionBombError) as exc:
        detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise DecodeError(f"cannot decode image ({detail})") from exc
    # one copy, straight into CHW order: np.asarray of a PIL image is read-only, and torch warns (in every loader
    # worker's log) when it wraps a read-only array
    return torch.from_numpy(np.array(array.transpose(2, 0, 1), order="C"))
