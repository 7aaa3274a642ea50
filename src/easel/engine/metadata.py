"""PNG provenance: what made an image, written into the file and read back.

Every PNG Easel writes carries two text chunks:

- ``parameters``: the AUTOMATIC1111 format, so existing tools (A1111, ComfyUI, Civitai, image
  browsers) show the prompt and settings::

      a red circle
      Negative prompt: blurry
      Steps: 4, Sampler: Euler, CFG scale: 5.0, Seed: 7, Size: 64x64, Model: tiny-shapes, Version: easel 0.1.0

  LoRAs are written as A1111 does, as ``<lora:NAME:WEIGHT>`` tags after the prompt.

- ``easel``: JSON with the exact resolved request of *this* image (``seed`` is the image's own
  seed and ``num_images`` is 1), enough for ``easel generate --from IMAGE`` to make the same pixels.

PIL only: the UI and API read metadata without importing torch.

Example::

    data = to_png_bytes(result.images[i], result.params, index=i)
    read_metadata(data)["easel"]["seed"] == result.params.seed + i
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from easel import __version__
from easel.domain import GenerationParams, InvalidParams
from easel.safejson import loads_bounded

PARAMETERS_KEY = "parameters"
EASEL_KEY = "easel"
_MAX_CHUNK = 4 << 20  # bytes of easel chunk read: all the metadata an upload may carry

# stable scheduler name -> (A1111 "Sampler", A1111 "Schedule type" or None).
# A1111 >= 1.9 writes the noise schedule separately ("DPM++ 2M" + "Karras"); Forge writes flow
# matching models' shifted schedule as "Simple".
A1111_SAMPLERS: dict[str, tuple[str, str | None]] = {
    "euler": ("Euler", None),
    "euler_a": ("Euler a", None),
    "dpmpp_2m": ("DPM++ 2M", None),
    "dpmpp_2m_karras": ("DPM++ 2M", "Karras"),
    "ddim": ("DDIM", None),
    "flow_euler": ("Euler", "Simple"),
}
_SCHEDULER_BY_A1111 = {v: k for k, v in A1111_SAMPLERS.items()}

# One "Key: value" item of the A1111 settings line; values with commas are JSON-quoted.
_ITEM = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
# A1111's LoRA tag in a prompt: <lora:NAME> or <lora:NAME:WEIGHT> (a second weight, for the
# text encoder in some forks, is read past)
_LORA_TAG = re.compile(r"\s*<lora:([^:<>]+)(?::([^:<>]+))?(?::[^<>]*)?>")


def image_params(params: GenerationParams, index: int = 0) -> GenerationParams:
    """The request that makes exactly image ``index`` of ``params`` on its own (seed + index)."""
    assert params.seed is not None, "metadata is written from resolved params"
    return replace(params, seed=params.seed + index, num_images=1)


def format_a1111(params: GenerationParams) -> str:
    """The AUTOMATIC1111 ``parameters`` text for resolved ``params`` (one image)."""
    items: dict[str, Any] = {"Steps": params.num_inference_steps}
    if params.scheduler is not None:
        sampler, schedule = A1111_SAMPLERS.get(params.scheduler, (params.scheduler, None))
        items["Sampler"] = sampler
        if schedule:
            items["Schedule type"] = schedule
    items["CFG scale"] = params.guidance_scale
    if params.guidance_end is not None and params.guidance_end < 1:
        items["Guidance end"] = params.guidance_end  # Easel's own key; A1111 keeps it as extra
    items["Seed"] = params.seed
    items["Size"] = f"{params.width}x{params.height}"
    items["Model"] = params.model
    if params.task != "txt2img":
        items["Task"] = params.task
    if params.strength is not None:
        items["Denoising strength"] = params.strength
    if params.mask_blur is not None:
        items["Mask blur"] = params.mask_blur
    if params.style_strength is not None:
        items["Style strength"] = params.style_strength  # Easel's own key
    items["Version"] = f"easel {__version__}"
    settings = ", ".join(f"{key}: {_quote(value)}" for key, value in items.items())
    tags = [f"<lora:{lora['id']}:{_weight(lora['weight'])}>" for lora in params.loras or []]
    lines = [" ".join([params.prompt, *tags])]
    if params.negative_prompt:
        lines.append(f"Negative prompt: {params.negative_prompt}")
    lines.append(settings)
    return "\n".join(lines)


def parse_a1111(text: str) -> dict[str, Any]:
    """Parse A1111 ``parameters`` text into GenerationParams field names.

    Returns ``prompt`` and ``negative_prompt`` plus whatever settings are present
    (``num_inference_steps``, ``scheduler``, ``guidance_scale``, ``guidance_end``, ``seed``,
    ``width``, ``height``, ``model``, ``task``, ``strength``, ``mask_blur``,
    ``style_strength``), and ``loras`` from ``<lora:NAME:WEIGHT>`` tags, which leave the
    prompt; keys Easel does not know are kept under ``extra``.
    """
    lines = text.split("\n")
    settings: dict[str, str] = {}
    if _is_settings_line(lines[-1]):
        settings = {k: _unquote(v) for k, v in _ITEM.findall(lines.pop())}
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in lines:
        if not in_negative and line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].lstrip()
        (negative_lines if in_negative else prompt_lines).append(line)
    prompt, loras = _take_lora_tags("\n".join(prompt_lines))
    out: dict[str, Any] = {"prompt": prompt, "negative_prompt": "\n".join(negative_lines)}
    if loras:
        out["loras"] = loras
    converters: dict[str, tuple[str, Any]] = {
        "Steps": ("num_inference_steps", int),
        "CFG scale": ("guidance_scale", float),
        "Guidance end": ("guidance_end", float),
        "Seed": ("seed", int),
        "Model": ("model", str),
        "Task": ("task", str),
        "Denoising strength": ("strength", float),
        "Mask blur": ("mask_blur", int),
        "Style strength": ("style_strength", float),
    }
    extra: dict[str, str] = {}
    for key, value in settings.items():
        if key in converters:
            name, convert = converters[key]
            out[name] = convert(value)
        elif key == "Size":
            width, _, height = value.partition("x")
            out["width"], out["height"] = int(width), int(height)
        elif key not in ("Sampler", "Schedule type", "Version"):
            extra[key] = value
    if "Sampler" in settings:
        sampler = (settings["Sampler"], settings.get("Schedule type"))
        out["scheduler"] = _SCHEDULER_BY_A1111.get(sampler, settings["Sampler"])
    if extra:
        out["extra"] = extra
    return out


def to_png_bytes(image: Image.Image, params: GenerationParams, *, index: int = 0) -> bytes:
    """Encode image ``index`` of a request with resolved ``params`` as PNG with both chunks."""
    own = image_params(params, index)
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, format_a1111(own))
    info.add_text(EASEL_KEY, json.dumps(own.to_dict(), sort_keys=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_metadata(source: str | Path | bytes) -> dict[str, Any]:
    """Read ``{"parameters": str | None, "easel": dict | None}`` from a PNG file or its bytes.

    Raises InvalidParams(field="image") when the file is missing or not a readable image.
    """
    image = _open(source)
    text = image.info.get(PARAMETERS_KEY)
    raw = image.info.get(EASEL_KEY)
    easel: dict[str, Any] | None = None
    if raw is not None:
        # bounded: an upload's chunk may be crafted (100,000 nested brackets)
        parsed = loads_bounded(
            raw, what="the image's easel chunk", field="image", max_bytes=_MAX_CHUNK
        )
        if not isinstance(parsed, dict):
            raise InvalidParams("the image's easel chunk is not a JSON object", field="image")
        easel = parsed
    return {"parameters": text, "easel": easel}


def parse_png(source: str | Path | bytes) -> GenerationParams:
    """The request that made an image: the exact ``easel`` chunk, else parsed A1111 text.

    Raises InvalidParams(field="image") when the image carries neither.
    """
    meta = read_metadata(source)
    if meta["easel"] is not None:
        return GenerationParams.from_dict(meta["easel"])
    if meta["parameters"] is not None:
        return GenerationParams.from_dict(parse_a1111(meta["parameters"]))
    raise InvalidParams(
        "image has no generation parameters (no 'parameters' or 'easel' PNG text chunk)",
        field="image",
    )


def _open(source: str | Path | bytes) -> Image.Image:
    name = "image bytes" if isinstance(source, bytes) else str(source)
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        image.load()  # text chunks after the pixel data are read only by load()
    except FileNotFoundError as exc:
        raise InvalidParams(f"image file not found: {name}", field="image") from exc
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
    ) as exc:
        raise InvalidParams(
            f"cannot read {name}: not a readable PNG/image ({exc})", field="image"
        ) from exc
    return image


def _take_lora_tags(prompt: str) -> tuple[str, list[dict[str, Any]]]:
    """``prompt`` without its LoRA tags, and the LoRAs they name (a weight that is not a
    number leaves its tag in the prompt)."""
    loras: list[dict[str, Any]] = []

    def take(match: re.Match[str]) -> str:
        try:
            weight = float(match[2]) if match[2] is not None else 1.0
        except ValueError:
            return match[0]
        loras.append({"id": match[1].strip(), "weight": weight})
        return ""

    rest = _LORA_TAG.sub(take, prompt)
    return (rest.strip() if loras else rest), loras


def _weight(value: float) -> str:
    """A weight as A1111 writes it: 0.8, 1 (and exact: the shortest text that reads back)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _is_settings_line(line: str) -> bool:
    return len(_ITEM.findall(line)) >= 3 and "Steps:" in line


def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if any(c in text for c in ',:"\n') else text


def _unquote(value: str) -> str:
    value = value.strip()
    if not value.startswith('"'):
        return value
    try:  # a JSON string (no nesting: the pattern matched one quoted run)
        return str(json.loads(value))
    except ValueError:  # not JSON's escapes (another tool's, or a crafted file): kept as written
        return value
