"""Width and height of an image from its header, without decoding the pixels (PIL reads the header lazily)."""

from __future__ import annotations

from typing import IO

from PIL import Image, UnidentifiedImageError


def header_size(stream: IO[bytes]) -> tuple[int, int] | None:
    """(width, height) as stored in the file (before any EXIF rotation), or None if it is not an image."""
    try:
        with Image.open(stream) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None
    return (int(width), int(height)) if width > 0 and height > 0 else None
