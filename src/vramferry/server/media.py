"""Encoding what pipelines make (images as PNG, JPEG or WebP; videos as MP4, WebM or GIF) and decoding uploads.

Videos are encoded with PyAV (FFmpeg's libraries, with libx264 and libvpx in its wheels), imported only when a video
is written. Uploads are decoded with Pillow, within limits checked before any pixel is decoded.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

IMAGE_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
IMAGE_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP")  # what Pillow may decode from an upload (no TIFF, PSD, EPS, ...)
DEFAULT_FPS = 16  # Wan's frame rate


@dataclass(frozen=True)
class VideoFormat:
    container: str
    codec: str | None  # None: written by Pillow (GIF)
    media_type: str
    suffix: str


VIDEO_FORMATS = {
    "mp4": VideoFormat("mp4", "libx264", "video/mp4", ".mp4"),
    "webm": VideoFormat("webm", "libvpx-vp9", "video/webm", ".webm"),
    "gif": VideoFormat("gif", None, "image/gif", ".gif"),
}
VIDEO_SUFFIXES = {fmt.suffix: name for name, fmt in VIDEO_FORMATS.items()}


class UploadError(ValueError):
    """An uploaded image that is refused; the message says why (the route names the field)."""


def encode_image(image: Any, output_format: str = "png", compression: int | None = None) -> bytes:
    """``image`` (a PIL image) as PNG, JPEG or WebP bytes.

    Args:
        image: the image.
        output_format: ``png`` (lossless), ``jpeg`` or ``webp``.
        compression: for ``jpeg`` and ``webp``, the quality from 0 to 100 (OpenAI's ``output_compression``: 100,
            the default, is the best quality and the largest file); not used for ``png``.
    """
    if output_format not in IMAGE_FORMATS:
        raise ValueError(f"output_format: {output_format!r} is not one of {', '.join(IMAGE_FORMATS)}")
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG")
    else:
        if output_format == "jpeg" and image.mode not in ("RGB", "L"):
            image = image.convert("RGB")  # JPEG has no alpha channel
        quality = 100 if compression is None else compression
        image.save(buffer, format=IMAGE_FORMATS[output_format], quality=quality)
    return buffer.getvalue()


def write_video(frames: Sequence[Any], path: Path, video_format: str = "mp4", fps: int = DEFAULT_FPS) -> Path:
    """Write ``frames`` (PIL images of one size) to ``path`` as MP4 (H.264), WebM (VP9) or an animated GIF.

    H.264 and VP9 are written in yuv420p (what browsers and players decode) when both sides are even, else in
    yuv444p (odd sides cannot be subsampled; some players refuse it, so a warning says so).

    Raises:
        ValueError: an unknown format, no frames, or frames of different sizes.
        ImportError: PyAV is not installed (``pip install av``; in the ``cli`` extra).
    """
    if video_format not in VIDEO_FORMATS:
        raise ValueError(f"video format: {video_format!r} is not one of {', '.join(VIDEO_FORMATS)}")
    if not frames:
        raise ValueError("a video needs at least one frame")
    if len({frame.size for frame in frames}) != 1:
        raise ValueError(f"the frames have different sizes: {sorted({frame.size for frame in frames})}")
    fmt = VIDEO_FORMATS[video_format]
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt.codec is None:
        duration = max(1, round(1000 / fps))
        frames[0].save(path, save_all=True, append_images=list(frames[1:]), duration=duration, loop=0)
        return path
    try:
        import av
    except ImportError as exc:
        raise ImportError(f"writing {video_format} needs PyAV: pip install av (or the 'cli' extra)") from exc
    width, height = frames[0].size
    pixels = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
    if pixels == "yuv444p":
        logger.warning(
            "%s: %dx%d has an odd side, written in yuv444p (some players refuse it)", path, width, height
        )
    with av.open(str(path), mode="w", format=fmt.container) as container:
        stream = container.add_stream(fmt.codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pixels
        if fmt.codec == "libx264":
            stream.options = {"crf": "18", "preset": "medium"}
        for frame in frames:
            image = frame if frame.mode == "RGB" else frame.convert("RGB")
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder's delayed frames
            container.mux(packet)
    return path


def decode_upload(data: bytes, *, max_pixels: int, what: str = "image") -> Any:
    """An uploaded PNG, JPEG or WebP as an RGB PIL image.

    The header is read first: a file that is not one of these formats, or whose size is over ``max_pixels``, is
    refused before any pixel is decoded (a small file may declare a huge image). Pillow's decompression-bomb
    warnings are errors here, and a truncated or corrupt file is refused, never half-decoded.

    Raises:
        UploadError: naming the problem.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise UploadError(f"{what}: the file is empty")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
            width, height = image.size
            if width < 1 or height < 1 or width * height > max_pixels:
                raise UploadError(
                    f"{what}: {width}x{height} is over the limit of {max_pixels} pixels; send a smaller image"
                )
            image.load()
            return image.convert("RGB")
        except UploadError:
            raise
        except UnidentifiedImageError:
            raise UploadError(f"{what}: not a PNG, JPEG or WebP image") from None
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            raise UploadError(
                f"{what}: over Pillow's decompression-bomb limit; send a smaller image"
            ) from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise UploadError(f"{what}: the file is truncated or corrupt ({exc})") from None
