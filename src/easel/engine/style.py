"""Training-free style transfer by region statistics in latent space, for any VAE model.

AdaIN-style transfer matches each latent channel's mean and spread to the reference's; on a
picture of a few flat colours that is a per-channel affine map, which can swap foreground and
background colours or collapse a channel that is constant in one picture. Here both latents are
split into regions first (k-means over latent vectors, regions ranked by area), and each region
of the content moves to the mean of the reference's region of the same rank: the largest area
(the background) takes the reference's background, the next its main object, and so on. The
layout is the content's own; the colours are the reference's. The img2img pass that follows
(engine.tasks.run_style) redraws the seams as a coherent picture.

    moved = transfer_look(pipe.vae, content, reference, amount=1.0)   # a PIL image
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

REGIONS = 3  # background, object, and the blend of the two along edges
ITERATIONS = 12


@torch.no_grad()
def transfer_look(
    vae: Any, content: Image.Image, reference: Image.Image, amount: float
) -> Image.Image:
    """``content`` with each of its regions' latent mean moved ``amount`` (0..1) of the way to
    the mean of the reference region of the same area rank; decoded back to pixels."""
    z_content, z_reference = _encode(vae, content), _encode(vae, reference)
    channels = z_content.shape[0]
    x_content = z_content.reshape(channels, -1).T
    x_reference = z_reference.reshape(channels, -1).T
    labels_c, means_c = kmeans(x_content, REGIONS)
    labels_r, means_r = kmeans(x_reference, REGIONS)
    rank_c = torch.argsort(torch.bincount(labels_c, minlength=REGIONS), descending=True)
    rank_r = torch.argsort(torch.bincount(labels_r, minlength=REGIONS), descending=True)
    shift = torch.zeros_like(means_c)
    shift[rank_c] = means_r[rank_r] - means_c[rank_c]
    moved = x_content + amount * shift[labels_c]
    return _decode(vae, moved.T.reshape(z_content.shape))


def kmeans(points: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (N,) and centres (k, C) of ``points`` (N, C); deterministic: the centres start
    at quantiles along the first principal axis."""
    centred = points - points.mean(0)
    axis = torch.linalg.svd(centred, full_matrices=False).Vh[0]
    order = torch.argsort(centred @ axis)
    starts = order[((torch.arange(k) + 0.5) * len(points) / k).long()]
    centres = points[starts].clone()
    labels = torch.zeros(len(points), dtype=torch.long)
    for _ in range(ITERATIONS):
        labels = torch.cdist(points, centres).argmin(1)
        for j in range(k):
            members = points[labels == j]
            if len(members):
                centres[j] = members.mean(0)
    return labels, centres


def _encode(vae: Any, image: Image.Image) -> torch.Tensor:
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1)
    batch = pixels.permute(2, 0, 1)[None].to(vae.device, vae.dtype)
    return vae.encode(batch).latent_dist.mean[0].float().cpu()


def _decode(vae: Any, latents: torch.Tensor) -> Image.Image:
    sample = vae.decode(latents[None].to(vae.device, vae.dtype)).sample[0].float().cpu()
    pixels = ((sample.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(pixels, "RGB")
