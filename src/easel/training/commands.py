"""`easel eval` and `easel train`: training-side commands for the `easel` command line.

    easel train lora photos/ --name hexagon --trigger sks  # a LoRA, EASEL_HOME/loras/hexagon
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
    from easel.training.tinyshapes.config import add_arguments  # torch-free: a fast `easel --help`

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
    _register_train_lora(kinds)


def cmd_train_base(args: argparse.Namespace) -> int:
    from easel.training.tinyshapes.config import config_from_args

    config = config_from_args(args)  # raises InvalidParams, before torch loads or a file is written
    from easel.training.tinyshapes.recipe import train_base

    folder = train_base(config)
    print(f"saved {folder}")
    return 0


# --- easel train lora -----------------------------------------------------------------------------


def _register_train_lora(kinds: argparse._SubParsersAction) -> None:
    from easel.training.lora_config import LoraConfig  # torch-free

    defaults = LoraConfig(model="-", dataset="-", out_dir="-", name="n", trigger="t")
    lora = kinds.add_parser(
        "lora",
        help="fine-tune a model with LoRA on your own captioned images",
        description="Teach a model something new from a folder of images with same-name .txt "
        "captions (or a metadata.jsonl), or a .zip of one. Writes EASEL_HOME/loras/NAME."
        "safetensors (diffusers' LoRA format), with NAME.loss.png and NAME.samples.png beside "
        "it. The run folder (default EASEL_HOME/training/NAME) keeps checkpoints: the same "
        "command run again goes on from the last one.",
    )
    lora.add_argument("dataset", type=Path, help="folder of images + captions, or a .zip")
    lora.add_argument("--name", required=True, help="the LoRA's name (its file name)")
    lora.add_argument(
        "--trigger",
        required=True,
        help="the word that calls up what the LoRA learns; put in front of captions lacking it",
    )
    lora.add_argument("-m", "--model", help="catalog id or model folder (default: the default)")
    model_default = "{} (default: the model's, else {})".format
    lora.add_argument("--steps", type=int, help=model_default("optimisation steps", defaults.steps))
    lora.add_argument("--rank", type=int, help=model_default("LoRA rank", defaults.rank))
    lora.add_argument(
        "--learning-rate",
        type=float,
        help=model_default("AdamW's learning rate", defaults.learning_rate),
    )
    lora.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="(default %(default)s)"
    )
    lora.add_argument(
        "--size",
        type=int,
        help="training side in pixels, a multiple of 16 (default: the model's default width)",
    )
    lora.add_argument(
        "--train-text-encoder",
        action=argparse.BooleanOptionalAction,
        help="LoRA on the CLIP text encoder(s) too (default: the model's, else no)",
    )
    lora.add_argument(
        "--prior-prompt",
        action="append",
        dest="prior_prompts",
        default=[],
        help="prior preservation: a class prompt (e.g. 'a dog'), or several (repeat): images "
        "of them are made by the model first, and there the LoRA learns to change nothing",
    )
    lora.add_argument(
        "--prior-prompts-file",
        type=Path,
        help="more prior prompts, one per line (e.g. 64 prompts the model does well)",
    )
    lora.add_argument(
        "--prior-word",
        action="append",
        dest="prior_words",
        default=[],
        help="prior preservation on the dataset's own images: each caption with this word in "
        "the trigger's place (a class the new one must leave alone, e.g. 'circle'; repeat for "
        "several), where the LoRA learns to change nothing; the convolutions that see no text "
        "then get no LoRA (default: the model's, e.g. tiny-shapes' five shapes)",
    )
    lora.add_argument(
        "--no-prior-words",
        action="store_true",
        help="no prior words, not even the model's",
    )
    lora.add_argument(
        "--prior-images",
        type=int,
        default=defaults.prior_images,
        help="images the model makes of the prior prompts, in turn (default %(default)s)",
    )
    lora.add_argument(
        "--export-scale",
        type=float,
        help="save the LoRA's change times this, so that weight 1 applies it this strongly, "
        "0 < x <= 4 (default: the model's, else 1)",
    )
    lora.add_argument(
        "--sample-every",
        type=int,
        default=defaults.sample_every,
        help="steps between sample grids and held-out losses (default %(default)s; 0: never)",
    )
    lora.add_argument(
        "--allow-missing-captions",
        action="store_true",
        help="train images without a caption on the trigger word alone (else they are refused)",
    )
    lora.add_argument("--out", type=Path, help="run folder (default EASEL_HOME/training/NAME)")
    lora.add_argument("--seed", type=int, default=0)
    lora.add_argument("--device", default="auto", help="cpu, cuda, ... (default: auto)")
    lora.set_defaults(func=cmd_train_lora)


def _read_prompts(path: Path | None) -> tuple[str, ...]:
    """The non-blank lines of ``path``, one prompt each."""
    if path is None:
        return ()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidParams(
            f"cannot read --prior-prompts-file {path}: {error}", field="prior_prompts_file"
        ) from error
    return tuple(line.strip() for line in lines if line.strip())


def cmd_train_lora(args: argparse.Namespace) -> int:
    from easel.datasets import DatasetLimits, prepare_dataset, read_summary
    from easel.models.catalog import ModelCatalog
    from easel.models.loras import LoraCatalog
    from easel.training.lora_config import lora_config

    # 1. check the settings and the name before anything is read or written
    settings = Settings()
    run_dir = args.out or settings.home / "training" / args.name
    model = args.model or settings.default_model
    if args.no_prior_words and args.prior_words:
        raise InvalidParams("give --prior-word or --no-prior-words, not both", field="prior_words")
    prior_words = () if args.no_prior_words else tuple(args.prior_words) or None
    config = lora_config(
        ModelCatalog(settings).get(model, explain=True).train_defaults,
        model=model,
        dataset=str(run_dir / "dataset"),
        out_dir=str(run_dir),
        name=args.name,
        trigger=args.trigger,
        steps=args.steps,
        rank=args.rank,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        size=args.size,
        train_text_encoder=args.train_text_encoder,
        prior_prompts=tuple(args.prior_prompts) + _read_prompts(args.prior_prompts_file),
        prior_images=args.prior_images,
        prior_words=prior_words,
        export_scale=args.export_scale,
        sample_every=args.sample_every,
        seed=args.seed,
        device=args.device,
    )
    loras = LoraCatalog(settings)
    if loras.path_for(args.name).exists():
        raise InvalidParams(
            f"a LoRA named {args.name!r} exists already ({loras.path_for(args.name)}); pick "
            "another --name",
            field="name",
        )
    # 2. the dataset: checked and copied into the run folder (kept there for a resumed run)
    dataset = Path(config.dataset)
    if not (dataset / "dataset.json").exists():
        limits = DatasetLimits.from_settings(
            settings, allow_missing_captions=args.allow_missing_captions
        )
        prepare_dataset(args.dataset, dataset, limits)
    summary = read_summary(dataset)
    print(
        f"dataset: {summary.images} images, {summary.captions} with captions -> {run_dir}",
        file=sys.stderr,
    )
    # 3. train (a progress bar per step), then publish into EASEL_HOME/loras
    from easel.training.job import publish_lora
    from easel.training.lora import train_lora

    result = train_lora(config, settings=settings)
    record = publish_lora(result, config, loras)
    heldout = f", held-out loss {result.heldout[-1][1]:.4f}" if result.heldout else ""
    print(f"saved {record.path} ({result.steps} steps, {result.seconds:.0f} s{heldout})")
    print(f'use it: easel generate "a {config.trigger}" --lora {config.name}')
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
        "--lora",
        metavar="NAME[:WEIGHT]",
        help="judge a LoRA trained on the hexagon dataset (python -m "
        "easel.training.tinyshapes.evaluate_lora dataset DIR): the new shape in new colours, "
        "and the usual prompts with and without it (report: ./eval/<model name>/lora-NAME)",
    )
    parser.add_argument(
        "--limit",
        type=int,
        help="at most N prompts per group (4 groups); with --editing, N cases per measure; "
        "with --lora, N usual prompts per group for the control (default 8)",
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

    from easel.training.tinyshapes.evaluate import evaluate, format_markdown

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
    if args.lora and (args.editing or args.prompts):
        raise InvalidParams("--lora cannot be used with --editing or --prompt", field="lora")
    model = args.model or Settings().default_model
    if args.lora:
        return _eval_lora(model, args)
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
            from easel.training.tinyshapes.evaluate_editing import evaluate_editing
            from easel.training.tinyshapes.evaluate_editing import format_markdown as format_editing

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


def _eval_lora(model: str, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from easel.models.loras import parse_lora_arg
    from easel.training.tinyshapes.evaluate_lora import evaluate_lora, format_markdown

    lora = parse_lora_arg(args.lora)
    name, weight = lora["id"], lora["weight"]
    out = args.out or Path("eval") / Path(model).name / f"lora-{name}"
    with tqdm(desc="eval", unit="img", file=sys.stderr) as bar:

        def on_progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        report = evaluate_lora(
            model, name, weight=weight, control=args.limit or 8, seed=args.seed, out=out,
            on_progress=on_progress,
        )  # fmt: skip
    print(format_markdown(report))
    print(f"report: {out / 'report.json'}  grid: {out / 'grid.png'}")
    return 0
