"""`train_lora` as a queued job, and the step both the job and the CLI end with: publishing
the finished LoRA into EASEL_HOME/loras, where generation finds it.

    trainer = LoraTrainer(settings, loras)       # services.build_services makes one per worker
    record = trainer.train(job_id, params, on_progress=..., on_samples=..., is_canceled=...)

A job's run folder is ``EASEL_HOME/training/<job id>``: the worker that picks the job up again
after a crash or a restart finds its checkpoints there and goes on from the last one.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from easel.config import Settings
from easel.domain import (
    CancelCheck,
    EaselError,
    GenerationParams,
    InvalidParams,
    LoraRecord,
    TrainProgress,
    TrainSamples,
)
from easel.models.loras import LoraCatalog
from easel.training.loop import TrainStep
from easel.training.lora import LoraResult, Samples, train_lora
from easel.training.lora_config import LoraConfig, config_from_params


def publish_lora(
    result: LoraResult,
    config: LoraConfig,
    loras: LoraCatalog,
    *,
    job_id: str | None = None,
    owner: str | None = None,
) -> LoraRecord:
    """Copy the trained LoRA into the LoRA folder as ``NAME.safetensors``, its loss plot and
    last sample grid beside it (``NAME.loss.png``, ``NAME.samples.png``), and record it.

    Never replaces another LoRA: a name taken since the run began (``easel loras add``, a CLI
    run) raises InvalidParams(field="name"), and the file stays in the run folder. Only the
    same job publishing again (after a crash between publishing and finishing) replaces its own.
    """
    target = loras.path_for(config.name)
    if target.exists() and (job_id is None or _published_by(loras, config.name) != job_id):
        raise InvalidParams(
            f"a LoRA named {config.name!r} exists already, made since this run began; the "
            f"trained LoRA is kept at {result.lora_file}: add it under another name with "
            f"`easel loras add {result.lora_file} --name OTHER`",
            field="name",
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_suffix(".tmp")
    shutil.copyfile(result.lora_file, temp)
    temp.replace(target)
    run = Path(config.out_dir)
    if (run / "loss.png").exists():
        shutil.copyfile(run / "loss.png", target.with_suffix(".loss.png"))
    if grids := sorted((run / "samples").glob("step*.png")):
        shutil.copyfile(grids[-1], target.with_suffix(".samples.png"))
    record = LoraRecord(
        id=config.name,
        path=str(target),
        family=result.family,
        base_model=result.base_model,
        trigger=config.trigger,
        rank=config.rank,
        steps=result.steps,
        source="trained",
        job_id=job_id,
        owner=owner,
        extra={
            "final_loss": round(result.final_loss, 5),
            "best_step": result.best_step,
            "heldout": [[step, round(loss, 5)] for step, loss in result.heldout],
            "learning_rate": config.learning_rate,
            "batch_size": config.batch_size,
            "export_scale": config.export_scale,
            "prior_words": list(config.prior_words),
            "seconds": round(result.seconds, 1),
        },
    )
    loras.save_record(record)
    return record


def _published_by(loras: LoraCatalog, name: str) -> str | None:
    """The id of the job that made the LoRA ``name`` (None: added, or unreadable)."""
    try:
        return loras.get(name).job_id
    except EaselError:
        return None


class LoraTrainer:
    """Runs ``train_lora`` jobs on a worker (one at a time, like generations)."""

    def __init__(self, settings: Settings, loras: LoraCatalog) -> None:
        self.settings = settings
        self.loras = loras

    def train(
        self,
        job_id: str,
        params: GenerationParams,
        *,
        owner: str | None = None,
        on_progress: Callable[[TrainProgress], None],
        on_samples: Callable[[TrainSamples], None],
        is_canceled: CancelCheck,
    ) -> LoraRecord:
        """Train (or go on training) the job's LoRA, then publish it as ``owner``'s (the job's
        key). Raises Canceled."""
        assert params.dataset
        run_dir = self.settings.home / "training" / job_id
        dataset = self.settings.datasets_dir / params.dataset
        # the params hold the model's training defaults as the server filled them in at submit
        # (a job queued before a field existed trains with LoraConfig's default for it)
        config = config_from_params(params, str(dataset), str(run_dir))

        def report_step(step: TrainStep) -> None:
            fraction = max(step.fraction, 1e-9)
            eta = step.elapsed_s * (1 - fraction) / fraction if step.step > 1 else None
            on_progress(TrainProgress(step.step, config.steps, step.loss, step.lr, eta))

        def report_samples(samples: Samples) -> None:
            on_samples(
                TrainSamples(samples.step, samples.images, samples.prompts, samples.heldout_loss)
            )

        result = train_lora(
            config,
            on_step=report_step,
            on_sample=report_samples,
            is_canceled=is_canceled,
            settings=self.settings,
        )
        return publish_lora(result, config, self.loras, job_id=job_id, owner=owner)
