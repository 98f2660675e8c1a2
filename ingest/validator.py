"""Turn downloaded bytes into a clean JPEG, or a reason why not.

Checks run cheapest first and before decoding pixels: the header's size is checked against the
pixel cap before any decode, so a decompression bomb (a tiny file claiming 50,000 x 50,000 px)
costs nothing; truncated and non-image bodies are told apart so the stats say what went wrong.
Decodes that pass the cap draw their pixels from the task's PixelBudget, so small bombs cannot add
up; the stored image is upright (EXIF orientation) and 8-bit (16-bit and float images scaled);
a near-blank image is rejected, and a colour signature goes beside the pHash (dedup.py).
"""
from __future__ import annotations

import hashlib
import io
import os
import threading
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if "PILLOW_BLOCK_SIZE" not in os.environ:
    # Pillow allocates image memory in blocks of 16 MB, under glibc's mmap threshold once it has grown:
    # a big decode's blocks then stay in the malloc arena of the thread that decoded it, and four
    # threads decoding one after another (the pixel budget below) held 749-844 MB against 554 MB for
    # one (`PILLOW_BLOCK_SIZE=16m python -m bench.decode_memory`; 616 MB with this). Blocks of 64 MB are
    # mapped and unmapped whole, so what one decode frees goes back to the system. Pillow's block
    # allocator: https://pillow.readthedocs.io/en/stable/reference/block_allocator.html
    Image.core.set_block_size(64 * 2**20)


class Rejected(Exception):
    """A downloaded body that does not become a sample; `reason` is a short stats key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class CleanImage:
    jpg: bytes
    width: int
    height: int
    sha256: str
    phash: str
    colour: str
    source_width: int
    source_height: int
    source_format: str


# Near-blank: every channel of a 32 x 32 thumbnail spreads less than this (standard deviation, of
# 255). Flat fills and placeholders are the web's commonest "images"; the 85 real photos of
# shared/realdata spread 22 or more.
BLANK_STD = 4.0


def phash(img: Image.Image) -> str:
    """64-bit DCT perceptual hash (OpenCV's img_hash) as 16 hex digits."""
    gray = np.asarray(img.convert("L"))
    return cv2.img_hash.pHash(gray).tobytes().hex()


class PixelBudget:
    """Decoded pixels in flight in one crawl task, shared by all its download threads.

    The pixel cap stops one image from being too big; it does not stop sixteen threads from each
    decoding a 34-byte WebP that declares 6000 x 6000 px at the same moment (about 550 MB each,
    measured: docs/CRAWL.md). A decode waits here until its pixels fit; one larger than the whole budget waits
    until it is alone. `peak` is the most pixels ever reserved at once."""

    def __init__(self, limit: int):
        self.limit, self.used, self.peak = limit, 0, 0
        self._cond = threading.Condition()

    @contextmanager
    def reserve(self, pixels: int):
        pixels = min(pixels, self.limit)
        with self._cond:
            while self.used + pixels > self.limit:
                self._cond.wait()
            self.used += pixels
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._cond:
                self.used -= pixels
                self._cond.notify_all()


def to_8bit(img: Image.Image) -> Image.Image:
    """An 8-bit image from a 16-bit or 32-bit one, scaled by its nominal range; `convert` would clip
    (a 16-bit PNG filled with 32768 became white, a float TIFF of 0.5 black).

    16-bit integers keep their high byte (as libpng and PIL do for 16-bit RGB); 32-bit integers
    ("I": 16-bit PGM and TIFF decode to it) must hold 16-bit values; floats must lie in [0, 1].
    Anything else has no range we can know: Rejected("unsupported_depth")."""
    if img.mode not in ("F", "I") and not img.mode.startswith("I;16"):
        return img
    arr = np.asarray(img)
    if img.mode == "F":
        if not (np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0):
            raise Rejected("unsupported_depth", f"float image with values outside [0, 1] "
                                                f"({np.nanmin(arr):g}..{np.nanmax(arr):g})")
        return Image.fromarray((arr * 255.0 + 0.5).astype(np.uint8))
    if arr.min() < 0 or arr.max() > 65535:
        raise Rejected("unsupported_depth", f"{img.mode} image with values {arr.min()}..{arr.max()}, "
                                            f"not 16-bit")
    return Image.fromarray((arr >> 8).astype(np.uint8))
def colour_signature(img: Image.Image) -> str:
    """Mean R, G, B of each cell of a 2 x 2 grid (row by row), 12 bytes as 24 hex digits.

    pHash sees luminance only: a red and a blue picture of one shape hash alike. The near-duplicate
    rule (dedup.py) also asks for signatures this close, so only the same picture merges."""
    return cv2.resize(np.asarray(img), (2, 2), interpolation=cv2.INTER_AREA).tobytes().hex()


def reject_near_blank(img: Image.Image) -> None:
    """Raise Rejected("near_blank") for an image with almost no content (see BLANK_STD)."""
    thumb = cv2.resize(np.asarray(img), (32, 32), interpolation=cv2.INTER_AREA)
    spread = float(thumb.reshape(-1, 3).std(axis=0).max())
    if spread < BLANK_STD:
        raise Rejected("near_blank", f"colour spread {spread:.1f} < {BLANK_STD}")


def clean_image(data: bytes, image_size: int = 512, quality: int = 90, min_size: int = 32,
                max_pixels: int = 40_000_000, pixels: PixelBudget | None = None) -> CleanImage:
    """Decode, check, orient upright (EXIF), scale to 8 bits, resize (longest side to image_size, never
    up) and re-encode as JPEG. With `pixels`, the decode waits for its share of the task's budget."""
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")):
        raise Rejected("not_image", "HTML/XML body")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        if isinstance(e, UnidentifiedImageError):
            raise Rejected("not_image", "not a decodable image") from None
        raise Rejected("too_many_pixels", str(e)) from None
    w, h = img.size
    fmt = img.format or "unknown"
    if w * h > max_pixels:
        raise Rejected("too_many_pixels", f"{w}x{h} > {max_pixels} px")
    if min(w, h) < min_size:
        raise Rejected("too_small", f"{w}x{h}, shorter side under {min_size}")
    scale = min(1.0, image_size / max(w, h))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # stored size, before orientation
    if fmt == "JPEG" and scale < 0.5:
        img.draft("RGB", size)  # decode at 1/2..1/8 scale, at least `size`: the resize's biggest saving
    with (pixels.reserve(img.size[0] * img.size[1]) if pixels else nullcontext()):
        try:
            img.load()
        except OSError as e:
            raise Rejected("truncated" if "truncated" in str(e) else "corrupt", str(e)) from None
        except (SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise Rejected("corrupt", str(e)) from None
        # upright as the EXIF orientation says (phones store photos sideways); the stored JPEG carries
        # no EXIF, so no reader can turn it a second time
        loaded = img.size
        ImageOps.exif_transpose(img, in_place=True)
        if img.size != loaded:  # turned a quarter: the stored size turns with it
            w, h, size = h, w, size[::-1]
        img = to_8bit(img)
        factor = max(img.size) // (2 * max(size))
        if factor >= 2:  # box-average to >= 2x the target first: no full-size copy below
            if img.mode not in ("L", "LA", "RGB", "RGBA", "CMYK", "YCbCr"):  # those reduce() takes
                img = img.convert("RGBA" if _has_alpha(img) else "RGB")
            img = img.reduce(factor)
        try:
            img = _rgb(img)
        except ValueError as e:
            raise Rejected("unsupported_mode", f"{img.mode}: {e}") from None
        if img.size != size:
            # OpenCV's SIMD resize is 5-8x faster than PIL's here (the crawl's largest CPU cost after
            # decoding); area averaging where more than 2x is left to reduce, cubic otherwise
            interp = cv2.INTER_AREA if max(img.size) > 2 * max(size) else cv2.INTER_CUBIC
            img = Image.fromarray(cv2.resize(np.asarray(img), size, interpolation=interp))
    reject_near_blank(img)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    jpg = buf.getvalue()
    return CleanImage(jpg=jpg, width=img.size[0], height=img.size[1], sha256=hashlib.sha256(jpg).hexdigest(),
                      phash=phash(img), colour=colour_signature(img), source_width=w, source_height=h,
                      source_format=fmt)


def _rgb(img: Image.Image) -> Image.Image:
    """RGB, with transparent pixels over white (not black)."""
    if img.mode == "RGB":
        return img
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
