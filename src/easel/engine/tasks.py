"""Task runners: how each task of ``domain.TASK_SPECS`` makes its images from its inputs.

A runner gets a :class:`Call` (the pipeline calls of some images: their seeds, scheduler,
progress and cancel) and the :class:`Row` of each image, and returns the finished images in
the rows' order. The rows of one call may belong to several requests of one batch
(``domain.batch_key``: they agree on every field but prompts, seeds and input images); a task
whose spec does not batch gets one row at a time. Inpainting and outpainting paste the model's
output back over the input, so every pixel beyond the mask's blur band is the input's own, bit
for bit (as AUTOMATIC1111 does).

    RUNNERS["inpaint"](call, [Row(params, inputs, 0)])   # -> [PIL image at the input's size]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from PIL import Image

from easel.domain import GenerationParams, InputImages
from easel.engine.style import transfer_look
from easel.imaging import band, grow_canvas, mask_crop, paste_back, repaint_mask


@dataclass
class Row:
    """One image to make: its request (resolved), the request's input images, and its index
    in the request (its seed is ``params.seed + index``)."""

    params: GenerationParams
    inputs: InputImages
    index: int = 0


class Call(Protocol):
    """Runs the pipeline of one family task (``txt2img``, ``img2img``, ``inpaint``) once for
    all rows; ``share`` is this call's part of each image's progress bar (0..1]. ``args`` are
    the same for every row; ``each`` holds one dict of arguments per row (its input image),
    which the call hands to the pipeline as lists."""

    # the model's IP-Adapter is loaded (at the request's style_strength) for this request
    ip_adapter: bool

    def __call__(
        self, pipeline: str, share: float = 1.0, *, each: Sequence[dict[str, Any]] = (), **args: Any
    ) -> list[Image.Image]: ...


Runner = Callable[[Call, Sequence[Row]], list[Image.Image]]


def run_txt2img(call: Call, rows: Sequence[Row]) -> list[Image.Image]:
    return call("txt2img")


def run_img2img(call: Call, rows: Sequence[Row]) -> list[Image.Image]:
    each = [{"image": _at_work_size(_given(r.inputs.image), r.params)} for r in rows]
    return call("img2img", each=each, strength=rows[0].params.strength)


def run_inpaint(call: Call, rows: Sequence[Row]) -> list[Image.Image]:
    plans = [
        _InpaintPlan(
            r.params,
            _given(r.inputs.image).convert("RGB"),
            repaint_mask(_given(r.inputs.mask)),
            bool(r.params.only_masked),
        )
        for r in rows
    ]
    return _inpaint(call, plans)


def run_outpaint(call: Call, rows: Sequence[Row]) -> list[Image.Image]:
    plans = []
    for r in rows:
        assert r.params.outpaint is not None
        canvas, mask = grow_canvas(_given(r.inputs.image), r.params.outpaint)
        plans.append(_InpaintPlan(r.params, canvas, mask, only_masked=False))
    return _inpaint(call, plans)


def run_style(call: Call, rows: Sequence[Row]) -> list[Image.Image]:
    """One image of a style request (the task does not batch: see ``_style``)."""
    (row,) = rows
    return [_style(call, row.params, row.inputs)]


def _style(call: Call, params: GenerationParams, inputs: InputImages) -> Image.Image:
    """The reference's look on the content (``image``, or a first text-to-image pass): its
    colours moved onto the reference's, background to background and subject to subject
    (engine.style), then an img2img pass at ``strength`` that redraws the result as a coherent
    picture. A model with an IP-Adapter
    configured takes the reference as an image prompt instead (``style_strength`` is the
    adapter's scale): img2img from the content, or text-to-image without one."""
    assert inputs.style_image is not None
    if call.ip_adapter:
        reference = inputs.style_image.convert("RGB")
        if inputs.image is None:
            return call("txt2img", ip_adapter_image=reference)[0]
        content = _at_work_size(inputs.image, params)
        args: dict[str, Any] = {"image": content, "strength": params.strength}
        return call("img2img", ip_adapter_image=reference, **args)[0]
    first = 0.0 if inputs.image is not None else 0.5
    content = inputs.image if inputs.image is not None else call("txt2img", share=first)[0]
    moved = transfer_look(
        _at_work_size(content, params),
        inputs.style_image,
        params.style_strength if params.style_strength is not None else 1.0,
    )
    return call("img2img", share=1 - first, image=moved, strength=params.strength)[0]


RUNNERS: dict[str, Runner] = {
    "txt2img": run_txt2img,
    "img2img": run_img2img,
    "inpaint": run_inpaint,
    "outpaint": run_outpaint,
    "style": run_style,
}


class _InpaintPlan:
    """Repaint ``mask`` (binary, 255 = repaint) of ``original`` at the work size (``args``,
    the pipeline's image and mask), then paste the result back within the mask and its
    ``mask_blur`` band (``finish``)."""

    def __init__(
        self, params: GenerationParams, original: Image.Image, mask: Image.Image, only_masked: bool
    ) -> None:
        self.original, self.mask = original, mask
        self.strength = params.strength
        self.blur = params.mask_blur or 0
        region = band(mask, self.blur)  # the model may repaint the band; the paste-back feathers it
        work = (params.width or original.width, params.height or original.height)
        if only_masked:
            self.box: tuple[int, int, int, int] | None = mask_crop(
                region, aspect=work[0] / work[1]
            ).as_tuple()
            self.source, source_mask = original.crop(self.box), region.crop(self.box)
        else:
            self.box, self.source, source_mask = None, original, region
        self.args = {
            "image": self.source.resize(work, Image.Resampling.LANCZOS),
            "mask_image": source_mask.resize(work, Image.Resampling.NEAREST),
        }

    def finish(self, generated: Image.Image) -> Image.Image:
        if self.box is not None:
            patch = generated.resize(self.source.size, Image.Resampling.LANCZOS)
            generated = self.original.copy()
            generated.paste(patch, self.box[:2])
        return paste_back(self.original, generated, self.mask, self.blur)


def _inpaint(call: Call, plans: Sequence[_InpaintPlan]) -> list[Image.Image]:
    # strength is the same for every request of a batch (domain.batch_key)
    generated = call("inpaint", each=[p.args for p in plans], strength=plans[0].strength)
    return [p.finish(g) for p, g in zip(plans, generated, strict=True)]


def _given(image: Image.Image | None) -> Image.Image:
    assert image is not None, "validation makes sure the task's inputs are given"
    return image


def _at_work_size(image: Image.Image, params: GenerationParams) -> Image.Image:
    assert params.width is not None and params.height is not None
    image = image.convert("RGB")
    size = (params.width, params.height)
    return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)
