"""Task runners: how each task of ``domain.TASK_SPECS`` makes one image from its inputs.

A runner gets a :class:`Call` (one image's pipeline calls: its seed, scheduler, progress and
cancel) and the resolved request, and returns the finished image. Inpainting and outpainting
paste the model's output back over the input, so every pixel beyond the mask's blur band is the
input's own, bit for bit (as AUTOMATIC1111 does).

    RUNNERS["inpaint"](call, params, inputs)   # -> PIL image at the input's size
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from PIL import Image

from easel.domain import GenerationParams, InputImages
from easel.engine.style import transfer_look
from easel.imaging import band, grow_canvas, mask_crop, paste_back, repaint_mask


class Call(Protocol):
    """Runs the pipeline of one family task (``txt2img``, ``img2img``, ``inpaint``) for the
    current image; ``share`` is this call's part of the image's progress bar (0..1]."""

    # the model's IP-Adapter is loaded (at the request's style_strength) for this request
    ip_adapter: bool

    def __call__(self, pipeline: str, share: float = 1.0, **args: Any) -> Image.Image: ...


Runner = Callable[[Call, GenerationParams, InputImages], Image.Image]


def run_txt2img(call: Call, params: GenerationParams, inputs: InputImages) -> Image.Image:
    return call("txt2img")


def run_img2img(call: Call, params: GenerationParams, inputs: InputImages) -> Image.Image:
    assert inputs.image is not None
    return call("img2img", image=_at_work_size(inputs.image, params), strength=params.strength)


def run_inpaint(call: Call, params: GenerationParams, inputs: InputImages) -> Image.Image:
    assert inputs.image is not None and inputs.mask is not None
    original = inputs.image.convert("RGB")
    return _inpaint(call, params, original, repaint_mask(inputs.mask), bool(params.only_masked))


def run_outpaint(call: Call, params: GenerationParams, inputs: InputImages) -> Image.Image:
    assert inputs.image is not None and params.outpaint is not None
    canvas, mask = grow_canvas(inputs.image, params.outpaint)
    return _inpaint(call, params, canvas, mask, only_masked=False)


def run_style(call: Call, params: GenerationParams, inputs: InputImages) -> Image.Image:
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
            return call("txt2img", ip_adapter_image=reference)
        content = _at_work_size(inputs.image, params)
        return call("img2img", image=content, strength=params.strength, ip_adapter_image=reference)
    first = 0.0 if inputs.image is not None else 0.5
    content = inputs.image if inputs.image is not None else call("txt2img", share=first)
    moved = transfer_look(
        _at_work_size(content, params),
        inputs.style_image,
        params.style_strength if params.style_strength is not None else 1.0,
    )
    return call("img2img", share=1 - first, image=moved, strength=params.strength)


RUNNERS: dict[str, Runner] = {
    "txt2img": run_txt2img,
    "img2img": run_img2img,
    "inpaint": run_inpaint,
    "outpaint": run_outpaint,
    "style": run_style,
}


def _inpaint(
    call: Call,
    params: GenerationParams,
    original: Image.Image,
    mask: Image.Image,
    only_masked: bool,
) -> Image.Image:
    """Repaint ``mask`` (binary, 255 = repaint) of ``original`` at the work size, then paste
    the result back within the mask and its ``mask_blur`` band."""
    blur = params.mask_blur or 0
    region = band(mask, blur)  # the model may repaint the band; the paste-back feathers it
    work = (params.width or original.width, params.height or original.height)
    if only_masked:
        box = mask_crop(region, aspect=work[0] / work[1]).as_tuple()
        source, source_mask = original.crop(box), region.crop(box)
    else:
        box, source, source_mask = None, original, region
    generated = call(
        "inpaint",
        image=source.resize(work, Image.Resampling.LANCZOS),
        mask_image=source_mask.resize(work, Image.Resampling.NEAREST),
        strength=params.strength,
    )
    if box is not None:
        patch = generated.resize(source.size, Image.Resampling.LANCZOS)
        generated = original.copy()
        generated.paste(patch, box[:2])
    return paste_back(original, generated, mask, blur)


def _at_work_size(image: Image.Image, params: GenerationParams) -> Image.Image:
    assert params.width is not None and params.height is not None
    image = image.convert("RGB")
    size = (params.width, params.height)
    return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)
