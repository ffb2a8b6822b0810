"""Training data for the pocket backbone, made offline by this code: captioned procedural scenes and augmented
crops of scikit-image's bundled public-domain / CC0 photos.

Every batch is a pure function of (seed, step), so training can stop and resume anywhere and reproduce the
same data. The built-in subjects (ldu.subjects: chelsea the cat, the coffee cup and three drawn ones) never appear in
training: their views are the "photos of a subject" that personalization tests and demos protect. No LFW faces (their photos carry
no licence to redistribute derived weights).
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import zlib
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (240, 220, 40),
    "white": (245, 245, 245), "black": (15, 15, 15), "orange": (245, 140, 20), "purple": (140, 40, 180),
}
SHAPES = ("circle", "square", "triangle")
COUNTS = {1: "a", 2: "two", 3: "three"}

# scikit-image's bundled photos with an explicit public-domain / CC0 statement in their docstrings.
PHOTOS = {
    "astronaut": "a photo of an astronaut",
    "camera": "a black and white photo of a man with a camera",
    "rocket": "a photo of a rocket",
    "horse": "a drawing of a black horse",
    "hubble_deep_field": "a photo of galaxies in space",
    "retina": "a photo of a retina",
    "brick": "a black and white photo of a brick wall",
    "grass": "a black and white photo of grass",
    "gravel": "a black and white photo of gravel",
    "coins": "a black and white photo of coins",
    "immunohistochemistry": "a microscope photo of cells",
    "clock": "a black and white photo of a clock",
    "text": "a black and white photo of text",
}
HELD_OUT = {"chelsea": "a photo of a cat", "coffee": "a photo of a cup of coffee"}
PHOTO_FRACTION = 0.4

# Caption classes the quality check generates and classifies (chance: 1 in 8).
CHECK_CLASSES = (
    "a photo of an astronaut", "a photo of a rocket", "a photo of galaxies in space", "a photo of a retina",
    "a red circle on a white background", "a blue square on a yellow background",
    "a green triangle on a black background", "a white circle on a purple background",
)

# The built-in subjects' class nouns (ldu.pocket.subjects) are words of the vocabulary that no caption uses.
SUBJECT_NOUNS = ("robot", "frog", "kite", "cat", "cup")
WORDS = sorted({w for c in list(PHOTOS.values()) + list(HELD_OUT.values()) for w in c.split()}
               | set(COLOURS) | set(SHAPES) | {s + "s" for s in SHAPES} | set(COUNTS.values())
               | {"on", "background", "small", "large", "sks", "photo", "of", "a"} | set(SUBJECT_NOUNS))


@functools.lru_cache(maxsize=None)
def photo(name: str) -> np.ndarray:
    """An RGB uint8 array of a bundled scikit-image photo (grey and binary ones replicated to RGB)."""
    import skimage.data  # deferred: scikit-image is slow to import and only photo() reads it

    a = getattr(skimage.data, name)()
    if a.dtype == bool:
        a = np.where(a, 255, 0).astype(np.uint8)  # the horse: True is the background, so a black horse on white
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return np.ascontiguousarray(a[..., :3])


def crop(rng: np.random.Generator, a: np.ndarray, size: int = SIZE, min_scale: float = 0.3) -> np.ndarray:
    """A random square crop covering min_scale..1 of the short side, maybe mirrored, lightly colour-jittered."""
    h, w = a.shape[:2]
    side = int(min(h, w) * rng.uniform(min_scale, 1.0))
    top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    img = Image.fromarray(a[top : top + side, left : left + side]).resize((size, size), Image.BICUBIC)
    out = np.asarray(img, dtype=np.float32)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    out = out * rng.uniform(0.9, 1.1) + rng.uniform(-10, 10)
    return np.clip(out, 0, 255).astype(np.uint8)


def draw_shape(draw, shape: str, fill, r: float, cx: float, cy: float) -> None:
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def scene(rng: np.random.Generator, size: int = SIZE) -> tuple[np.ndarray, str]:
    """Coloured shapes on a plain background, with the caption that describes them."""
    names = list(COLOURS)
    bg = names[rng.integers(len(names))]
    fg = names[rng.integers(len(names))]
    while fg == bg:
        fg = names[rng.integers(len(names))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    count = int(rng.choice([1, 1, 1, 2, 3]))
    large = count == 1 and rng.random() < 0.5
    img = Image.new("RGB", (size, size), COLOURS[bg])
    draw = ImageDraw.Draw(img)
    for _ in range(count):
        r = rng.uniform(0.28, 0.4) * size if large else rng.uniform(0.1, 0.18) * size
        draw_shape(draw, shape, COLOURS[fg], r, rng.uniform(r, size - r), rng.uniform(r, size - r))
    noun = shape if count == 1 else shape + "s"
    size_word = ("large " if large else "small ") if count == 1 and rng.random() < 0.5 else ""
    return np.asarray(img), f"{COUNTS[count]} {size_word}{fg} {noun} on a {bg} background"


def colour_field(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """Saturated colour without structure, for the VAE: a flat colour, a linear gradient in each channel (any
    direction, any slope up to the full range), or a few soft blobs of pure colour on a flat one."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    kind = rng.integers(3)
    if kind == 0:
        out = np.broadcast_to(rng.choice([0, 255, rng.uniform(0, 255)], size=3).astype(np.float32), (size, size, 3))
    elif kind == 1:
        out = np.stack([rng.uniform(-255, 255) * xx + rng.uniform(-255, 255) * yy + rng.uniform(0, 255) for _ in range(3)], -1)
    else:
        out = np.broadcast_to(rng.uniform(0, 255, 3).astype(np.float32), (size, size, 3)).copy()
        for _ in range(int(rng.integers(1, 4))):
            cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.1, 0.4)
            w = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
            out = out * (1 - w) + rng.choice([0, 255], size=3) * w
    return np.clip(out, 0, 255).round().astype(np.uint8)


def texture(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """Random colour texture, for the VAE: coloured noise summed over scales with a random spectral slope (from fine
    grain to soft clouds), a sinusoidal grating in two colours, or random cells of colour. A generic autoencoder
    must keep any local detail, and the few bundled photos (half of them grey) show too little of it."""
    kind = rng.integers(3)
    if kind == 0:
        slope = rng.uniform(0.0, 2.0)
        out = np.zeros((size, size, 3), np.float32)
        side = 2
        while side <= size:
            layer = rng.normal(0, 1, (side, side, 3)).astype(np.float32)
            up = np.asarray(Image.fromarray(((layer * 40) + 128).clip(0, 255).astype(np.uint8)).resize((size, size), Image.BICUBIC),
                            np.float32) - 128
            out += up * (side / size) ** (slope / 2)
            side *= 2
        out = (out - out.mean((0, 1))) / (out.std((0, 1)) + 1e-6) * rng.uniform(20, 70, 3) + rng.uniform(40, 215, 3)
    elif kind == 1:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        angle, period = rng.uniform(0, np.pi), rng.uniform(2.5, size / 2)
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * (np.cos(angle) * xx + np.sin(angle) * yy) / period + rng.uniform(0, 2 * np.pi))
        a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        out = a * wave[..., None] + b * (1 - wave[..., None]) + rng.normal(0, rng.uniform(0, 12), (size, size, 3))
    else:
        n = int(rng.integers(4, 40))
        points, colours = rng.uniform(0, size, (n, 2)), rng.uniform(0, 255, (n, 3))
        yy, xx = np.mgrid[0:size, 0:size]
        nearest = np.argmin((yy[..., None] - points[:, 0]) ** 2 + (xx[..., None] - points[:, 1]) ** 2, axis=-1)
        out = colours[nearest] + rng.normal(0, rng.uniform(0, 10), (size, size, 3))
    return np.clip(out, 0, 255).round().astype(np.uint8)


def recolour(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """A photo in other colours, for the VAE: channels permuted and mixed, or (a grey photo) tinted between two
    random colours. The same structures, in colours the bundled photos lack."""
    a = img.astype(np.float32)
    if np.ptp(a.mean(2) - a[..., 0]) < 1 and np.ptp(a[..., 1] - a[..., 2]) < 1:  # grey: map luminance to two colours
        t = a[..., :1] / 255
        out = rng.uniform(0, 120, 3) * (1 - t) + rng.uniform(135, 255, 3) * t
    else:
        mix = np.eye(3)[rng.permutation(3)] * rng.uniform(0.6, 1.0) + rng.uniform(-0.2, 0.4, (3, 3)) * rng.uniform(0, 1)
        out = a @ mix.T.astype(np.float32)
        out = (out - out.min()) / max(1e-6, np.ptp(out)) * rng.uniform(180, 255) + rng.uniform(0, 40)
    return np.clip(out, 0, 255).round().astype(np.uint8)


def batch(seed: int, step: int, n: int, size: int = SIZE, photo_fraction: float = PHOTO_FRACTION,
          field_fraction: float = 0.0, texture_fraction: float = 0.0,
          recolour_fraction: float = 0.0) -> tuple[np.ndarray, list[str]]:
    """n training images [n,size,size,3] uint8 and captions: a pure function of (seed, step). For the VAE only
    (their captions are empty or wrong): a `field_fraction` of colour fields, a `texture_fraction` of random
    textures, and a `recolour_fraction` of the photos recoloured."""
    rng = np.random.default_rng([seed, step])
    images, captions = [], []
    names = list(PHOTOS)
    for _ in range(n):
        if field_fraction and rng.random() < field_fraction:
            images.append(colour_field(rng, size))
            captions.append("")
        elif texture_fraction and rng.random() < texture_fraction:
            images.append(texture(rng, size))
            captions.append("")
        elif rng.random() < photo_fraction:
            name = names[rng.integers(len(names))]
            images.append(crop(rng, photo(name), size))
            if recolour_fraction and rng.random() < recolour_fraction:
                images[-1] = recolour(rng, images[-1])
            captions.append(PHOTOS[name])
        else:
            img, cap = scene(rng, size)
            images.append(img)
            captions.append(cap)
    return np.stack(images), captions


def _batch(args: tuple) -> tuple[np.ndarray, list[str]]:
    seed, step, n, photo_fraction, extra = args
    return batch(seed, step, n, photo_fraction=photo_fraction, **extra)


def pool(seed: int, batches: int, n: int, photo_fraction: float = PHOTO_FRACTION,
         workers: int | None = None, **extra) -> tuple[np.ndarray, list[str]]:
    """batch(seed, i, n) for i < batches, concatenated: images [batches*n, SIZE, SIZE, 3] uint8 and captions, made
    in parallel processes. The same result for any number of workers (each batch is a pure function of (seed, i))."""
    jobs = [(seed, i, n, photo_fraction, extra) for i in range(batches)]
    workers = workers or os.cpu_count() or 1
    if workers == 1 or batches < 4 * workers:
        parts = [_batch(j) for j in jobs]
    else:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as ex:
            parts = list(ex.map(_batch, jobs, chunksize=max(1, batches // (8 * workers))))
    return np.concatenate([p[0] for p in parts]), [c for p in parts for c in p[1]]


def class_examples(caption: str, n: int, seed: int = 12345, size: int = SIZE) -> np.ndarray:
    """n real images of one check class (photo crops, or scenes drawn until n match the caption)."""
    rng = np.random.default_rng([seed, zlib.crc32(caption.encode())])  # str hash() differs per process
    for name, cap in {**PHOTOS, **HELD_OUT}.items():
        if cap == caption:
            return np.stack([crop(rng, photo(name), size) for _ in range(n)])
    words = caption.split()
    fg, shape, bg = words[1], words[2], words[-2]
    out = []
    while len(out) < n:  # one large or small shape of these colours
        img = Image.new("RGB", (size, size), COLOURS[bg])
        r = rng.uniform(0.1, 0.4) * size
        draw_shape(ImageDraw.Draw(img), shape, COLOURS[fg], r, rng.uniform(r, size - r), rng.uniform(r, size - r))
        out.append(np.asarray(img))
    return np.stack(out)
