"""Reading and writing RGB images, and converting them to and from tensors.

Every image in lowbitsr is either a numpy ``uint8`` array of shape ``H x W x 3`` (RGB, 0..255)
or a float32 tensor of shape ``(3, H, W)`` / ``(1, 3, H, W)`` holding the same values in
``[0, 255]``. :func:`read_image` is the only way files enter the toolkit; it refuses anything it
would otherwise have to guess about (greyscale, transparency, 16 bits, truncated or enormous
files) with an :class:`~lowbitsr.errors.ImageError` that says what to do.
"""

from __future__ import annotations

import os
import secrets
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import ImageError, LowbitsrError

__all__ = [
    "IMAGE_EXTENSIONS",
    "WRITE_SUFFIXES",
    "check_output_path",
    "image_to_tensor",
    "read_image",
    "tensor_to_image",
    "write_image",
]

#: File name suffixes (lower case) treated as images when scanning folders.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

_WRITE_FORMATS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}

#: File name suffixes (lower case) :func:`write_image` can write.
WRITE_SUFFIXES: tuple[str, ...] = tuple(sorted(_WRITE_FORMATS))

_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N"})
# Advice for library users; the command line shows its own flag instead (lowbitsr.cli).
_CONVERT_HINT = "pass convert=True"
_MAX_PIXELS_HINT = "raise max_pixels"


def _is_16bit(im: Image.Image) -> bool:
    """Whether the file stores 16 bits per sample (read before decoding, from the tile list).

    Pillow opens 16-bit greyscale as mode ``I;16`` but silently keeps only the high byte of
    16-bit RGB(A) PNG/TIFF files; their decoder raw mode (e.g. ``RGB;16B``) still tells.
    """
    if im.mode.startswith("I;16") or im.mode == "I":
        return True
    for tile in getattr(im, "tile", None) or ():
        args = tile[3] if len(tile) > 3 else None
        rawmode = args if isinstance(args, str) else (args[0] if args else None)
        if isinstance(rawmode, str) and ";16" in rawmode:
            return True
    return False


def _grey16_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale 16-bit samples (0..65535) to 8 bits by rounding ``v / 257`` (65535 -> 255)."""
    arr = np.clip(arr.astype(np.float64), 0, 65535)
    return np.floor(arr / 257.0 + 0.5).astype(np.uint8)


def _decoded_to_rgb(im: Image.Image, path: Path, convert: bool, sixteen: bool) -> np.ndarray:
    """Turn a fully decoded Pillow image into uint8 ``H x W x 3``, or raise :class:`ImageError`."""
    mode = im.mode
    if sixteen and not convert:
        raise ImageError(
            f"{path}: 16-bit image (mode {mode}); {_CONVERT_HINT} to scale it to 8 bits"
            + (" and replicate the grey channel to RGB" if mode in _GREY_MODES else "")
        )
    if mode == "P" or mode == "PA":
        # Palette images may carry transparency in the palette or a tRNS chunk.
        has_alpha = mode == "PA" or "transparency" in im.info
        im = im.convert("RGBA" if has_alpha else "RGB")
        mode_desc = f"palette ({mode})"
        rgba = np.asarray(im)
        rgb = rgba[..., :3]
        is_grey = bool(np.array_equal(rgb[..., 0], rgb[..., 1])) and bool(
            np.array_equal(rgb[..., 1], rgb[..., 2])
        )
        alpha = rgba[..., 3] if has_alpha else None
    elif mode in _GREY_MODES:
        mode_desc = mode
        is_grey = True
        if mode.startswith("I"):
            grey = _grey16_to_uint8(np.asarray(im))
            alpha = None
        elif mode in ("LA", "La"):
            la = np.asarray(im.convert("LA"))
            grey, alpha = la[..., 0], la[..., 1]
        else:
            grey, alpha = np.asarray(im.convert("L")), None
        rgb = np.repeat(grey[..., None], 3, axis=2)
    elif mode in ("RGBA", "RGBa"):
        mode_desc = mode
        is_grey = False
        rgba = np.asarray(im.convert("RGBA"))
        rgb, alpha = rgba[..., :3], rgba[..., 3]
    elif mode == "F":
        raise ImageError(
            f"{path}: floating-point image (mode F) has no defined 0..255 range; "
            "save it as an 8-bit RGB PNG first"
        )
    else:
        # RGB, and colour spaces Pillow converts losslessly enough (CMYK, YCbCr, LAB, HSV).
        mode_desc = mode
        is_grey = False
        alpha = None
        try:
            rgb = np.asarray(im.convert("RGB"))
        except (ValueError, OSError) as exc:
            raise ImageError(
                f"{path}: unsupported image mode {mode} ({exc}); save it as an 8-bit RGB PNG"
            ) from exc

    # A fully opaque alpha channel carries no information, so dropping it loses nothing.
    has_transparency = alpha is not None and bool((alpha != 255).any())
    if not convert and (is_grey or has_transparency):
        problems = []
        if is_grey:
            problems.append(f"is greyscale (mode {mode_desc}) but colour RGB is required")
        if has_transparency:
            problems.append(f"has transparent pixels (alpha channel, mode {mode_desc})")
        fixes = []
        if is_grey:
            fixes.append("replicate the grey channel to RGB")
        if has_transparency:
            fixes.append("drop the alpha channel")
        raise ImageError(
            f"{path}: image {' and '.join(problems)}; {_CONVERT_HINT} to {' and '.join(fixes)}"
        )
    out = np.ascontiguousarray(rgb, dtype=np.uint8)
    # Arrays viewing Pillow's buffer are read-only; callers expect to own the pixels.
    return out if out.flags.writeable else out.copy()


def read_image(
    path: str | os.PathLike[str], *, convert: bool = False, max_pixels: int = 100_000_000
) -> np.ndarray:
    """Read an image file as RGB.

    The file is fully decoded (so truncated files are detected here, not later) after its header
    size has been checked against ``max_pixels``. EXIF orientation is not applied: pixels are
    returned as stored, as the SR benchmarks expect.

    Args:
        path: any format Pillow reads (PNG, JPEG, BMP, TIFF, WebP, ...); the first frame of
            multi-frame files.
        convert: accept greyscale images (the grey channel is replicated to R, G and B),
            images with transparency (the alpha channel is dropped, colours kept as stored)
            and 16-bit images (scaled to 8 bits, ``round(v / 257)`` for greyscale). Without it,
            such files raise :class:`ImageError`. Colour palette images and images with a
            fully opaque alpha channel are always converted silently, since nothing is lost.
        max_pixels: refuse images with more than this many pixels (width × height) before
            decoding them, which protects against decompression bombs. Pillow's own hard limit
            (``2 * PIL.Image.MAX_IMAGE_PIXELS``) also applies.

    Returns:
        ``uint8`` array of shape ``H x W x 3`` (RGB, 0..255), C-contiguous.

    Raises:
        ImageError: missing file, not an image, corrupt or truncated data, too many pixels,
            unsupported mode, or (without ``convert``) greyscale / transparent / 16-bit image.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not an image file" if path.is_dir() else "image file not found"
        raise ImageError(f"{path}: {what}; check the path")
    with warnings.catch_warnings():
        # Our own max_pixels check below replaces Pillow's size warning.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im_file = Image.open(path)
        except Image.DecompressionBombError as exc:
            raise ImageError(
                f"{path}: refused to decode a possible decompression bomb ({exc}); "
                "downscale the image first"
            ) from exc
        except (OSError, SyntaxError, ValueError) as exc:
            # UnidentifiedImageError is an OSError; broken headers surface as the others.
            raise ImageError(
                f"{path}: not a readable image file ({type(exc).__name__}: {exc}); "
                "re-export it as PNG or JPEG"
            ) from exc
        with im_file as im:
            width, height = im.size
            if width * height > max_pixels:
                raise ImageError(
                    f"{path}: image header says {width}x{height} = {width * height} pixels, more "
                    f"than max_pixels={max_pixels} (possible decompression bomb); "
                    f"downscale the image or {_MAX_PIXELS_HINT}"
                )
            sixteen = _is_16bit(im)
            try:
                im.load()
            except Image.DecompressionBombError as exc:
                raise ImageError(
                    f"{path}: refused to decode a possible decompression bomb ({exc}); "
                    "downscale the image first"
                ) from exc
            except Exception as exc:
                # Pillow's decoders report broken data with many exception types (OSError,
                # SyntaxError, ValueError, EOFError, struct.error, zlib.error, ...).
                raise ImageError(
                    f"{path}: corrupt or truncated image data ({type(exc).__name__}: {exc}); "
                    "re-download or re-export the file"
                ) from exc
            return _decoded_to_rgb(im, path, convert, sixteen)


def _as_uint8_rgb(img: np.ndarray) -> np.ndarray:
    """Validate an ``H x W x 3`` image and return it as uint8 (floats rounded and clipped)."""
    arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"expected an H x W x 3 RGB image, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise ValueError("image contains NaN or infinite values")
        return np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    raise ValueError(f"expected a uint8 or float image in [0, 255], got dtype {arr.dtype}")


def write_image(path: str | os.PathLike[str], img: np.ndarray) -> Path:
    """Write an RGB image atomically, choosing the format from the file extension.

    The data goes to a temporary file in the destination folder which then replaces ``path``
    with :func:`os.replace`, so readers never see a half-written image. Parent folders are
    created. JPEG is written at quality 95 without chroma subsampling.

    Args:
        path: destination; suffix ``.png``, ``.jpg``/``.jpeg``, ``.bmp`` or ``.tif``/``.tiff``.
        img: ``H x W x 3`` RGB, ``uint8`` or a float/int array in ``[0, 255]`` (rounded half to
            even, then clipped).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ImageError: unsupported extension, or the file cannot be written.
        ValueError: ``img`` is not an ``H x W x 3`` finite numeric array.
    """
    path = Path(path)
    if path.is_dir():
        raise ImageError(f"{path}: is a folder; give an image file name, e.g. {path / 'image.png'}")
    fmt = _WRITE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ImageError(
            f"{path}: cannot choose an image format from suffix {path.suffix!r}; "
            f"use one of {', '.join(sorted(_WRITE_FORMATS))}"
        )
    data = _as_uint8_rgb(img)
    options = {"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # open(..., "xb") rather than mkstemp so the final file gets the usual umask permissions.
        with open(tmp, "xb") as fh:
            Image.fromarray(np.ascontiguousarray(data)).save(fh, format=fmt, **options)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise ImageError(
            f"{path}: could not write image ({exc}); check the folder and disk space"
        ) from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def check_output_path(
    path: str | os.PathLike[str],
    *,
    folder: bool = False,
    suffixes: tuple[str, ...] | None = None,
    what: str = "output",
    example: str | None = None,
) -> Path:
    """Check, before any work, that ``path`` can be written; creates nothing.

    The nearest existing ancestor must be a folder the process may write in; a file path must
    not be an existing folder (and must end in one of ``suffixes`` when given); a folder path
    must not be an existing file.

    Args:
        path: the file (or, with ``folder``, the folder) about to be written.
        folder: ``path`` is a folder that will hold the outputs.
        suffixes: allowed lower-case suffixes of a file path (e.g. :data:`WRITE_SUFFIXES`).
        what: what the path is for, used in the messages (e.g. ``"ONNX file"``).
        example: a file name suggested when ``path`` is an existing folder (default
            ``name`` plus the first of ``suffixes``).

    Returns:
        ``path`` as a :class:`~pathlib.Path` (``~`` expanded).

    Raises:
        LowbitsrError: the path cannot be written; the message names it and says what to give.
    """
    p = Path(path).expanduser()
    if folder:
        if p.exists() and not p.is_dir():
            raise LowbitsrError(f"{p}: is a file, not a folder; give a folder for the {what}")
    else:
        if p.is_dir():
            name = example or f"name{(suffixes or ('',))[0]}"
            raise LowbitsrError(
                f"{p}: is a folder; give a file name for the {what}, e.g. {p / name}"
            )
        if suffixes is not None and p.suffix.lower() not in suffixes:
            raise LowbitsrError(
                f"{p}: cannot tell the {what} format from suffix {p.suffix!r}; "
                f"use one of {', '.join(suffixes)}"
            )
    ancestor = p if folder and p.is_dir() else p.parent
    while not ancestor.exists() and not ancestor.is_symlink() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise LowbitsrError(
            f"{p}: cannot write the {what} there, {ancestor} is a file, not a folder"
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise LowbitsrError(
            f"{p}: cannot write the {what}, no permission to write in {ancestor}; "
            "choose another folder"
        )
    if not folder and p.exists() and not os.access(p, os.W_OK):
        raise LowbitsrError(f"{p}: cannot overwrite it, no write permission; choose another name")
    return p


def image_to_tensor(img: np.ndarray) -> torch.Tensor:
    """Convert ``H x W x 3`` uint8 RGB to a float32 tensor of shape ``(3, H, W)`` in [0, 255].

    The values stay integers (no division by 255); add a batch axis with ``[None]``.
    """
    arr = _as_uint8_rgb(img)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).to(torch.float32)


def tensor_to_image(t: torch.Tensor) -> np.ndarray:
    """Convert a ``(3, H, W)`` or ``(1, 3, H, W)`` tensor in [0, 255] to uint8 ``H x W x 3``.

    Values are rounded half to even and clipped to 0..255; the tensor may live on any device
    and require grad (it is detached and copied to the CPU).
    """
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 3 or t.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) or (1, 3, H, W) tensor, got shape {tuple(t.shape)}")
    out = t.detach().to("cpu", torch.float32).round().clamp(0, 255).to(torch.uint8)
    return np.ascontiguousarray(out.permute(1, 2, 0).numpy())
