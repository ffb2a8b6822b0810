"""How an image becomes what a model sees: the attacker's centre square (torchvision's Resize then CenterCrop, as
diffusers' DreamBooth example does) and the resize arithmetic it shares with protect()'s canvases. A leaf module:
it imports nothing of this package, so everything may import it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_ASPECT = 4  # canvases longer than this many short sides are squeezed to it (compute grows with the area)


def resize(x: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)


def resized_sides(h: int, w: int, size: int) -> tuple[int, int]:
    """(h, w) after torchvision's Resize(size): the short side to `size`, the long one truncated to keep the aspect."""
    if h <= w:
        return size, max(size, int(size * w / h))
    return max(size, int(size * h / w)), size


def crop_offset(n: int, size: int) -> int:
    return int(round((n - size) / 2.0))  # torchvision's CenterCrop


def center_square(x: torch.Tensor, size: int) -> torch.Tensor:
    """[3,H,W] in [0,1] -> [3,size,size]: what diffusers' DreamBooth example trains on, torchvision's Resize(size)
    then CenterCrop(size) (bilinear, antialiased, as Resize does on a PIL image). A photo longer than MAX_ASPECT
    short sides is first cut to its middle MAX_ASPECT (the square is there; resizing all of it could take gigabytes)."""
    h, w = x.shape[-2:]
    if max(h, w) > MAX_ASPECT * min(h, w):
        keep = MAX_ASPECT * min(h, w)
        x = x[:, (h - keep) // 2 : (h - keep) // 2 + keep, :] if h > w else x[:, :, (w - keep) // 2 : (w - keep) // 2 + keep]
        h, w = x.shape[-2:]
    nh, nw = resized_sides(h, w, size)
    x = resize(x[None].float(), (nh, nw), mode="bilinear")[0]
    top, left = crop_offset(nh, size), crop_offset(nw, size)
    return x[:, top : top + size, left : left + size].clamp(0, 1)
