"""Reading images and label masks from disk, with errors that name the file.

Images are returned as uint8 (H, W, 3) RGB arrays, masks as uint8 (H, W) arrays of label ids (palette or
grayscale PNGs, as in VOC's SegmentationClass / SegmentationClassAug).
"""
from __future__ import annotations

import os
from typing import Tuple

import numpy as np
from PIL import Image


class CorruptImageError(RuntimeError):
    """An image or mask file exists but cannot be decoded. The message names the file."""


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode ``path`` into a uint8 (H, W, 3) RGB array (grayscale/CMYK/alpha images are converted)."""
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.array(im.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises these for truncated / unknown data
        raise CorruptImageError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    return arr


def check_image(path: str | os.PathLike) -> None:
    """Decode ``path`` cheaply (JPEG draft mode at 1/8 size) and raise :class:`CorruptImageError` if that
    fails. Truncated or garbage files fail here; used by ``skip_bad_images`` scans."""
    try:
        with Image.open(path) as im:
            if im.format == "JPEG":
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise CorruptImageError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Decode a label PNG into a uint8 (H, W) array of ids (0 bg, k + 1 class k, 255 ignore).

    Palette ("P") and 8-bit grayscale ("L") PNGs are read as stored indices. RGB colour masks are refused
    (convert them to index PNGs first) rather than guessed.
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("P", "L", "I", "I;16"):
                raise CorruptImageError(
                    f"mask {path} has PIL mode {im.mode!r}; expected a palette ('P') or grayscale ('L') PNG "
                    f"of class ids (0 bg, k+1 class k, 255 ignore)")
            arr = np.array(im)
    except FileNotFoundError:
        raise FileNotFoundError(f"mask file not found: {path}") from None
    except CorruptImageError:
        raise
    except (OSError, ValueError, SyntaxError) as e:
        raise CorruptImageError(f"cannot read mask {path}: {type(e).__name__}: {e}") from e
    if arr.dtype != np.uint8:
        if arr.min() < 0 or arr.max() > 255:
            raise CorruptImageError(f"mask {path} has values outside [0, 255]: min {arr.min()}, max {arr.max()}")
        arr = arr.astype(np.uint8)
    return arr


def voc_palette() -> np.ndarray:
    """The standard VOC colour map: (256, 3) uint8 (id 0 black, 255 cream)."""
    cmap = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):  # bit-interleaving rule of the VOC devkit's labelcolormap
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


_PALETTE = voc_palette().reshape(-1).tolist()


def write_mask(path: str | os.PathLike, mask: np.ndarray) -> None:
    """Write a uint8 (H, W) id mask as a VOC-style palette PNG."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {tuple(mask.shape)}")
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    im = Image.frombytes("P", (mask.shape[1], mask.shape[0]), mask.tobytes())
    im.putpalette(_PALETTE)
    im.save(path, optimize=False, compress_level=1)


def image_size(path: str | os.PathLike) -> Tuple[int, int]:
    """(H, W) of an image file from its header (no decoding)."""
    with Image.open(path) as im:
        return im.height, im.width
