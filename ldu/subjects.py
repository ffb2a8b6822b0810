"""The built-in subjects: what a person would upload, plus views of the same subject that an attack never trains on.

Three subjects are drawn by this code, in many poses, scales, backgrounds and lights: a robot, a frog mascot and a
kite. None of them is ever in the pocket backbone's training data. Two come from scikit-image photos that are held
out of that data too: chelsea the cat and the coffee cup. For those, the training views are crops of the photo's
left part and the held-out views crops of its right part, so no held-out view shares a source pixel with a
training view (`boxes` says where each crop came from; a test checks the regions never meet).

    views, boxes = subject_views("robot", "train", 4, seed=0)      # uint8 [4, 64, 64, 3]
    python -m ldu.subjects --out assets/examples             # the app's examples (128 px, seed 0)

Every view is a pure function of (subject, split, index, seed), so the protocol's seeds give other views, and the
same seed the same views on any machine.
"""

from __future__ import annotations

import argparse
import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .pocket.data import photo

SPLITS = ("train", "held_out")
RENDER = 4  # drawn at this many times the output size, then downsampled (antialiasing)


@dataclass(frozen=True)
class Subject:
    name: str
    noun: str  # the class noun of the instance prompt ("a photo of sks robot")
    source: str  # where its views come from, in words
    photo: str | None = None  # scikit-image photo name, for photo subjects
    split_at: float = 0.5  # photo subjects: training views left of this fraction of the width, held-out views right

    @property
    def instance_prompt(self) -> str:
        return f"a photo of sks {self.noun}"

    @property
    def class_prompt(self) -> str:
        return f"a photo of a {self.noun}"

    def describe(self) -> dict:
        return {"name": self.name, "instance_prompt": self.instance_prompt, "class_noun": self.noun,
                "class_prompt": self.class_prompt, "source": self.source}


SUBJECTS = {s.name: s for s in (
    Subject("robot", "robot", "drawn by ldu.subjects: a teal robot with yellow eyes and a red antenna, in "
            "random poses, sizes, backgrounds and lights"),
    Subject("frog", "frog", "drawn by ldu.subjects: a lime-green frog mascot with pink cheeks, in random "
            "poses, sizes, backgrounds and lights"),
    Subject("kite", "kite", "drawn by ldu.subjects: an orange-and-blue diamond kite with a bow tail, in "
            "random angles, sizes, backgrounds and lights"),
    Subject("chelsea", "cat", "scikit-image's chelsea (CC0, Stefan van der Walt): training views are crops of the "
            "left 50 % of the photo, held-out views crops of the right 50 %", photo="chelsea"),
    Subject("coffee", "cup", "scikit-image's coffee (CC0, Rachel Michetti): training views are crops of the left "
            "50 % of the photo, held-out views crops of the right 50 %", photo="coffee"),
)}


def get_subject(name: str) -> Subject:
    if name not in SUBJECTS:
        raise ValueError(f"unknown subject {name!r} (built-in: {', '.join(SUBJECTS)})")
    return SUBJECTS[name]


def _rng(subject: str, split: str, index: int, seed: int) -> np.random.Generator:
    return np.random.default_rng([zlib.crc32(subject.encode()), SPLITS.index(split), index, seed])


def subject_views(name: str, split: str, n: int, seed: int = 0, size: int = 64) -> tuple[np.ndarray, list]:
    """n views [n,size,size,3] uint8 of a built-in subject, and where each came from: for photo subjects the crop
    box (left, top, right, bottom) in the photo's pixels, for drawn subjects None (each view is its own drawing)."""
    s = get_subject(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    out, boxes = [], []
    for i in range(n):
        rng = _rng(name, split, i, seed)
        if s.photo:
            img, box = _photo_view(rng, s, split, size)
        else:
            img, box = DRAW[name](rng, size), None
        out.append(img)
        boxes.append(box)
    return np.stack(out), boxes


# ---- photo subjects -------------------------------------------------------------------------------------------
def _photo_view(rng: np.random.Generator, s: Subject, split: str, size: int):
    a = photo(s.photo)
    h, w = a.shape[:2]
    cut = int(round(w * s.split_at))
    x0, x1 = (0, cut) if split == "train" else (cut, w)  # the two regions share no column
    side = int(min(h, x1 - x0) * rng.uniform(0.6, 1.0))
    left, top = x0 + int(rng.integers(0, x1 - x0 - side + 1)), int(rng.integers(0, h - side + 1))
    img = Image.fromarray(a[top : top + side, left : left + side]).resize((size, size), Image.LANCZOS)
    out = np.asarray(img, dtype=np.float32)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    out = out * rng.uniform(0.9, 1.1) + rng.uniform(-8, 8)
    return np.clip(out, 0, 255).astype(np.uint8), (left, top, left + side, top + side)


# ---- drawn subjects ---------------------------------------------------------------------------------------------
PALETTE = [(214, 204, 186), (120, 132, 140), (60, 64, 78), (170, 190, 160), (190, 160, 140), (230, 230, 225),
           (95, 80, 70), (150, 170, 200), (200, 190, 120), (110, 120, 95), (40, 40, 40), (240, 215, 200)]


def _background(rng: np.random.Generator, S: int) -> Image.Image:
    """A plain, gradient, two-tone (ground and wall) or mottled background in muted colours."""
    c1 = np.array(PALETTE[rng.integers(len(PALETTE))], np.float32)
    c2 = np.array(PALETTE[rng.integers(len(PALETTE))], np.float32)
    kind = rng.integers(4)
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) / (S - 1)
    if kind == 0:
        t = np.zeros_like(yy)
    elif kind == 1:
        angle = rng.uniform(0, 2 * math.pi)
        t = (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)) + 0.5
    elif kind == 2:
        horizon = rng.uniform(0.5, 0.8)
        t = (yy > horizon).astype(np.float32)
    else:
        small = rng.random((6, 6)).astype(np.float32)
        t = np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((S, S), Image.BICUBIC), np.float32) / 255
    img = c1 * (1 - t[..., None]) + c2 * t[..., None]
    img += rng.normal(0, 4, img.shape)  # a little grain
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _light(img: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """Global light: brightness and colour temperature, plus a soft vignette from a random side."""
    a = np.asarray(img, np.float32)
    gain = rng.uniform(0.75, 1.15) * np.array([rng.uniform(0.92, 1.08), 1.0, rng.uniform(0.92, 1.08)], np.float32)
    S = a.shape[0]
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) / (S - 1)
    angle = rng.uniform(0, 2 * math.pi)
    shade = 1 - rng.uniform(0, 0.25) * ((np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)) + 0.5)
    return np.clip(a * gain * shade[..., None], 0, 255)


def _finish(canvas: Image.Image, rng: np.random.Generator, size: int) -> np.ndarray:
    a = _light(canvas, rng)
    img = Image.fromarray(a.astype(np.uint8)).resize((size, size), Image.LANCZOS)
    return np.asarray(img, np.uint8)


def _rotated(points, angle: float, cx: float, cy: float):
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points]


def _box(cx, cy, w, h):
    return [(cx - w / 2, cy - h / 2), (cx + w / 2, cy - h / 2), (cx + w / 2, cy + h / 2), (cx - w / 2, cy + h / 2)]


def _layer(S: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    layer = Image.new("RGBA", (S, S), (0, 0, 0, 0))
    return layer, ImageDraw.Draw(layer)


def _place(rng: np.random.Generator, S: int, layer: Image.Image, scale_range=(0.55, 0.9), tilt=0.3) -> Image.Image:
    """The subject (drawn centred on a transparent layer of side S) scaled, rotated, flipped, moved and pasted on a
    background with a soft shadow."""
    scale = rng.uniform(*scale_range)
    layer = layer.rotate(math.degrees(rng.uniform(-tilt, tilt)), resample=Image.BICUBIC)
    if rng.random() < 0.5:
        layer = layer.transpose(Image.FLIP_LEFT_RIGHT)
    side = int(S * scale)
    layer = layer.resize((side, side), Image.LANCZOS)
    bg = _background(rng, S)
    free = S - side
    x, y = int(rng.integers(0, free + 1)), int(rng.integers(0, free + 1))
    shadow = Image.new("L", (S, S), 0)
    ImageDraw.Draw(shadow).ellipse([x + side * 0.15, y + side * 0.86, x + side * 0.85, y + side * 1.0], fill=90)
    shadow = shadow.filter(ImageFilter.GaussianBlur(S / 40))
    bg = Image.composite(Image.new("RGB", (S, S), (20, 20, 20)), bg, shadow)
    bg.paste(layer, (x, y), layer)
    return bg


def draw_robot(rng: np.random.Generator, size: int) -> np.ndarray:
    S = size * RENDER
    layer, d = _layer(S)
    teal, grey, yellow, red, dark = (20, 150, 160, 255), (205, 212, 218, 255), (250, 205, 30, 255), (225, 40, 40, 255), (45, 50, 60, 255)
    u = S / 100
    cx = S / 2
    # legs, body, chest light
    for dx in (-12, 8):
        d.rectangle([cx + dx * u, 70 * u, cx + (dx + 5) * u, 90 * u], fill=dark)
    d.rounded_rectangle([cx - 20 * u, 42 * u, cx + 20 * u, 74 * u], radius=5 * u, fill=teal)
    d.rectangle([cx - 5 * u, 50 * u, cx + 5 * u, 58 * u], fill=yellow)
    # arms at random angles, with grey hands
    for side in (-1, 1):
        angle = rng.uniform(-1.2, 1.0)
        sx, sy = cx + side * 20 * u, 47 * u
        ex, ey = sx + side * 18 * u * math.cos(angle), sy + 18 * u * math.sin(angle)
        d.line([(sx, sy), (ex, ey)], fill=teal, width=int(6 * u))
        d.ellipse([ex - 4 * u, ey - 4 * u, ex + 4 * u, ey + 4 * u], fill=grey)
    # head, tilted: eyes with pupils looking one way, a mouth grille, an antenna with a red ball
    tilt = rng.uniform(-0.25, 0.25)
    hx, hy = cx, 28 * u
    d.polygon(_rotated(_box(hx, hy, 34 * u, 24 * u), tilt, hx, hy), fill=grey)
    look = rng.uniform(-1.5, 1.5) * u
    for dx in (-8, 8):
        ex, ey = _rotated([(hx + dx * u, hy - 2 * u)], tilt, hx, hy)[0]
        d.ellipse([ex - 6 * u, ey - 6 * u, ex + 6 * u, ey + 6 * u], fill=yellow)
        d.ellipse([ex - 2.5 * u + look, ey - 2.5 * u, ex + 2.5 * u + look, ey + 2.5 * u], fill=dark)
    d.polygon(_rotated(_box(hx, hy + 8 * u, 14 * u, 3.5 * u), tilt, hx, hy), fill=dark)
    (ax, ay), (bx, by) = _rotated([(hx, hy - 12 * u), (hx, hy - 21 * u)], tilt, hx, hy)
    d.line([(ax, ay), (bx, by)], fill=dark, width=int(2 * u))
    d.ellipse([bx - 4 * u, by - 4 * u, bx + 4 * u, by + 4 * u], fill=red)
    return _finish(_place(rng, S, layer), rng, size)


def draw_frog(rng: np.random.Generator, size: int) -> np.ndarray:
    S = size * RENDER
    layer, d = _layer(S)
    green, light, white, dark, pink = (110, 200, 50, 255), (190, 235, 120, 255), (250, 250, 250, 255), (30, 40, 30, 255), (255, 130, 170, 255)
    u = S / 100
    cx = S / 2
    squash = rng.uniform(0.85, 1.15)
    # body and belly
    d.ellipse([cx - 30 * u, 45 * u, cx + 30 * u, (45 + 45 * squash) * u], fill=green)
    d.ellipse([cx - 17 * u, 55 * u, cx + 17 * u, (52 + 36 * squash) * u], fill=light)
    # feet
    for dx in (-1, 1):
        d.ellipse([cx + dx * 28 * u - 9 * u, 84 * u, cx + dx * 28 * u + 9 * u, 94 * u], fill=green)
    # head with eye bumps, pupils, cheeks and a wide smile
    d.ellipse([cx - 34 * u, 22 * u, cx + 34 * u, 62 * u], fill=green)
    look = rng.uniform(-2, 2) * u, rng.uniform(-2, 2) * u
    for dx in (-17, 17):
        ex, ey = cx + dx * u, 22 * u
        d.ellipse([ex - 12 * u, ey - 12 * u, ex + 12 * u, ey + 12 * u], fill=green)
        d.ellipse([ex - 9 * u, ey - 9 * u, ex + 9 * u, ey + 9 * u], fill=white)
        d.ellipse([ex - 4 * u + look[0], ey - 4 * u + look[1], ex + 4 * u + look[0], ey + 4 * u + look[1]], fill=dark)
        d.ellipse([cx + dx * 1.35 * u - 6 * u, 43 * u, cx + dx * 1.35 * u + 6 * u, 50 * u], fill=pink)
    open_mouth = rng.uniform(6, 14)
    d.arc([cx - 18 * u, (40 - open_mouth / 2) * u, cx + 18 * u, (44 + open_mouth / 2) * u], 20, 160, fill=dark, width=int(2.5 * u))
    return _finish(_place(rng, S, layer, tilt=0.4), rng, size)


def draw_kite(rng: np.random.Generator, size: int) -> np.ndarray:
    S = size * RENDER
    layer, d = _layer(S)
    orange, blue, dark = (250, 130, 20, 255), (30, 70, 200, 255), (40, 30, 20, 255)
    bows = [(230, 30, 40, 255), (250, 220, 40, 255)]
    u = S / 100
    top, left, right, bottom, mid = (50 * u, 8 * u), (28 * u, 36 * u), (72 * u, 36 * u), (50 * u, 74 * u), (50 * u, 36 * u)
    for k, tri in enumerate([(top, left, mid), (top, right, mid), (left, bottom, mid), (right, bottom, mid)]):
        d.polygon(tri, fill=orange if k in (0, 3) else blue)
    d.line([top, bottom], fill=dark, width=int(1.5 * u))
    d.line([left, right], fill=dark, width=int(1.5 * u))
    # a wavy tail with alternating bows
    phase, amp = rng.uniform(0, 2 * math.pi), rng.uniform(3, 8)
    pts = [(50 * u + amp * u * math.sin(phase + k * 0.5), (74 + 3 * k) * u) for k in range(9)]
    d.line(pts, fill=dark, width=int(1 * u))
    for k, (x, y) in enumerate(pts[2::2]):
        c = bows[k % 2]
        d.polygon([(x - 5 * u, y - 3 * u), (x, y), (x - 5 * u, y + 3 * u)], fill=c)
        d.polygon([(x + 5 * u, y - 3 * u), (x, y), (x + 5 * u, y + 3 * u)], fill=c)
    return _finish(_place(rng, S, layer, tilt=0.6), rng, size)


DRAW = {"robot": draw_robot, "frog": draw_frog, "kite": draw_kite}


# ---- the app's examples -----------------------------------------------------------------------------------------
EXAMPLE_COUNTS = {"train": 4, "held_out": 8}
EXAMPLE_SIZE = 128


def write_examples(out: Path, size: int = EXAMPLE_SIZE, seed: int = 0) -> None:
    """assets/examples/<subject>/{train,held_out}/*.png and subject.json: the views of `seed` at `size` px."""
    for name, s in SUBJECTS.items():
        folder = out / name
        record = {**s.describe(), "seed": seed, "size": size}
        for split, n in EXAMPLE_COUNTS.items():
            (folder / split).mkdir(parents=True, exist_ok=True)
            for old in (folder / split).glob("*.png"):
                old.unlink()
            views, boxes = subject_views(name, split, n, seed=seed, size=size)
            for i, v in enumerate(views):
                Image.fromarray(v).save(folder / split / f"{name}-{split}-{i}.png")
            record[split] = {"views": n, "boxes": boxes if s.photo else None}
        (folder / "subject.json").write_text(json.dumps(record, indent=2) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ldu.subjects", description="write the built-in subjects' example views")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "assets" / "examples")
    ap.add_argument("--size", type=int, default=EXAMPLE_SIZE)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    write_examples(args.out, args.size, args.seed)
    print(f"wrote {', '.join(SUBJECTS)} to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
