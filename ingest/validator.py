"""Turn downloaded bytes into a clean JPEG, or a reason why not.

Checks run cheapest first and before decoding pixels: the header's size is checked against the
pixel cap before any decode, so a decompression bomb (a tiny file claiming 50,000 x 50,000 px)
costs nothing; truncated and non-image bodies are told apart so the stats say what went wrong.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError


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
                max_pixels: int = 40_000_000) -> CleanImage:
    """Decode, check, resize (longest side to image_size, never up) and re-encode as JPEG."""
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
    if fmt == "JPEG" and max(w, h) > 2 * image_size:
        img.draft("RGB", (image_size, image_size))  # decode at 1/2..1/8 scale: the resize's biggest saving
    try:
        img.load()
    except OSError as e:
        raise Rejected("truncated" if "truncated" in str(e) else "corrupt", str(e)) from None
    except (SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise Rejected("corrupt", str(e)) from None
    if img.mode != "RGB":
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.new("RGB", rgba.size, (255, 255, 255))
            img.paste(rgba, mask=rgba.getchannel("A"))  # transparent pixels to white, not black
        else:
            img = img.convert("RGB")
    if max(img.size) > image_size:
        scale = image_size / max(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        # OpenCV's SIMD resize is 5-8x faster than PIL's here (the crawl's largest CPU cost after
        # decoding); area averaging where the draft left more than 2x to reduce, cubic otherwise
        interp = cv2.INTER_AREA if max(img.size) > 2 * image_size else cv2.INTER_CUBIC
        img = Image.fromarray(cv2.resize(np.asarray(img), size, interpolation=interp))
    reject_near_blank(img)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    jpg = buf.getvalue()
    return CleanImage(jpg=jpg, width=img.size[0], height=img.size[1], sha256=hashlib.sha256(jpg).hexdigest(),
                      phash=phash(img), colour=colour_signature(img), source_width=w, source_height=h,
                      source_format=fmt)
