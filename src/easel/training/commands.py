"""`easel eval` (and `easel train`): training-side commands for the `easel` command line.

    easel eval                       # the default model (tiny-shapes), report in ./eval/tiny-shapes
    easel eval path/to/checkpoint --limit 8 --steps 10 --out /tmp/ev
    easel eval tiny-shapes --editing  # inpaint, outpaint, img2img, style: ./eval/tiny-shapes/editing

`register(subparsers)` adds them; each handler returns the exit code, and user errors are
`EaselError`s, which the CLI prints as one line (exit 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from easel.config import Settings
from easel.domain import InvalidParams


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the training commands to the `easel` subparsers."""
    _register_train(subparsers)
    _register_eval(subparsers)


# --- easel train base -----------------------------------------------------------------------------


def _register_train(subparsers: argparse._SubParsersAction) -> None:
    from easel.training.base_config import add_arguments

    train = subparsers.add_parser("train", help="train models")
    kinds = train.add_subparsers(dest="train_command", required=True)
    base = kinds.add_parser(
        "base",
        help="train the bundled tiny-shapes model from scratch (resumes a run in --out)",
        description="Train tokenizer, text encoder, VAE and UNet of tiny-shapes on synthetic "
        "scenes within a wall-clock budget; writes checkpoints, samples, loss.png and a "
        "StableDiffusionPipeline folder (<out>/pipeline).",
    )
    add_arguments(base)
    base.set_defaults(func=cmd_train_base)


def cmd_train_base(args: argparse.Namespace) -> int:
    from easel.training.base import train_base
    from easel.training.base_config import config_from_args

    if args.max_minutes is not None and args.max_minutes <= 0:
        raise InvalidParams(
            f"--max-minutes must be greater than 0 (got {args.max_minutes})", field="max_minutes"
        )
    config = config_from_args(args)
    for name in ("latent_channels", "batch_size", "vae_batch_size"):
        if getattr(config, name) < 1:
            flag = "--" + name.replace("_", "-")
            raise InvalidParams(
                f"{flag} must be at least 1 (got {getattr(config, name)})", field=name
            )
    for name in ("vae_share", "decoder_share"):
        if not 0 <= getattr(config, name) < 1:
            flag = "--" + name.replace("_", "-")
            raise InvalidParams(
                f"{flag} must be at least 0 and below 1 (got {getattr(config, name)})", field=name
            )
    if not 0 <= config.hard_share <= 1:
        raise InvalidParams(
            f"--hard-share must be between 0 and 1 (got {config.hard_share})", field="hard_share"
        )
    if config.vae_share + config.decoder_share > 0.9:
        raise InvalidParams(
            "--vae-share + --decoder-share must be at most 0.9, so the denoiser keeps a tenth of "
            f"the budget (got {config.vae_share} + {config.decoder_share})",
            field="decoder_share",
        )
    folder = train_base(config)
    print(f"saved {folder}")
    return 0


# --- easel eval -----------------------------------------------------------------------------------


def _register_eval(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="score how well a tiny-shapes style model follows prompts",
        description="Render held-out and seen prompts, judge the pixels for colour, shape, size, "
        "position and background, and write report.json, report.md and grid.png. With "
        "--editing, edit held-out pictures instead (inpaint, outpaint, img2img, style) and judge "
        "the edits.",
    )
    parser.add_argument("model", nargs="?", help="catalog id or diffusers folder (default model)")
    parser.add_argument(
        "--prompt",
        action="append",
        dest="prompts",
        help="judge this caption-grammar prompt instead of the default set (repeatable)",
    )
    parser.add_argument("--out", type=Path, help="report folder (default: ./eval/<model name>)")
    parser.add_argument(
        "--editing",
        action="store_true",
        help="score edits (inpaint, outpaint, img2img, style) on held-out pictures instead "
        "(report: ./eval/<model name>/editing unless --out is given)",
    )
    parser.add_argument(
        "--limit",
        type=int,
        help="at most N prompts per group (4 groups); with --editing, N cases per measure",
    )
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    parser.add_argument("--guidance", type=float, help="guidance scale (default: the model's)")
    parser.add_argument(
        "--guidance-end",
        type=float,
        help="share of the steps that use guidance, 0 < x <= 1 (default: the model's)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image (default 0)")
    parser.add_argument("--device", help="cpu, cuda, ... (default: the EASEL_DEVICE setting)")
    parser.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from easel.training.evaluate import evaluate, format_markdown

    # 1. check inputs
    for name in ("limit", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InvalidParams(f"--{name} must be at least 1 (got {value})", field=name)
    if args.editing and args.prompts:
        raise InvalidParams(
            "--prompt cannot be used with --editing (the editing cases make their own prompts)",
            field="prompts",
        )
    model = args.model or Settings().default_model
    out = args.out or Path("eval") / Path(model).name / ("editing" if args.editing else "")
    # 2. render, judge, write (the progress bar appears once the model has loaded)
    bar: tqdm | None = None

    def on_progress(done: int, total: int) -> None:
        nonlocal bar
        bar = bar or tqdm(desc="eval", total=total, unit="img", file=sys.stderr)
        bar.update(done - bar.n)

    common = {
        "limit": args.limit,
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "guidance_end": args.guidance_end,
        "seed": args.seed,
        "device": args.device,
        "out": out,
        "on_progress": on_progress,
    }
    try:
        if args.editing:
            from easel.training.evaluate_editing import evaluate_editing
            from easel.training.evaluate_editing import format_markdown as format_editing

            summary = format_editing(evaluate_editing(model, **common), list_wrong=False)
        else:
            summary = format_markdown(
                evaluate(model, prompts=args.prompts, **common), list_wrong=False
            )
    finally:
        if bar is not None:
            bar.close()
    # 3. summary
    print(summary)
    print(f"report: {out / 'report.md'}  grid: {out / 'grid.png'}")
    return 0
