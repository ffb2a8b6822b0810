"""Images at the edges: the one loader and the one writer (docs/DESIGN.md, "The contract").

`load_images` decodes with Pillow (pypng for 16-bit colour PNGs, which Pillow reduces to 8 bits), applies
the EXIF orientation, turns every image into RGB float32 [3,H,W] in [0,1] and remembers what it took away
(alpha, ICC profile, EXIF, bit depth, single channel) so that `save_png` can put it back around the result.
Bad input raises `ImageLoadError`, one line per file naming the problem and what to do.
`save_png` writes losslessly and atomically, in the source's channel layout and bit depth, with the ICC
profile and alpha restored and GPS location removed, plus a JSON manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import png
import torch
from PIL import Image, ImageCms, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
DEFAULT_MAX_PIXELS = 50_000_000  # 50 MP: far above any camera photo, far below a decompression bomb
MIN_SIDE = 16
ORIENTATION, GPS_IFD = 0x0112, 0x8825


class ImageLoadError(ValueError):
    """One or more inputs cannot be used; `problems` holds (name, problem) pairs, one line each in str()."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("\n".join(f"{name}: {problem}" for name, problem in problems))


@dataclass
class LoadedImage:
    """An input image as RGB float32 [3,H,W] in [0,1] (integer codes / maxval) plus what was set aside."""

    name: str
    pixels: torch.Tensor
    bit_depth: int = 8
    gray: bool = False
    alpha: np.ndarray | None = None
    icc_profile: bytes | None = None
    exif: bytes | None = None
    source_mode: str = "RGB"
    path: Path | None = None
    sha256: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def maxval(self) -> int:
        return (1 << self.bit_depth) - 1

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), as Pillow says it."""
        return (self.pixels.shape[2], self.pixels.shape[1])

    @property
    def output_mode(self) -> str:
        mode = ("L" if self.gray else "RGB") + ("A" if self.alpha is not None else "")
        return mode + (";16" if self.bit_depth == 16 else "")

    def describe(self) -> dict:
        return {"name": self.name, "sha256": self.sha256, "size": list(self.size), "mode": self.source_mode,
                "bit_depth": self.bit_depth, "output_mode": self.output_mode, "notes": self.notes}


# ---- finding inputs -------------------------------------------------------------------------------
def expand_inputs(inputs: list[str | os.PathLike]) -> tuple[list[Path], list[str]]:
    """Files and folders -> image files (a folder's files with image suffixes, sorted), plus notes on skips."""
    files, notes, problems = [], [], []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            entries = sorted(e for e in p.iterdir() if not e.name.startswith("."))
            found = [e for e in entries if e.is_file() and e.suffix.lower() in IMAGE_SUFFIXES]
            skipped = [e.name + ("/" if e.is_dir() else "") for e in entries if e not in found]
            if not found:
                problems.append((str(p), f"no images in this folder (looked for {', '.join(IMAGE_SUFFIXES)})"))
            if skipped:
                notes.append(f"{p}: skipped {len(skipped)} non-image entr{'y' if len(skipped) == 1 else 'ies'} (subfolders are not searched): "
                             + ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
            files += found
        elif p.exists():
            files.append(p)
        else:
            problems.append((str(p), "no such file or folder"))
    if problems:
        raise ImageLoadError(problems)
    return files, notes


# ---- loading --------------------------------------------------------------------------------------
def load_images(inputs, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[LoadedImage]:
    """Load paths (files or folders) and/or PIL images. Every problem is collected before raising."""
    items = inputs if isinstance(inputs, (list, tuple)) else [inputs]
    out, problems = [], []
    for i, item in enumerate(items):
        try:
            if isinstance(item, Image.Image):
                out.append(_load_pil(item, f"image{i}"))
                continue
            for path in expand_inputs([item])[0]:
                try:
                    out.append(load_image(path, max_pixels))
                except ImageLoadError as err:
                    problems += err.problems
        except ImageLoadError as err:
            problems += err.problems
    if problems:
        raise ImageLoadError(problems)
    if not out:
        raise ImageLoadError([("(input)", "no images given")])
    return out


def load_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    path = Path(path)
    name = str(path)

    def fail(problem: str):
        raise ImageLoadError([(name, problem)])

    try:
        data = path.read_bytes()
    except IsADirectoryError:
        fail("is a folder, not an image")
    except OSError as err:
        fail(f"cannot read it ({err.strerror or err})")
    if not data:
        fail("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            fail(f"too many pixels to open safely (limit {max_pixels / 1e6:.0f} MP; possible decompression bomb): downscale it first")
        except UnidentifiedImageError:
            fail("not an image Pillow can read (is it really a picture? supported: PNG, JPEG, WebP, BMP, TIFF, GIF)")
        except Exception as err:  # Pillow raises many types on malformed headers
            fail(f"corrupt image header ({err})")
    w, h = img.size
    if w * h > max_pixels:
        fail(f"{w}x{h} = {w * h / 1e6:.0f} MP is over the limit of {max_pixels / 1e6:.0f} MP (decompression-bomb guard): downscale it first")
    if min(w, h) < MIN_SIDE:
        fail(f"too small ({w}x{h}); need at least {MIN_SIDE} px per side")
    notes = []
    try:
        frames = getattr(img, "n_frames", 1)
        if frames > 1:
            notes.append(f"{frames} frames: only the first frame is protected")
            img.seek(0)
    except Exception as err:  # noqa: BLE001  (Pillow raises many types on a broken frame table)
        fail(f"corrupt image data ({type(err).__name__}: {str(err).strip()[:120]}): re-export or re-download it")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            img.load()
        except Exception as err:
            fail(f"truncated or corrupt image data ({err}): re-export or re-download it")
    try:
        loaded = _from_pil(img, name, notes, data)
    except ImageLoadError:
        raise
    except Exception as err:  # a broken chunk, profile or pixel payload found while decoding
        fail(f"corrupt image data ({type(err).__name__}: {str(err).strip()[:120]}): re-export or re-download it")
    loaded.path = path
    loaded.sha256 = hashlib.sha256(data).hexdigest()
    return loaded


def _load_pil(img: Image.Image, name: str) -> LoadedImage:
    if min(img.size) < MIN_SIDE:
        raise ImageLoadError([(name, f"too small ({img.size[0]}x{img.size[1]}); need at least {MIN_SIDE} px per side")])
    return _from_pil(img, name, [], None)


def _from_pil(img: Image.Image, name: str, notes: list[str], data: bytes | None) -> LoadedImage:
    icc = img.info.get("icc_profile") or None
    exif = img.getexif()
    orientation = exif.get(ORIENTATION, 1)
    mode = img.mode
    depth16 = data is not None and _png_bit_depth(data) == 16 and mode not in ("I;16", "I;16B", "I;16L", "I")
    bit_depth, alpha = 8, None
    if depth16:  # 16-bit colour (or grey+alpha) PNG: Pillow would keep only the top 8 bits
        width, height, rows, info = png.Reader(bytes=data).asDirect()
        arr = np.vstack([np.asarray(r, dtype=np.uint16) for r in rows]).reshape(height, width, info["planes"])
        bit_depth = 16
        if info["alpha"]:
            arr, alpha = arr[..., :-1], arr[..., -1]
        arr = arr[..., 0] if arr.shape[-1] == 1 else arr
    elif mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img)
        if arr.min() < 0 or arr.max() > 65535:
            raise ImageLoadError([(name, f"{mode} image with values outside 0..65535: save it as 8- or 16-bit")])
        arr, bit_depth = arr.astype(np.uint16), 16
    elif mode == "F":
        raise ImageLoadError([(name, "floating-point image (mode F) is not supported: save it as 8- or 16-bit")])
    else:
        if mode == "CMYK":
            try:
                src = ImageCms.ImageCmsProfile(io.BytesIO(icc)) if icc else None
            except (OSError, ImageCms.PyCMSError):
                src = None
                notes.append("its ICC profile is unreadable")
            if src is not None:
                img = ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
                notes.append("CMYK converted to sRGB with its ICC profile (PNG cannot store CMYK)")
            else:
                img = img.convert("RGB")
                notes.append("CMYK converted to RGB without a profile (PNG cannot store CMYK)")
            icc = None
        elif mode in ("P", "PA"):
            has_alpha = mode == "PA" or "transparency" in img.info
            img = img.convert("RGBA" if has_alpha else "RGB")
            notes.append("palette image: written as full-colour PNG (a perturbation needs more colours than a palette)")
        elif mode in ("L", "RGB") and "transparency" in img.info:
            img = img.convert(mode + "A")
            notes.append("colour-key transparency (tRNS) kept as an alpha channel")
        elif mode == "1":
            img = img.convert("L")
            notes.append("1-bit image: written as 8-bit greyscale")
        elif mode not in ("L", "LA", "RGB", "RGBA"):
            img = img.convert("RGBA" if mode.endswith(("A", "a")) else "RGB")
            notes.append(f"{mode} converted to {img.mode}")
        arr = np.asarray(img)
        if img.mode in ("LA", "RGBA"):
            arr, alpha = arr[..., :-1], arr[..., -1]
            arr = arr[..., 0] if img.mode == "LA" else arr
    gray = arr.ndim == 2
    arr, alpha = _orient(arr, orientation), (None if alpha is None else _orient(alpha, orientation))
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        notes.append(f"EXIF orientation {orientation} applied")
    exif_out = None
    if len(exif):
        if GPS_IFD in exif:
            notes.append("GPS location removed from EXIF")
        exif.pop(GPS_IFD, None)
        exif.pop(ORIENTATION, None)
        exif_out = exif.tobytes() if len(exif) else None
    maxval = (1 << bit_depth) - 1
    rgb = np.repeat(arr[..., None], 3, axis=2) if gray else arr
    pixels = torch.from_numpy(np.ascontiguousarray(rgb).astype(np.float32) / maxval).permute(2, 0, 1).contiguous()
    return LoadedImage(name=name, pixels=pixels, bit_depth=bit_depth, gray=gray, alpha=alpha, icc_profile=icc,
                       exif=exif_out, source_mode=mode + (" (16-bit)" if depth16 else ""), notes=notes)


def _png_bit_depth(data: bytes) -> int | None:
    if data[:8] != b"\x89PNG\r\n\x1a\n" or len(data) < 26:
        return None
    return data[24]


def oriented_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image file as load_image() returns it (EXIF orientation applied), from its header
    alone (no pixels decoded)."""
    with Image.open(path) as img:
        swap = img.getexif().get(ORIENTATION, 1) in (5, 6, 7, 8)  # the orientations _orient transposes
        return (img.width, img.height) if swap else (img.height, img.width)


def _orient(a: np.ndarray, orientation: int) -> np.ndarray:
    """Apply EXIF orientation 1..8 to an [H,W(,C)] array (the transforms of PIL.ImageOps.exif_transpose)."""
    ops = {
        2: lambda x: x[:, ::-1],
        3: lambda x: x[::-1, ::-1],
        4: lambda x: x[::-1],
        5: lambda x: np.swapaxes(x, 0, 1),
        6: lambda x: np.swapaxes(x, 0, 1)[:, ::-1],
        7: lambda x: np.swapaxes(x, 0, 1)[::-1, ::-1],
        8: lambda x: np.swapaxes(x, 0, 1)[::-1],
    }
    return np.ascontiguousarray(ops[orientation](a)) if orientation in ops else a


# ---- writing --------------------------------------------------------------------------------------
def to_codes(pixels: torch.Tensor, source: LoadedImage) -> np.ndarray:
    """[3,H,W] in [0,1] -> integer array [H,W(,C)] in the source's layout and depth, alpha restored."""
    maxval = source.maxval
    dtype = np.uint16 if source.bit_depth == 16 else np.uint8
    arr = (pixels.detach().float().cpu().clamp(0, 1) * maxval).round().permute(1, 2, 0).numpy()
    arr = arr.mean(axis=2).round() if source.gray else arr
    arr = arr.astype(dtype)
    if source.alpha is not None:
        arr = np.dstack([arr, source.alpha.astype(dtype)])
    return arr


def save_png(pixels: torch.Tensor, source: LoadedImage, path: str | os.PathLike, manifest: dict | None = None,
             manifest_path: str | os.PathLike | None = None) -> Path:
    """Write pixels [3,H,W] losslessly as PNG at `path` (atomically), plus `manifest` as JSON beside it."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: protected images are written as .png only (JPEG/WebP would destroy the perturbation)")
    arr = to_codes(pixels, source)
    buf = io.BytesIO()
    if source.bit_depth == 16:
        _write_png16(buf, arr, source)
    else:
        img = Image.fromarray(arr, mode=source.output_mode)
        kwargs = {}
        if source.icc_profile:
            kwargs["icc_profile"] = source.icc_profile
        if source.exif:
            kwargs["exif"] = source.exif
        img.save(buf, format="PNG", **kwargs)
    files = [(path, buf.getvalue())]
    if manifest is not None:
        mpath = Path(manifest_path) if manifest_path else path.with_suffix(".json")
        files.append((mpath, (json.dumps(manifest, indent=2, default=_json_default) + "\n").encode()))
    write_together(files)
    return path


def _write_png16(buf: io.BytesIO, arr: np.ndarray, source: LoadedImage) -> None:
    planes = 1 if arr.ndim == 2 else arr.shape[2]
    h, w = arr.shape[:2]
    raw = io.BytesIO()
    png.Writer(w, h, greyscale=source.gray, alpha=source.alpha is not None, bitdepth=16).write(
        raw, arr.reshape(h, w * planes).tolist())
    chunks = list(png.Reader(bytes=raw.getvalue()).chunks())
    extra = []
    if source.icc_profile:
        extra.append((b"iCCP", b"icc\x00\x00" + zlib.compress(source.icc_profile)))
    if source.exif:
        exif = source.exif[6:] if source.exif.startswith(b"Exif\x00\x00") else source.exif
        extra.append((b"eXIf", exif))
    png.write_chunks(buf, chunks[:1] + extra + chunks[1:])  # after IHDR, before IDAT


def write_together(files: list[tuple[Path, bytes]]) -> None:
    """Write (path, bytes) pairs all or nothing: each into a temporary file beside its target, then all renamed into
    place (files they replace are set aside and put back on failure). On any error in the process (a full disk, a
    read-only folder, Ctrl-C) every temporary file and every target this call already renamed is removed before the
    error goes on: an image never lands without its manifest, and a rerun finds nothing half-written. (Not against a
    power cut: nothing is fsync'ed.)"""
    tag = f"{os.getpid()}-{threading.get_ident()}"
    tmps, placed, backups = [], [], []
    try:
        for path, data in files:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp{tag}")
            tmps.append(tmp)
            with open(tmp, "wb") as f:
                f.write(data)
        for path, _ in files:  # what is replaced is set aside first, and put back if anything fails
            path = Path(path)
            if path.exists():
                backup = path.with_name(f".{path.name}.old{tag}")
                os.replace(path, backup)
                backups.append((backup, path))
        for (path, _), tmp in zip(files, tmps):
            os.replace(tmp, path)
            placed.append(Path(path))
    except BaseException:
        for p in tmps + placed:
            p.unlink(missing_ok=True)
        for backup, path in backups:
            os.replace(backup, path)
        raise
    for backup, _ in backups:
        backup.unlink(missing_ok=True)


def _json_default(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
