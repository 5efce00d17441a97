"""Width and height of an image from its header, without decoding the pixels (PIL reads the header lazily).

The header is also where a decompression bomb shows itself: a 1 MB PNG can declare 30000 x 30000 pixels
(2.7 GB once decoded). Callers check the pixel count here before any decoder allocates the image.
"""

from __future__ import annotations

import io
import re
import warnings
from typing import IO

from PIL import Image, UnidentifiedImageError

# Pillow warns past its own limit; we apply ours (data.max_pixels, --max-pixels) from the header instead.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
PILLOW_HARD_LIMIT = 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)  # Image.open refuses larger headers itself


def image_bytes_limit(max_pixels: int) -> int:
    """The largest image file read whole for a ``max_pixels`` limit: 8 bytes a pixel (16-bit RGBA, uncompressed)
    plus 64 MB of metadata. No plausible image within the limit is larger, and reading a larger file whole (one
    of several GB, in each of a loader worker's fetch threads) would exhaust memory before its header was checked."""
    return 8 * max_pixels + (64 << 20)


def header_size(stream: IO[bytes]) -> tuple[int, int] | None:
    """(width, height) as stored in the file (before any EXIF rotation), or None if it is not an image."""
    try:
        with Image.open(stream) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        return None
    return (int(width), int(height)) if width > 0 and height > 0 else None


def pixel_problem(data: bytes, max_pixels: int) -> str | None:
    """Why ``data`` must not be decoded (no readable image header, or more than ``max_pixels`` pixels), else None.

    Only the header is read, so this costs microseconds whatever the image claims to be.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Image.DecompressionBombError as exc:  # past Pillow's own hard limit: only the count is known
        found = re.search(r"\((\d+) pixels\)", str(exc))
        declared = found.group(1) if found else f"more than {PILLOW_HARD_LIMIT}"
        return f"the header declares {declared} pixels, over the limit of {max_pixels}; not decoded"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        detail = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        return f"cannot decode image (no readable JPEG/PNG/GIF/WebP header: {detail})"
    if width <= 0 or height <= 0:
        return f"the header declares a {width}x{height} image"
    if width * height > max_pixels:
        return (f"the header declares {width}x{height} = {width * height} pixels, over the limit of "
                f"{max_pixels}; not decoded")
    return None
