"""The `easel` command line: thin commands over the catalog, the model manager and the engine.

    easel generate "a red circle" -m tiny-shapes --seed 7 -n 2 -o out/
    easel info out/easel-7.png [--json]
    easel models list [--json] | add ID SOURCE [--family F] | pull ID
    easel generate "a red circle" --lora ink:0.8 --lora paper
    easel loras list [--json] | add FILE [--name N] [--family F] [--base-model M]
    easel keys create NAME [--scope generate|train|admin]... | list [--json] | revoke NAME
    easel backup /backups/easel-2025-06-01      # database, images, LoRAs, datasets
    easel mcp [--url URL]                       # tools for agents (Model Context Protocol)

Every user error (an EaselError, a bad argument, an unreadable file) ends as one line on stderr
and exit code 2, never a traceback. torch is imported only by the commands that generate or
download, so `info` and `models list` start fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

from easel.api.server import register as register_serve
from easel.backup import backup
from easel.config import Settings
from easel.domain import (
    IMAGE_FIELDS,
    OUTPAINT_SIDES,
    SCOPES,
    TASK_SPECS,
    EaselError,
    GenerationParams,
    InputImages,
    InvalidParams,
    Progress,
    infer_task,
)
from easel.jobs.db import Database
from easel.jobs.keys import KeyStore
from easel.mcp_server import register as register_mcp
from easel.models.catalog import ModelCatalog
from easel.models.loras import LoraCatalog, parse_lora_arg
from easel.training.commands import register as register_training

# Commands from other packages plug in here: each function adds its subcommand(s) to the
# `easel` subparsers and sets a handler with `parser.set_defaults(func=handler)`, where
# `handler(args: argparse.Namespace) -> int | None` returns the exit code (None means 0).
# The lead registers `serve` (easel.api), `train` and `eval` (easel.training), `mcp` here.
EXTRA_COMMANDS: list[Callable[[Any], None]] = [register_serve, register_training, register_mcp]


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage, so bad arguments get the one-line path."""

    def error(self, message: str) -> NoReturn:
        raise EaselError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="easel", description="Easel: a self-hosted image-generation studio.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = commands.add_parser("generate", help="make images locally (no server needed)")
    gen.add_argument("prompt", nargs="?", help="what to draw (optional with --from)")
    gen.add_argument("-m", "--model", help="catalog id, hub id, local folder or .safetensors")
    gen.add_argument("--negative-prompt", help="what to avoid")
    gen.add_argument("--steps", type=int, help="denoising steps (model default if omitted)")
    gen.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    gen.add_argument(
        "--guidance-end",
        type=float,
        help="share of the steps, from the first, that use guidance (0 < x <= 1; sd models)",
    )
    gen.add_argument("--size", type=_size, help="WIDTHxHEIGHT, e.g. 512x768")
    gen.add_argument("--seed", type=int, help="seed of the first image (image i uses seed+i)")
    gen.add_argument("-n", "--count", type=int, help="number of images (default 1)")
    gen.add_argument("--scheduler", help="sampler by stable name, e.g. euler, dpmpp_2m")
    gen.add_argument("-o", "--output", type=Path, help="a .png file or a folder (default: .)")
    gen.add_argument(
        "--lora",
        action="append",
        type=parse_lora_arg,
        metavar="NAME[:WEIGHT]",
        help="apply a LoRA (see `easel loras list`) at WEIGHT (default 1); repeatable",
    )
    edit = gen.add_argument_group("editing (the task follows from these; --task names it)")
    edit.add_argument(
        "--task",
        choices=[name for name, spec in TASK_SPECS.items() if spec.kind == "generate"],
        help="txt2img, img2img, inpaint, outpaint, style",
    )
    edit.add_argument("--image", type=Path, help="input image (PNG, JPEG or WebP) to edit")
    edit.add_argument("--mask", type=Path, help="inpaint mask: white (or alpha 0) = repaint")
    edit.add_argument("--strength", type=float, help="how much of the input is redrawn (0..1]")
    edit.add_argument("--mask-blur", type=int, help="feather of the mask's edge in pixels")
    edit.add_argument(
        "--only-masked",
        action="store_true",
        default=None,
        help="inpaint a crop around the mask at the model's resolution",
    )
    edit.add_argument(
        "--outpaint", type=_sides, metavar="L,T,R,B", help="pixels to add on each side"
    )
    edit.add_argument("--style-image", type=Path, help="reference whose look to take")
    edit.add_argument("--style-strength", type=float, help="how much of its colours (0..1)")
    gen.add_argument(
        "--from",
        dest="from_image",
        type=Path,
        metavar="IMAGE",
        help="repeat the request stored in an Easel PNG (other options override it)",
    )
    gen.set_defaults(func=cmd_generate)

    info = commands.add_parser("info", help="print the generation parameters stored in an image")
    info.add_argument("image", type=Path)
    info.add_argument("--json", action="store_true", help="print the exact request as JSON")
    info.set_defaults(func=cmd_info)

    models = commands.add_parser("models", help="the model catalog")
    models_commands = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    listing = models_commands.add_parser("list", help="known models and whether they are here")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_models_list)
    add = models_commands.add_parser("add", help="add a local folder, .safetensors or hub id")
    add.add_argument("id", help="the name to use with -m")
    add.add_argument("source", help="local diffusers folder, .safetensors file or hub repo id")
    add.add_argument("--family", help="model family (detected for local sources)")
    add.add_argument("--description", default="", help="a note shown by `models list`")
    add.add_argument(
        "--config",
        help="for a .safetensors file: a diffusers folder or cached hub id with its configs",
    )
    add.add_argument(
        "--ip-adapter",
        metavar="FILE",
        help="an IP-Adapter .safetensors (image_encoder/ beside it) for the style task",
    )
    add.set_defaults(func=cmd_models_add)
    pull = models_commands.add_parser("pull", help="download a model's weights")
    pull.add_argument("id")
    pull.set_defaults(func=cmd_models_pull)

    loras = commands.add_parser("loras", help="the LoRAs in EASEL_HOME/loras")
    loras_commands = loras.add_subparsers(dest="loras_command", required=True, metavar="ACTION")
    loras_list = loras_commands.add_parser("list", help="trained and added LoRAs")
    loras_list.add_argument("--json", action="store_true")
    loras_list.set_defaults(func=cmd_loras_list)
    loras_add = loras_commands.add_parser(
        "add", help="copy in a LoRA .safetensors (diffusers' or kohya's format)"
    )
    loras_add.add_argument("file", type=Path)
    loras_add.add_argument("--name", help="the name to use with --lora (default: the file's)")
    loras_add.add_argument("--family", help="model family (guessed from the file if omitted)")
    loras_add.add_argument("--base-model", help="the catalog model it was made for (a note)")
    loras_add.set_defaults(func=cmd_loras_add)

    keys = commands.add_parser("keys", help="API keys (once one exists, the server needs them)")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    keys_create = keys_commands.add_parser("create", help="make a key and print its secret once")
    keys_create.add_argument("name", help="who or what the key is for, e.g. alice or open-webui")
    keys_create.add_argument(
        "--scope",
        action="append",
        choices=SCOPES,
        help="what it may do: generate (default), train, admin (everything, everyone's work); "
        "repeatable",
    )
    keys_create.add_argument("--rate-per-minute", type=int, help="requests per minute")
    keys_create.add_argument("--max-jobs", type=int, help="jobs queued or running at once")
    keys_create.set_defaults(func=cmd_keys_create)
    keys_list = keys_commands.add_parser("list", help="keys (never their secrets)")
    keys_list.add_argument("--json", action="store_true")
    keys_list.add_argument("--revoked", action="store_true", help="revoked keys too")
    keys_list.set_defaults(func=cmd_keys_list)
    keys_revoke = keys_commands.add_parser("revoke", help="stop a key working, at once")
    keys_revoke.add_argument("name")
    keys_revoke.set_defaults(func=cmd_keys_revoke)

    backup = commands.add_parser(
        "backup", help="copy EASEL_HOME consistently, also while the server runs"
    )
    backup.add_argument("path", type=Path, help="a new or empty folder outside EASEL_HOME")
    backup.set_defaults(func=cmd_backup)

    for register in EXTRA_COMMANDS:
        register(commands)
    return parser


def run() -> None:
    """The `easel` command (and ``python -m easel``): `main`, then the exit."""
    code = main()
    # loaded only if a model was: an OpenVINO conversion may still be running
    openvino = sys.modules.get("easel.models.cpu_openvino")
    if openvino is not None:
        openvino.exit_if_busy(code)
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args) or 0
    except EaselError as exc:
        print("error: " + " ".join(exc.message.splitlines()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# --- generate -----------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from easel.engine.metadata import parse_png, to_png_bytes  # PIL only

    # 1. build the request: the stored one (--from), then the options given on the command line
    params = parse_png(args.from_image) if args.from_image else GenerationParams(prompt="")
    overrides = {
        "prompt": args.prompt,
        "model": args.model,
        "negative_prompt": args.negative_prompt,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "guidance_end": args.guidance_end,
        "seed": args.seed,
        "num_images": args.count,
        "scheduler": args.scheduler,
        "strength": args.strength,
        "mask_blur": args.mask_blur,
        "only_masked": args.only_masked,
        "outpaint": args.outpaint,
        "style_strength": args.style_strength,
        "loras": args.lora,  # replaces the --from image's LoRAs
    }
    files = {name: getattr(args, name) for name in IMAGE_FIELDS if getattr(args, name)}
    overrides.update({name: str(path) for name, path in files.items()})
    if args.size is not None:
        overrides["width"], overrides["height"] = args.size
    stored_hashes = params.input_hashes
    params = GenerationParams.from_dict(
        {**params.to_dict(), **{k: v for k, v in overrides.items() if v is not None}}
    )
    if args.task is not None:
        params.task = args.task
    elif files or args.outpaint or not args.from_image:
        params.task = infer_task(params)

    # 2. read the input images, check the model and the output folder before loading torch
    settings = Settings()
    inputs = _read_inputs(params, settings)
    catalog = ModelCatalog(settings)
    _check_default_model(catalog, settings, params)
    loras = LoraCatalog(settings)
    for lora in params.loras or []:  # an unknown name fails before torch loads
        if isinstance(lora, dict) and isinstance(lora.get("id"), str):
            loras.get(lora["id"])
    _make_output_folder(args.output)
    _quiet_libraries()
    if settings.cpu_backend == "auto":
        # one command, one run: OpenVINO's conversion (35 s of both cores for an SD 1.5 UNet)
        # and compiles would take the cores from the image and not pay back within it
        # (docs/CLI.md); EASEL_CPU_BACKEND=openvino asks for it
        settings = settings.model_copy(update={"cpu_backend": "torch"})
    from easel.engine.generate import Engine  # torch and diffusers load here
    from easel.models.loader import ModelManager

    engine = Engine(ModelManager(settings, catalog), settings, loras=loras)

    # 3. generate with a progress bar
    bar: Any = None

    def on_progress(progress: Progress) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=progress.total, unit="step", desc="generating", file=sys.stderr)
        bar.update(progress.step - bar.n)

    try:
        result = engine.generate(params, inputs=inputs, on_progress=on_progress)
    finally:
        if bar is not None:
            bar.close()
    if result.dropped_tokens:
        print(
            f"warning: the prompt is {result.dropped_tokens} tokens longer than the text "
            "encoder's limit; those tokens were ignored",
            file=sys.stderr,
        )
    if stored_hashes and result.params.input_hashes != stored_hashes:
        print(
            "warning: the input images differ from those that made the --from image, so the "
            "pixels will too",
            file=sys.stderr,
        )

    # 4. write the PNGs with their parameters and print where they are
    for index, (image, seed) in enumerate(zip(result.images, result.seeds, strict=True)):
        try:
            path = _output_path(args.output, seed, multiple=len(result.images) > 1)
            path.write_bytes(to_png_bytes(image, result.params, index=index))
        except OSError as exc:
            raise EaselError(
                f"cannot write {exc.filename}: {exc.strerror}", field="output"
            ) from exc
        print(path)


def _read_inputs(params: GenerationParams, settings: Settings) -> InputImages:
    """Decode the files an editing request names, with the server's upload checks."""
    from easel.imaging import decode_image  # PIL only

    spec = TASK_SPECS.get(params.task)
    images = {}
    for name in spec.image_fields if spec else ():
        path = getattr(params, name)
        if path is None:
            continue
        flag = "--" + name.replace("_", "-")
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise EaselError(
                f"{flag}: cannot read {path}: {exc.strerror} (with --from, give the input "
                "images again)",
                field=name,
            ) from None
        images[name] = decode_image(data, field=name, max_pixels=settings.max_upload_pixels)
    return InputImages(**images)


def _quiet_libraries() -> None:
    # A terminal user cannot act on the libraries' notes (optional torchvision, deprecations,
    # diffusers' own prompt-truncation log, which `generate` reports as a warning itself).
    # Must run before transformers/diffusers are first imported.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)


def _check_default_model(
    catalog: ModelCatalog, settings: Settings, params: GenerationParams
) -> None:
    if params.model is not None:
        # here, not in the engine: the user owns these files, so a path gets the reason it is
        # refused (the server says only that there is no usable model at it)
        catalog.get(params.model, explain=True)
        return
    record = catalog.get(settings.default_model)
    if not record.available:
        raise EaselError(
            f"the default model {settings.default_model!r} is not available on this machine; "
            "choose another with -m ID or -m PATH (see `easel models list`), "
            "or set EASEL_DEFAULT_MODEL",
            field="model",
        )


def _make_output_folder(output: Path | None) -> None:
    """Create the folder the images go to, before any work, so a bad ``-o`` fails first."""
    folder = output.parent if output and output.suffix.lower() == ".png" else output or Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EaselError(f"cannot write {exc.filename}: {exc.strerror}", field="output") from exc


def _output_path(output: Path | None, seed: int, *, multiple: bool) -> Path:
    """``-o x.png`` names the file (``x-SEED.png`` for several); a folder gets ``easel-SEED.png``."""
    if output is not None and output.suffix.lower() == ".png":
        return output.with_name(f"{output.stem}-{seed}.png") if multiple else output
    folder = output or Path(".")
    path, copy = folder / f"easel-{seed}.png", 1
    while path.exists():  # never overwrite an earlier run's image
        path, copy = folder / f"easel-{seed}-{copy}.png", copy + 1
    return path


def _sides(text: str) -> dict[str, int]:
    parts = text.split(",")
    if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
        raise InvalidParams(
            f"outpaint must be LEFT,TOP,RIGHT,BOTTOM pixels, e.g. 0,0,32,0 (got {text!r})",
            field="outpaint",
        )
    return dict(zip(OUTPAINT_SIDES, (int(p) for p in parts), strict=True))


def _size(text: str) -> tuple[int, int]:
    width, sep, height = text.lower().partition("x")
    if not (sep and width.isdigit() and height.isdigit()):
        raise InvalidParams(f"size must be WIDTHxHEIGHT, e.g. 512x768 (got {text!r})", field="size")
    return int(width), int(height)


# --- info ---------------------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> None:
    from easel.engine.metadata import format_a1111, parse_png, read_metadata

    params = parse_png(args.image)
    if args.json:
        print(json.dumps(params.to_dict(), indent=2))
    else:
        print(read_metadata(args.image)["parameters"] or format_a1111(params))


# --- models -------------------------------------------------------------------------------------


def print_table(rows: list[tuple[str, ...]]) -> None:
    """Columns padded to their widest cell (the first row is the header)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def cmd_models_list(args: argparse.Namespace) -> None:
    records = ModelCatalog(Settings()).list()
    if args.json:
        print(json.dumps([asdict(r) for r in records], indent=2))
        return
    rows = [("ID", "FAMILY", "HERE", "SOURCE")]
    rows += [(r.id, r.family, "yes" if r.available else "no", r.source) for r in records]
    print_table(rows)


def cmd_models_add(args: argparse.Namespace) -> None:
    record = ModelCatalog(Settings()).add(
        args.id,
        args.source,
        family=args.family,
        description=args.description,
        config=args.config,
        ip_adapter=args.ip_adapter,
    )
    state = (
        "available" if record.available else "not downloaded yet: easel models pull " + record.id
    )
    print(f"added {record.id} ({record.family}) from {record.source}; {state}")


# --- loras --------------------------------------------------------------------------------------


def cmd_loras_list(args: argparse.Namespace) -> None:
    records = LoraCatalog(Settings()).list()
    if args.json:
        print(json.dumps([asdict(r) for r in records], indent=2, default=str))
        return
    if not records:
        print("no LoRAs yet: train one with `easel train lora`, or add a file: `easel loras add`")
        return
    rows = [("NAME", "FAMILY", "BASE MODEL", "TRIGGER", "RANK", "STEPS", "SOURCE")]
    for r in records:
        cells = (r.base_model, r.trigger, r.rank, r.steps)
        rows.append((r.id, r.family, *("-" if c is None else str(c) for c in cells), r.source))
    print_table(rows)


def cmd_loras_add(args: argparse.Namespace) -> None:
    record = LoraCatalog(Settings()).add(
        args.file, name=args.name, family=args.family, base_model=args.base_model
    )
    print(f"added LoRA {record.id} ({record.family}, rank {record.rank}): --lora {record.id}")


# --- keys ---------------------------------------------------------------------------------------


def _key_store() -> KeyStore:
    from easel.services import check_home

    settings = Settings()
    check_home(settings)  # a damaged database, or a new one beside old images: one line
    return KeyStore(Database(settings.db_path))


def cmd_keys_create(args: argparse.Namespace) -> None:
    record, secret = _key_store().create(
        args.name,
        scopes=tuple(args.scope or ("generate",)),
        rate_per_minute=args.rate_per_minute,
        max_jobs=args.max_jobs,
    )
    print(secret)
    print(
        f"key {record.name!r} ({' '.join(record.scopes)}) made; the line above is its secret, "
        "shown this once. Send it as `Authorization: Bearer SECRET`.",
        file=sys.stderr,
    )


def cmd_keys_list(args: argparse.Namespace) -> None:
    store = _key_store()
    records = store.list(revoked=args.revoked)
    if args.json:
        print(json.dumps([asdict(r) for r in records], indent=2, default=str))
        return
    if not records and store.any_made():
        print(
            "no active keys: the server refuses every request but health (revoked keys still "
            "count); make one with `easel keys create`"
        )
        return
    if not records:
        print("no keys: the server answers anyone on loopback; make one with `easel keys create`")
        return
    rows = [("NAME", "SCOPES", "RATE/MIN", "MAX JOBS", "CREATED", "REVOKED")]
    for r in records:
        limits = ("-" if v is None else str(v) for v in (r.rate_per_minute, r.max_jobs))
        revoked = r.revoked_at.isoformat(timespec="seconds") if r.revoked_at else "-"
        created = r.created_at.isoformat(timespec="seconds")
        rows.append((r.name, ",".join(r.scopes), *limits, created, revoked))
    print_table(rows)


def cmd_keys_revoke(args: argparse.Namespace) -> None:
    record = _key_store().revoke(args.name)
    print(f"revoked key {record.name!r}; it no longer works, and its web sessions are over")


def cmd_models_pull(args: argparse.Namespace) -> None:
    from easel.models.download import pull  # fails fast offline, before importing torch

    _quiet_libraries()
    folder = pull(ModelCatalog(Settings()), args.id, progress=True)
    print(f"{args.id} is ready in {folder}")


# --- backup -------------------------------------------------------------------------------------


def cmd_backup(args: argparse.Namespace) -> None:
    summary = backup(Settings(), args.path)
    counts = [
        _plural(summary.jobs, "job"),
        _plural(summary.images, "image"),
        _plural(summary.lora_files, "LoRA file"),
        _plural(summary.datasets, "dataset"),
    ]
    print(
        f"backed up {', '.join(counts)} to {summary.target} ({summary.bytes} bytes); "
        f"restore with EASEL_HOME={summary.target}"
    )
    if summary.left_out:
        print(
            f"note: {summary.left_out} images were deleted while copying (pruned or "
            "discarded); the copy leaves them out",
            file=sys.stderr,
        )


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"
