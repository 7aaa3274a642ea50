"""Pipeline calls over several images that give each image the pixels of a call of its own.

A batched pipeline call stacks its images along the batch dimension. Mathematically every image
is computed alone; numerically some kernels pick their algorithm by the batch size and then
round differently (measured on the CPU, 2026-12-06): MKL's float32 GEMM and oneDNN's bfloat16
GEMM accumulate differently for different row counts (a timestep embedding of 2 rows against
4, a feed-forward layer of 32 rows against 64), PyTorch runs a float32 convolution of one
small image natively but of several through oneDNN, and on several threads a channels-last
GroupNorm of a large feature map (32x32 and up) shares out the batch's pixels among the
threads, so where one image's sums are split depends on the batch. The differences are ~1e-5
and move pixels by up to 8 levels after a few steps.

`solo_shapes` removes those causes. Inside it:

- every ``Linear`` multiplies each image's rows as a matrix of its own, of the solo call's
  shape: the image's (unconditional, conditional) pair under classifier-free guidance, in the
  solo call's order, else the image alone (one GEMM per image: a batched GEMM, ``bmm``, is no
  substitute, as oneDNN blocks its bfloat16 matrices by the batch too);
- every ``GroupNorm`` likewise normalises each image's rows (its pair's) as a call of its own;
- where a solo call has one image per denoiser call (no guidance, or after ``guidance_end``),
  every float32 ``Conv2d`` runs image by image, as the solo call's batch of one does;
- the VAE decodes image by image.

Everything else (the other normalisations, attention, the other convolutions, activations, the
scheduler) computes each image from its own numbers, whatever the batch size: the batch's
pixels equal the solo calls' exactly, which tests/engine/test_batching.py checks for every
family, in bfloat16 and float32, on whatever machine runs the tests. That is an observed
property of the kernels, not a promise of theirs: a new CPU or library version could break it,
and the tests would say so. What stays batched is the rest: one text-encoder call, one
scheduler step and one pass of Python through the denoiser for all images.

    with solo_shapes(pipe, rows=3):
        images = pipe(prompt=[a, b, c], generator=[g1, g2, g3]).images
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name

from easel.models.cpu_graph import graph_variant


@contextmanager
def solo_shapes(pipe: Any, rows: int) -> Iterator[None]:
    """Within the block, a call of ``pipe`` over ``rows`` images computes each image as a call
    of one image would (see the module docstring). ``rows`` 1 changes nothing."""
    if rows <= 1:
        yield
        return
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    patched: list[tuple[torch.nn.Module, Any]] = []
    vae: Any = getattr(pipe, "vae", None)
    slicing = getattr(vae, "use_slicing", None)
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    try:
        for module in {id(m): m for c in modules for m in c.modules()}.values():
            own = vars(module).get("forward")  # an instance's own forward, if any
            forward: Callable[..., torch.Tensor]
            if type(module) is torch.nn.Linear and own is None:
                forward = _linear(module, rows)
            elif isinstance(module, torch.nn.Linear | torch.nn.GroupNorm) or _solo_kernel(module):
                pairs = not isinstance(module, torch.nn.Conv2d)
                forward = _slices(own or module.forward, rows, pairs)
            else:
                continue
            module.forward = forward  # type: ignore[method-assign, assignment]
            patched.append((module, own))
        if slicing is not None:
            vae.use_slicing = True  # one image at a time through the decoder, as alone
        with graph_variant(denoiser, ("solo_shapes", rows)):
            yield
    finally:
        for module, own in patched:
            if own is None:
                del module.forward
            else:
                module.forward = own  # type: ignore[method-assign]
        if slicing is not None:
            vae.use_slicing = slicing


def _solo_kernel(module: torch.nn.Module) -> bool:
    """Whether a convolution's kernel may differ between one image and several: PyTorch runs a
    float32 convolution of a batch of one small image with its own kernel and a larger batch
    with oneDNN; other dtypes (bfloat16, float16) take one kernel at every batch size, and
    batches of 2 and more agree in every dtype (measured)."""
    return isinstance(module, torch.nn.Conv2d) and module.weight.dtype == torch.float32


def _linear(module: torch.nn.Linear, rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module``'s forward over a batch of ``rows`` images: each image's rows (its guidance
    pair's, under classifier-free guidance) multiplied as a matrix of their own, the matrix a
    solo call's ``F.linear`` gets, without copying the batch apart."""
    slices = _slices(module.forward, rows, pairs=True)

    def forward(x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0] if x.ndim > 1 else 0
        if batch not in (rows, 2 * rows) or not x.is_contiguous():
            return slices(x)  # a laid-out view keeps its own path (or it is no image batch)
        k = module.in_features
        if batch == rows:  # (rows, ..., k) -> rows matrices of (..., k)
            mats = x.reshape(rows, -1, k)
        else:  # (unconditional halves, conditional halves) -> one (2 x ..., k) per image
            mats = x.reshape(2, rows, -1, k).transpose(0, 1).reshape(rows, -1, k)
        # one GEMM per image: a batched GEMM (bmm) may block differently (bfloat16 does)
        out = torch.stack([F.linear(m, module.weight, module.bias) for m in mats])
        if batch == 2 * rows:
            out = out.reshape(rows, 2, -1, module.out_features).transpose(0, 1)
        return out.reshape(*x.shape[:-1], module.out_features)

    return forward


def _slices(
    forward: Callable[..., torch.Tensor], rows: int, pairs: bool
) -> Callable[..., torch.Tensor]:
    """``forward`` over a batch of ``rows`` images in solo-call slices: one image each, or
    with ``pairs`` under classifier-free guidance (the unconditional halves, then the
    conditional ones) one image's pair each."""

    def run(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        batch = x.shape[0] if x.ndim > 1 else 0
        if batch == rows:  # one image per slice
            parts = [forward(_fresh(x, [i]), *args, **kwargs) for i in range(rows)]
            return torch.cat(parts)
        if batch == 2 * rows and pairs:  # one image's (unconditional, conditional) pair
            done = [forward(_fresh(x, [i, rows + i]), *args, **kwargs) for i in range(rows)]
            return torch.cat([p[:1] for p in done] + [p[1:] for p in done])
        return forward(x, *args, **kwargs)  # kernels agree at these sizes, or no image batch

    return run


def _fresh(x: torch.Tensor, index: list[int]) -> torch.Tensor:
    """Rows ``index`` of ``x`` in new memory with ``x``'s strides (channels-last stays so, a
    transposed view stays transposed): what a solo call's layer gets is its own allocation laid
    out as here, and GEMM and convolution kernels take other paths for other layouts."""
    out = torch.empty_like(x[: len(index)])  # keeps the strides of a dense tensor
    return out.copy_(x[index[0] : index[0] + 1] if len(index) == 1 else x[index])
