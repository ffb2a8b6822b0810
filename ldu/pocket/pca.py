"""A VAE encoder that is the principal-component projection of 4 x 4 RGB patches (issue 16, goal 1).

v2's trained encoder keeps less of a photo than a linear projection of the same size: 16 principal components of
4 x 4 patches, fit on the VAE's own training data, reconstruct the held-out photos at 32.5 dB and chelsea's eye
boxes at 26-27 dB, where the trained VAE reaches 28 and 20-21 (docs/RESULTS.md, "A linear encoder"). So with `vae_encoder
= "pca"` the encoder is not trained: `wire_encoder` sets diffusers' own `Encoder` to compute that projection
exactly, and only the decoder learns (a nonlinear decoder can do better than the projection's transpose).

How a stack of convolutions, GroupNorms and SiLUs computes a linear map, exactly:
- the two stride-2 convolutions move pixels into channels (space to depth), the last one applying the projection;
- every ResNet block is the identity (its last convolution is zero, so only the skip path remains);
- the final GroupNorm normalises each group by its own statistics; each group holds, besides its signals, channels
  at large constants +K and -K, so the statistics are K's: the mean is 0 (signals and constants come in +/- pairs)
  and the signals enter the variance only at (signal / K)^2, under 1e-5 here;
- SiLU(x) - SiLU(-x) = x for every x, so the +/- pairs pass the SiLU unchanged and the last convolution takes
  their difference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PATCH = 4  # the VAE's downsampling factor: two stride-2 convolutions
CONSTANT = 1000.0  # K: large against the signals, so the GroupNorm's statistics do not depend on the image


def patch_pca(images: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """images [N,3,H,W] (the VAE's [-1, 1]) -> (mean [48], components [48, channels]) of their 4 x 4 patches, the
    components orthonormal, largest variance first, each signed so that its largest entry is positive. A patch
    vector is ordered as `F.unfold` orders it: channel, then row, then column."""
    p = F.unfold(images.double(), PATCH, stride=PATCH).transpose(1, 2).reshape(-1, 3 * PATCH * PATCH)
    mean = p.mean(0)
    cov = (p - mean).T @ (p - mean) / len(p)
    _, vectors = torch.linalg.eigh(cov)  # ascending eigenvalues
    comps = vectors[:, -channels:].flip(-1)
    comps = comps * comps.gather(0, comps.abs().argmax(0, keepdim=True)).sign()
    return mean.float(), comps.float()


def project(images: torch.Tensor, mean: torch.Tensor, comps: torch.Tensor) -> torch.Tensor:
    """The projection itself, [N,3,H,W] -> [N,channels,H/4,W/4] (what the wired encoder's latent mean must equal)."""
    n, _, h, w = images.shape
    p = F.unfold(images, PATCH, stride=PATCH).transpose(1, 2)  # [N, L, 48]
    return ((p - mean) @ comps).transpose(1, 2).reshape(n, comps.shape[1], h // PATCH, w // PATCH)


def unproject(z: torch.Tensor, mean: torch.Tensor, comps: torch.Tensor) -> torch.Tensor:
    """`project`'s transpose, [N,channels,h,w] -> [N,3,4h,4w]: the best linear reconstruction from the components."""
    n, _, h, w = z.shape
    p = z.flatten(2).transpose(1, 2) @ comps.T + mean  # [N, L, 48]
    return F.fold(p.transpose(1, 2), (h * PATCH, w * PATCH), PATCH, stride=PATCH)


@torch.no_grad()
def wire_encoder(vae, mean: torch.Tensor, comps: torch.Tensor, logvar: float) -> None:
    """Set `vae`'s encoder and quant_conv (in place) so that vae.encode(x).latent_dist has mean `project(x, mean,
    comps)` and log-variance `logvar` everywhere. The decoder is left as it is."""
    enc, cfg = vae.encoder, vae.config
    channels, groups, widths = comps.shape[1], cfg.norm_num_groups, list(cfg.block_out_channels)
    per_group = widths[-1] // groups
    pairs = (per_group - 2 * channels // groups) // 2 if channels % groups == 0 else 0  # constant pairs per group
    if (len(widths) != 3 or cfg.layers_per_block != 1 or cfg.in_channels != 3 or channels != cfg.latent_channels
            or widths[0] < 12 or widths[1] != widths[2] or pairs < 1):
        raise ValueError(f"a PCA encoder needs 3 blocks of one layer (x4), 3 input channels, latent_channels = the "
                         f"components ({channels}), 12 channels in the first block, the last two equally wide and room "
                         f"in each of the last block's {groups} groups for {2 * channels // groups} signals and two "
                         f"constants; got "
                         f"block_out_channels={widths}, latent_channels={cfg.latent_channels}, groups={groups}")
    dev = enc.conv_in.weight.device  # the projection is fitted on the CPU; the VAE may already sit on a GPU
    mean, comps = mean.to(dev, enc.conv_in.weight.dtype), comps.to(dev, enc.conv_in.weight.dtype)
    for p in enc.parameters():
        p.zero_()
    for c in range(3):  # conv_in: the pixels themselves, in channels 0-2
        enc.conv_in.weight[c, c, 1, 1] = 1
    down = enc.down_blocks[0].downsamplers[0].conv  # 2 x 2 pixels -> 12 channels (c, dy, dx)
    for c in range(3):
        for dy in range(2):
            for dx in range(2):
                down.weight[c * 4 + dy * 2 + dx, c, dy, dx] = 1
    shortcut = enc.down_blocks[1].resnets[0].conv_shortcut  # the first block's 12 channels, carried (no shortcut:
    if shortcut is not None:                                  # the blocks are equally wide, the skip carries them)
        for c in range(12):
            shortcut.weight[c, c, 0, 0] = 1
    # The second stride-2 conv reads 2 x 2 of those: pixel (2 * dy2 + dy1, 2 * dx2 + dx1) of each 4 x 4 patch, whose
    # index in a patch vector is c * 16 + dy2 * 8 + dy1 * 4 + dx2 * 2 + dx1. Component k goes to channel plus[k] of
    # the last block (per group of channels: the group's components as +/- pairs, then constant pairs +K, -K).
    per = channels // groups
    plus = torch.tensor([g * per_group + 2 * i for g in range(groups) for i in range(per)], device=dev)
    constants = torch.tensor([g * per_group + 2 * per + 2 * j for g in range(groups) for j in range(pairs)], device=dev)
    taps = comps.view(3, 2, 2, 2, 2, channels).permute(5, 0, 2, 4, 1, 3).reshape(channels, 12, 2, 2)
    down = enc.down_blocks[1].downsamplers[0].conv
    down.weight[plus, :12, :2, :2], down.weight[plus + 1, :12, :2, :2] = taps, -taps
    down.bias[plus], down.bias[plus + 1] = -(mean @ comps), mean @ comps
    down.bias[constants], down.bias[constants + 1] = CONSTANT, -CONSTANT
    # The final GroupNorm: each group's mean is 0 and its deviation K sqrt(2 pairs / per_group), so weight = that
    # deviation gives each signal channel back unchanged (the constants' weights stay 0: they leave as 0).
    norm, out = enc.conv_norm_out, enc.conv_out
    norm.weight[plus] = norm.weight[plus + 1] = CONSTANT * math.sqrt(2 * pairs / per_group)
    k = torch.arange(channels, device=dev)
    out.weight[k, plus, 1, 1], out.weight[k, plus + 1, 1, 1] = 1.0, -1.0  # SiLU(s) - SiLU(-s) = s
    out.bias[channels:] = logvar
    vae.quant_conv.weight.zero_()
    vae.quant_conv.bias.zero_()
    for c in range(2 * channels):
        vae.quant_conv.weight[c, c, 0, 0] = 1
