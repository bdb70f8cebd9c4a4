"""The images and videos of a request, from their URLs: `data:` URLs (base64) always, `file://` URLs only under the
directory the server allows (`--allowed-local-media-path`), nothing fetched from a network.

Errors are the runtime's: `InputError` (a server answers 400), `MediaTooLarge` (413).
"""

from __future__ import annotations

import base64
import binascii
import tempfile
from io import BytesIO
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
from PIL import Image, UnidentifiedImageError

from llava_rt.runtime import InputError, MediaTooLarge
from llava_rt.runtime.video import load_video


def _data_url_bytes(url: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise InputError("data: URLs must be base64-encoded (data:<media type>;base64,<data>)")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as exc:
        raise InputError(f"the data: URL is not valid base64: {exc}") from None


class MediaReader:
    """Reads `image_url` and `video_url` parts. `allowed_directory`: where `file://` URLs may point (resolved, symlinks
    followed); `None` refuses them. `max_pixels`: the runtime's limit on each image and video frame."""

    def __init__(self, allowed_directory: Path | None, max_pixels: int):
        self.allowed_directory = allowed_directory.resolve() if allowed_directory is not None else None
        self.max_pixels = max_pixels

    def _source(self, url: str) -> bytes | Path:
        """The bytes of a `data:` URL or the resolved path of a permitted `file://` URL."""
        scheme = urlparse(url).scheme.lower()
        if scheme == "data":
            return _data_url_bytes(url)
        if scheme == "file":
            return self._local_file(url)
        raise InputError(
            f"{scheme + ':' if scheme else 'relative'} URLs are not fetched; send the media as a data: URL (base64)"
            + ("" if self.allowed_directory is None else " or a file:// URL under --allowed-local-media-path")
        )

    def _local_file(self, url: str) -> Path:
        if self.allowed_directory is None:
            raise InputError("file:// URLs are refused: the server was started without --allowed-local-media-path")
        parsed = urlparse(url)
        path = Path(unquote(parsed.path))
        if parsed.netloc not in ("", "localhost") or not path.is_absolute():
            raise InputError(f"file:// URLs must hold an absolute local path (file:///...), got {url!r}")
        resolved = path.resolve()
        if not resolved.is_relative_to(self.allowed_directory):
            raise InputError(f"{path} is outside --allowed-local-media-path")
        if not resolved.is_file():
            raise InputError(f"no such file under --allowed-local-media-path: {path}")
        return resolved

    def image(self, url: str) -> Image.Image | Path:
        """An image, opened but not decoded: the runtime checks its size first, then decodes it."""
        source = self._source(url)
        if isinstance(source, Path):
            return source
        try:
            return Image.open(BytesIO(source))
        except Image.DecompressionBombError as exc:
            raise MediaTooLarge(f"the image is too large: {exc}") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise InputError(f"cannot read the image: {exc}") from None

    def video(self, url: str, num_frames: int) -> np.ndarray:
        """`num_frames` frames sampled uniformly, `[T, H, W, 3]` uint8. A `data:` video is decoded from a temporary
        file in a directory of its own, removed on every path."""
        source = self._source(url)
        if isinstance(source, Path):
            return load_video(source, num_frames, self.max_pixels)
        with tempfile.TemporaryDirectory(prefix="llava-serve-") as directory:
            path = Path(directory) / "video"
            path.write_bytes(source)
            try:
                return load_video(path, num_frames, self.max_pixels)
            except InputError as exc:  # the same error, naming the upload instead of the temporary file
                raise type(exc)(str(exc).replace(str(path), "(data: URL)")) from None
