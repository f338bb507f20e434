"""The one image opener: any image source we accept -> a fully decoded RGB PIL image, or a refusal with a reason.

Used by the data module, evaluation, the chat app and the pipeline inputs we prepare, so a file gives the same pixels
everywhere. It imports neither `datasets` nor torch: the app opens uploads with it alone.

Notable:
- `load_rgb`: fully decoded RGB, upright (EXIF orientation applied, then dropped), alpha on white, 16-bit rescaled,
  not clipped. Sources: a path, bytes, a binary file object, HF's {"bytes", "path"} dict or a PIL image.
- Too many pixels are refused from the header alone (`open_header`): `too_many_pixels` over `max_pixels`,
  `decompression_bomb` only over PIL's own limit. An image with no pixels at all is `empty_image`.
- Paths are stat-ed, never opened, before use (`check_file`): a folder, FIFO or device is `not_a_file` (a FIFO would
  block forever), a URL `image_url`, a NUL byte or an over-long name `bad_path`.
- A refusal is an `ImageRefused` whose `reason` is the key it is counted under. Its message names a file by its name
  only (no folders of this machine), bytes by their count, and never holds an object's repr (`shorten`, `_why`).
"""

import errno
import io
import os
import re
import stat
import warnings
from pathlib import Path
from typing import Any

from PIL import Image

MAX_PIXELS = 64_000_000  # refused from the header; PIL's own bomb limit (Image.MAX_IMAGE_PIXELS) applies as well


class ImageRefused(ValueError):
    """An image we will not use. `reason` is the key it is counted under; str(self) is a message for people."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


ORIENTATION = 0x0112  # EXIF tag: how the camera was held; cameras store pixels unrotated
TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_QUIET_BOMB_WARNING = ("ignore", None, Image.DecompressionBombWarning, None, 0)


def shorten(value: Any, n: int = 60) -> str:
    """A value fit for a message: bytes as <N bytes>, long text cut, never an object's repr like <_io.BytesIO ...>."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if isinstance(value, (str, Path)):
        text = str(value)
        return repr(text if len(text) <= n else f"{text[:n]}… ({len(text)} characters)")
    return f"<a {type(value).__name__}>"


def load_rgb(src: Any, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Any image source we accept -> a new, fully decoded RGB image, upright (EXIF orientation applied).

    `src`: a path (str or Path), bytes, a binary file object, HF's {"bytes", "path"} dict or a PIL image. Alpha is
    composited on white and 16-bit grey rescaled (`to_rgb`). Too many pixels are refused from the header alone,
    before anything is decoded. Raises ImageRefused; its message names the file by its name only (no folders), bytes
    by their count, and never holds an object's repr.
    """
    return decode_opened(*open_header(src, max_pixels=max_pixels))


def decode_opened(im: Image.Image, name: str, owned: bool) -> Image.Image:
    """The second half of load_rgb: decode, make RGB, turn upright; close the file if we opened it."""
    try:
        im.load()
        orientation = im.getexif().get(ORIENTATION)
        rgb = to_rgb(im)
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # a whole header over cut or corrupt pixel data
        raise ImageRefused("undecodable_image", f"{name}: cannot decode its pixels ({why(e)})") from None
    finally:
        if owned:
            im.close()
    if orientation in TRANSPOSE:
        rgb = rgb.transpose(TRANSPOSE[orientation])
    # Pitfall: the EXIF (or XMP) that says "rotate" would be applied a second time by whoever reads it next, e.g.
    # transformers' load_image in pipelines. The pixels are upright now: keep no metadata at all.
    rgb.info.clear()
    return rgb


def open_header(src: Any, *, max_pixels: int = MAX_PIXELS, name: str | None = None) -> tuple[Image.Image, str, bool]:
    """Open lazily (header only) and refuse too many pixels -> (image, name for messages, whether we own it)."""
    _quiet_pil_bomb_warning()
    if isinstance(src, Image.Image):
        im, owned, name = src, False, name or "the image"
    else:
        fp, shown, owned = _image_file(src)
        name = name or shown
        try:
            im = Image.open(fp)
        except Image.DecompressionBombError:  # over twice PIL's limit: it refuses to even report the size
            detail = f"claims over {2 * Image.MAX_IMAGE_PIXELS:,} pixels: a decompression bomb"
            raise ImageRefused("decompression_bomb", f"{name} {detail}") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:  # UnidentifiedImageError is an OSError
            raise ImageRefused("undecodable_image", f"{name} cannot be opened as an image ({why(e)})") from None
    width, height = im.size
    pixels = width * height
    limit = Image.MAX_IMAGE_PIXELS
    reason = "decompression_bomb" if limit and pixels > limit else "too_many_pixels" if pixels > max_pixels else None
    reason = "empty_image" if pixels == 0 else reason
    if reason and owned:
        im.close()
    if reason == "empty_image":  # resized, it would become a constant tensor: an image of nothing
        raise ImageRefused(reason, f"{name} is {width}x{height}: it has no pixels")
    if reason == "decompression_bomb":
        detail = f"over PIL's decompression-bomb limit of {limit:,} (PIL.Image.MAX_IMAGE_PIXELS)"
        raise ImageRefused(reason, f"{name} claims {width}x{height} = {pixels:,} pixels, {detail}")
    if reason == "too_many_pixels":  # a plain large photo, not an attack: say how to accept it
        detail = f"over the cap of {max_pixels:,}; raise max_pixels (training: --max_pixels) to accept it"
        raise ImageRefused(reason, f"{name} is {width}x{height} = {pixels:,} pixels, {detail}")
    return im, name, owned


def _quiet_pil_bomb_warning() -> None:
    """Silence PIL's DecompressionBombWarning, once: open_header makes the same check and refuses, counted.

    Pitfall: a `warnings.catch_warnings()` block per image would reset Python's show-once registry on every exit,
    so every show-once warning of the process would print once per image. Adding the filter only when it is
    missing mutates the filter list once. It applies process-wide; PIL's error above twice its limit stays.
    """
    if _QUIET_BOMB_WARNING not in warnings.filters:
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _image_file(src: Any) -> tuple[Any, str, bool]:
    """An image source -> (what Image.open takes, how messages name it, whether closing it is ours to do)."""
    if isinstance(src, dict):  # HF Image feature storage: inline bytes win over the path
        src = src.get("bytes") or src.get("path")
    if isinstance(src, (bytes, bytearray, memoryview)):
        return io.BytesIO(src), f"image of {shorten(src)}", True
    if isinstance(src, (str, os.PathLike)):
        text = os.fspath(src)
        if isinstance(text, str) and text.startswith(("http://", "https://")):
            raise ImageRefused("image_url", f"image {shorten(text)} is a URL; only local files are opened")
        shown = f"image {shorten(Path(text).name)}"  # the name only: no folders of this machine in messages
        return check_file(Path(text), shown), shown, True
    if hasattr(src, "read"):  # a binary file object, e.g. an upload. Pitfall: PIL's close() would close it too
        return src, f"image {shorten(Path(str(getattr(src, 'name', 'upload'))).name)}", False
    expected = "a path, bytes, a file object, {'bytes', 'path'} or a PIL image"
    raise ImageRefused("malformed_record", f"unusable image reference {shorten(src)}: expected {expected}")


def check_file(path: Path, shown: str) -> Path:
    """`path` if it is a regular file; otherwise ImageRefused saying honestly what it is. Never opens it (a FIFO
    would block forever)."""
    try:
        mode = path.stat().st_mode  # follows symlinks: the target is what we would read
    except ValueError:  # "embedded null byte", or a lone surrogate the file system cannot encode
        detail = "the path holds a NUL byte" if "\0" in str(path) else "the path is not valid Unicode"
        raise ImageRefused("bad_path", f"{shown}: {detail}") from None
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            raise ImageRefused("missing_image", f"{shown} not found") from None
        raise ImageRefused("bad_path", f"{shown}: unusable path ({e.strerror})") from None  # too long, no access
    if stat.S_ISDIR(mode):
        raise ImageRefused("not_a_file", f"{shown} is a folder, not an image file")
    if not stat.S_ISREG(mode):
        raise ImageRefused("not_a_file", f"{shown} is not a regular file (a FIFO, socket or device); not read")
    return path


def why(err: BaseException) -> str:
    """An exception's text without object reprs or file paths (PIL writes both into its messages)."""
    if isinstance(err, Image.UnidentifiedImageError):
        return "not an image format PIL can read"
    text = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<file>", str(err))
    text = re.sub(r"'/[^']*'", "<path>", text)
    return shorten(text, 120).strip("'\"")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> a new RGB image (so the source file can be closed). Orientation: see load_rgb."""
    if im.mode.startswith("I"):  # 16/32-bit grey: convert("L") would clip everything above 255 to white
        full = 65535 if im.mode.startswith("I;16") else None
        im = im.convert("I")
        hi = im.getextrema()[1]
        full = full or (255 if hi <= 255 else 65535 if hi <= 65535 else hi)  # mode I: guess the range from the data
        return im.point(lambda v: v * (255 / full)).convert("L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        # plain convert("RGB") drops alpha and shows whatever hides under transparent pixels, often black
        im = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im).convert("RGB")
    return im.convert("RGB")  # P, L, 1, CMYK, YCbCr, RGB
