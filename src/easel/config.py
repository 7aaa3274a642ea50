"""Settings: one object, read from the environment (prefix ``EASEL_``).

Every field is documented here and in docs/CONFIG.md (a test keeps the two in step).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from platformdirs import user_data_dir
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

# Dynamic batching's default on the CPU (`Settings.max_batch`): the bundled model's images come
# 1.6x as fast in batches of 4 (docs/BENCHMARKS.md, "Dynamic batching")
CPU_MAX_BATCH = 4


def _default_home() -> Path:
    return Path(user_data_dir("easel", appauthor=False))


class Settings(BaseSettings):
    """Easel's settings. Build with ``Settings()`` (reads ``EASEL_*``) or pass fields directly."""

    model_config = SettingsConfigDict(env_prefix="EASEL_", extra="ignore")

    home: Path = Field(
        default_factory=_default_home,
        description="Folder holding easel.db, images/, datasets/, models/, loras/ and models.toml.",
    )
    default_model: str = Field(
        "tiny-shapes", description="Model id used when a request names none."
    )
    device: str = Field(
        "auto", description="Torch device for generation: auto, cpu, cuda, cuda:N or mps."
    )
    dtype: str = Field(
        "auto",
        description="Weights dtype: auto (bf16 on CUDA and on CPUs with native bf16, fp16 on mps, "
        "else fp32), float32, bfloat16 or float16.",
    )
    cpu_offload: bool = Field(
        False, description="Enable diffusers model CPU offload (saves GPU memory, slower)."
    )
    vae_tiling: bool = Field(
        False, description="Decode latents in tiles (large images with little memory)."
    )
    cpu_graphs: bool = Field(
        True,
        description="On the CPU, replay a small UNet's denoising calls as traced graphs "
        "(skips Python overhead; no effect on models over 50M UNet parameters).",
    )
    cpu_backend: Literal["auto", "openvino", "torch"] = Field(
        "auto",
        description="On the CPU, who runs a large UNet's denoising calls (and then the VAE "
        "decoder and CLIP text encoder): auto (OpenVINO for UNets over 50M parameters when the "
        "openvino extra is installed and the machine has the memory, else PyTorch), openvino "
        "(every UNet, small ones too), "
        "torch (PyTorch only).",
    )
    model_cache_gb: float = Field(
        8.0, description="Memory budget in GiB for loaded pipelines (least recently used go first)."
    )
    preview_every: int = Field(
        2, description="Send a preview image every N denoising steps (0 turns previews off)."
    )
    preview_taesd: bool = Field(
        True,
        description="Decode previews with the VAE's tiny decoder (TAESD family) when its "
        "weights are in the local Hugging Face cache; off: always the cheaper linear projection.",
    )
    host: str = Field("127.0.0.1", description="Address `easel serve` binds to.")
    port: int = Field(7860, description="Port `easel serve` listens on.")
    cpu_workers: int = Field(1, description="Number of generation workers when running on the CPU.")
    max_batch: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Dynamic batching: most images one pipeline call makes, from one job's "
        "images and compatible queued jobs' (same model, task, size, steps, scheduler, guidance "
        "and LoRAs); each job keeps its own seeds, pixels, progress and cancel. Unset (the "
        f"default): {CPU_MAX_BATCH} on the CPU, where the tests hold a batch's pixels equal to "
        "each job's alone; 1 (no batching) on a GPU, where that is not measured yet.",
    )
    batch_window_ms: float = Field(
        0.0,
        ge=0,
        le=10_000,
        description="Dynamic batching: how long a worker that took a job waits for compatible "
        "jobs to arrive before it starts, in milliseconds, when fewer than `max_batch` images "
        "are waiting (0: take only the jobs queued already).",
    )
    ray_address: str | None = Field(
        None,
        description="Run the workers as actors on this Ray cluster (`auto`: the cluster this "
        "machine belongs to, or a new one on it; else `HOST:PORT` or `ray://HOST:PORT`). "
        "Unset: one worker thread in the server, no Ray needed.",
    )
    ray_workers: int | None = Field(
        None,
        ge=1,
        description="Ray worker actors to keep (unset: one per GPU in the cluster, or on a "
        "cluster without GPUs one per `ray_cpus_per_worker` CPUs); follows nodes that join "
        "or leave.",
    )
    ray_cpus_per_worker: float = Field(
        2.0, gt=0, description="CPUs each Ray worker actor reserves on a cluster without GPUs."
    )
    ray_jobs_per_worker: int = Field(
        1, ge=1, le=8, description="Jobs the dispatcher keeps in flight per Ray worker."
    )
    ray_starve_after_s: float = Field(
        120.0,
        gt=0,
        description="A job waiting this long goes to the next free Ray worker, even one that "
        "must load its model (fairness across models).",
    )
    max_queued_jobs: int = Field(
        1000, description="Queued jobs accepted before new ones get 429 with Retry-After."
    )
    max_body_bytes: int = Field(
        1_000_000, description="Largest accepted request body in bytes (larger gets 413)."
    )
    max_upload_bytes: int = Field(
        20_000_000, description="Largest accepted input image upload in bytes (larger gets 413)."
    )
    max_upload_pixels: int = Field(
        4096 * 4096,
        description="Most pixels (width × height) an uploaded input image may have; larger ones "
        "are refused from their header, before decoding.",
    )
    max_prompt_chars: int = Field(
        2000, description="Longest accepted prompt (and training caption), in characters."
    )
    max_dataset_images: int = Field(
        1000, description="Most images a training dataset may have (at least 2 are needed)."
    )
    max_dataset_bytes: int = Field(
        512 * 1024 * 1024,
        description="Most bytes a training dataset may unpack to in all (counted while "
        "decompressing, whatever a zip's header says).",
    )
    max_dataset_upload_bytes: int = Field(
        200_000_000,
        description="Largest accepted dataset upload (POST /api/v1/datasets) in bytes "
        "(larger gets 413).",
    )
    max_pixels_per_job: int = Field(
        4 * 1024 * 1024,
        description="Budget for width × height × num_images of one job.",
    )
    max_streams: int = Field(
        1000,
        ge=1,
        description="Most event streams (GET /api/v1/jobs/{id}/events) open at once on the "
        "server; one more gets 503 with Retry-After.",
    )
    max_streams_per_client: int = Field(
        50,
        ge=1,
        description="Most event streams one client (an API key, or an IP address on a keyless "
        "server) may hold open at once; one more gets 429 with Retry-After.",
    )
    request_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Seconds an API request's body may take to arrive (an upload's: the longest "
        "pause between its parts); slower gets 408.",
    )
    session_days: float = Field(
        7.0, description="How long a web UI sign-in (session cookie) lasts, in days."
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names the server answers besides localhost, 127.0.0.1, ::1 and the "
        'bound address (a DNS-rebinding guard), e.g. ["easel.example.org"] behind a proxy. '
        "Empty and bound to all interfaces (0.0.0.0 or ::): any host (keys are required then).",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Web origins allowed to call the API from a browser (CORS), e.g. "
        '["https://app.example.org"]; empty: none (closed).',
    )
    min_free_disk_mb: int = Field(
        500,
        ge=0,
        description="Free space (MiB) the disk holding EASEL_HOME must keep: below it new jobs, "
        "uploads and datasets get 507 and a job's images are not written (the job fails saying "
        "so); health reports it. 0 turns the check off.",
    )
    max_attempts: int = Field(3, description="A job interrupted this many times is marked failed.")
    drain_timeout_s: float = Field(
        30.0, description="On SIGTERM, seconds to let the running job finish before requeueing it."
    )
    keep_jobs_days: float = Field(
        0.0,
        ge=0,
        description="Finished jobs older than this many days (by when they finished) are "
        "deleted with their events and images, rows and files; 0 keeps them forever.",
    )
    keep_uploads_days: float = Field(
        0.0,
        ge=0,
        description="Uploaded input images older than this many days are deleted, except those "
        "a queued or running job uses; 0 keeps them forever.",
    )
    prune_every_s: float = Field(
        3600.0,
        gt=0,
        description="How often the server deletes what keep_jobs_days and keep_uploads_days "
        "no longer keep (also once at start-up).",
    )

    webhook_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts a job's `webhook` URL may name: host names or IP addresses (these "
        'may be loopback or private), "*.example.com", or "*" (any host with a public address), '
        'e.g. ["hooks.example.com"]. Empty: webhooks are off (a job naming one gets 422).',
    )
    webhook_secret: SecretStr | None = Field(
        None,
        description="The server secret each key's webhook signing secret is derived from. "
        "Unset: one is generated on first use and kept in easel.db (backups carry it); set "
        "it to rotate every key's secret.",
    )
    webhook_attempts: int = Field(
        8, ge=1, le=100, description="Tries of one webhook delivery before it is given up."
    )
    webhook_backoff_s: float = Field(
        30.0,
        gt=0,
        description="Seconds before a failed webhook delivery is tried again; the wait doubles "
        "after each try (30 s and 8 tries: about an hour in all), at most an hour.",
    )
    webhook_timeout_s: float = Field(
        10.0,
        gt=0,
        le=300,
        description="Seconds a webhook delivery may take to connect, and to send or read each "
        "part (no redirect is followed; at most 4 KiB of an answer is read).",
    )

    def batch_limit(self, device: str) -> int:
        """`max_batch` on ``device`` ("cpu", "cuda:0", ...): as set, else its default there."""
        if self.max_batch is not None:
            return self.max_batch
        return CPU_MAX_BATCH if device == "cpu" else 1

    @property
    def db_path(self) -> Path:
        return self.home / "easel.db"

    @property
    def images_dir(self) -> Path:
        return self.home / "images"

    @property
    def datasets_dir(self) -> Path:
        return self.home / "datasets"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def loras_dir(self) -> Path:
        return self.home / "loras"

    @property
    def user_models_file(self) -> Path:
        return self.home / "models.toml"
