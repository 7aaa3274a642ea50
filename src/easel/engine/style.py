"""Training-free style transfer by region colour statistics, for any model.

AdaIN-style transfer matches each channel's mean and spread to the reference's; on a picture of
a few flat colours that is a per-channel affine map, which can swap foreground and background
colours or collapse a channel that is constant in one picture. Here each picture's colours are
split into regions first, and the content's colours move along the line that joins its
background to its subject onto the reference's line:

1. regions: k-means over the picture's colours; the largest region is the background, the
   region whose colour lies farthest from it the subject;
2. each content pixel's colour is ``background + t × (subject − background) + r``: ``t`` its
   place along that line (clamped to 0..1, so anti-aliased edges fall between) and ``r`` what
   lies off the line (texture, shading, a third colour's difference);
3. it becomes the reference's ``background + t × (subject − background) + r``.

Background maps to background, subject to subject, edges to edges, and the layout stays the
content's own. The img2img pass that follows (engine.tasks.run_style) redraws the result as a
coherent picture in the model's hand.

Why pixels and not the VAE's latents: the same transfer on latent region means (tried first)
decodes to smeared colours and halos with the bundled model's autoencoder, whose latent space is
far from linear in colour: at equal settings 5 of 24 held-out cases came out in the reference's
colours against 20 of 48 with colours (docs/TRAINING-LOG.md, "Editing").

    restyled = transfer_look(content, reference, amount=1.0)   # a PIL image, content's size
"""

from __future__ import annotations

import numpy as np
from PIL import Image

REGIONS = 3  # background, subject, and the blend of the two along edges (or a third colour)
ITERATIONS = 12
CLUSTER_SIDE = 128  # colours are clustered on a copy at most this large (k-means cost)


def transfer_look(content: Image.Image, reference: Image.Image, amount: float) -> Image.Image:
    """``content`` recoloured ``amount`` (0..1) of the way onto the reference's background and
    subject colours (see the module docstring)."""
    pixels = np.asarray(content.convert("RGB"), dtype=np.float32)
    background_c, subject_c = palette(content)
    background_r, subject_r = palette(reference)
    axis = subject_c - background_c
    offset = pixels - background_c
    t = np.clip(offset @ axis / max(float(axis @ axis), 1e-6), 0.0, 1.0)[..., None]
    rest = offset - t * axis
    mapped = background_r + t * (subject_r - background_r) + rest
    moved = pixels + amount * (mapped - pixels)
    return Image.fromarray(np.clip(moved, 0, 255).round().astype(np.uint8), "RGB")


def palette(image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """The background colour (the largest colour region) and the subject colour (the region
    farthest from it) of ``image``, as RGB floats; both the same for a one-colour picture."""
    small = image.convert("RGB")
    small.thumbnail((CLUSTER_SIDE, CLUSTER_SIDE), Image.Resampling.BOX)
    colours = np.asarray(small, dtype=np.float32).reshape(-1, 3)
    labels, centres = kmeans(colours, REGIONS)
    counts = np.bincount(labels, minlength=REGIONS)
    background = int(counts.argmax())
    distance = np.linalg.norm(centres - centres[background], axis=1)
    distance[counts == 0] = -1.0  # an empty region is never the subject
    return centres[background], centres[int(distance.argmax())]


def kmeans(points: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels (N,) and centres (k, C) of ``points`` (N, C); deterministic: the centres start
    at quantiles along the first principal axis."""
    centred = points - points.mean(0)
    axis = np.linalg.svd(centred, full_matrices=False)[2][0]
    order = np.argsort(centred @ axis, kind="stable")
    centres = points[order[((np.arange(k) + 0.5) * len(points) / k).astype(int)]].copy()
    labels = np.zeros(len(points), dtype=np.int64)
    for _ in range(ITERATIONS):
        labels = ((points[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
        for j in range(k):
            members = points[labels == j]
            if len(members):
                centres[j] = members.mean(0)
    return labels, centres
