"""Weights load only from .safetensors: a pickled model (a diffusers folder saved with
``safe_serialization=False``, a .ckpt or .bin file) is refused by the catalog, by ``easel models
add``, by the loader and over HTTP, with a message that says how to convert it; a pickle is
never run (a booby-trapped one would create a marker file)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from fastapi.testclient import TestClient

from easel.config import Settings
from easel.domain import InvalidParams, ModelNotFound
from easel.models.catalog import ModelCatalog, pickled_weights
from easel.models.loader import ModelManager
from easel.services import Services
from tests.api.conftest import app_services, client  # noqa: F401  (shared fixtures)
from tests.jobs.conftest import settings  # noqa: F401  (shared fixture)
from tests.test_cli import _run

JOB = {"prompt": "a red circle", "num_inference_steps": 1, "width": 64, "height": 64}


class _Trap:
    """Unpickling this creates ``marker``: the proof that a pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.marker), "w")


@pytest.fixture(scope="module")
def pickled_sd(tiny_sd_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD saved with ``safe_serialization=False``: the UNet and VAE as .bin (recent
    transformers write the text encoder as safetensors whatever it is asked)."""
    folder = tmp_path_factory.mktemp("pickled") / "tiny-sd-bin"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.save_pretrained(folder, safe_serialization=False)
    assert (folder / "unet" / "diffusion_pytorch_model.bin").is_file()
    assert not list((folder / "unet").glob("*.safetensors"))
    return folder


@pytest.fixture
def trapped(pickled_sd: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of ``pickled_sd`` whose UNet and text encoder weights are booby-trapped pickles;
    returns (folder, marker)."""
    folder, marker = tmp_path / "trapped", tmp_path / "pickle-ran"
    shutil.copytree(pickled_sd, folder)
    torch.save(_Trap(marker), folder / "unet" / "diffusion_pytorch_model.bin")
    (folder / "text_encoder" / "model.safetensors").unlink()
    torch.save(_Trap(marker), folder / "text_encoder" / "pytorch_model.bin")
    return folder, marker


@pytest.fixture
def catalog(easel_home: Path) -> ModelCatalog:
    return ModelCatalog(Settings(home=easel_home))


def refusal(call: object, field: str) -> str:
    with pytest.raises(InvalidParams) as caught:
        call()  # type: ignore[operator]
    assert caught.value.field == field
    message = caught.value.message
    assert "pickled" in message and "only from .safetensors" in message, message
    assert "save_pretrained" in message, message  # how to convert
    return message


def test_the_catalog_refuses_a_folder_of_pickled_weights(
    catalog: ModelCatalog, pickled_sd: Path, tiny_sd_path: Path
) -> None:
    assert [p.relative_to(pickled_sd).as_posix() for p in pickled_weights(pickled_sd)] == [
        "unet/diffusion_pytorch_model.bin",
        "vae/diffusion_pytorch_model.bin",
    ]
    message = refusal(lambda: catalog.get(str(pickled_sd), explain=True), "model")
    assert "unet/diffusion_pytorch_model.bin" in message
    with pytest.raises(ModelNotFound, match="no usable model at"):  # a server's answer
        catalog.get(str(pickled_sd))
    refusal(lambda: catalog.add("mine", str(pickled_sd)), "source")
    refusal(lambda: catalog.add("mine", str(pickled_sd), family="sd"), "source")
    assert not catalog.settings.user_models_file.exists()  # nothing was added
    # the safetensors original, and a folder with both (diffusers reads the safetensors)
    assert catalog.get(str(tiny_sd_path)).available
    assert pickled_weights(tiny_sd_path) == []


@pytest.mark.parametrize("name", ["model.ckpt", "model.bin", "model.pt", "model.PTH"])
def test_a_pickled_checkpoint_file_is_refused_by_name_not_opened(
    catalog: ModelCatalog, tmp_path: Path, name: str
) -> None:
    marker = tmp_path / "pickle-ran"
    file = tmp_path / name
    torch.save(_Trap(marker), file)
    message = refusal(lambda: catalog.get(str(file), explain=True), "model")
    assert message.startswith(f"{name} is a pickled checkpoint")
    with pytest.raises(ModelNotFound, match="no usable model at"):
        catalog.get(str(file))
    refusal(lambda: catalog.add("mine", str(file), family="sd"), "source")
    assert not marker.exists() and not catalog.settings.user_models_file.exists()


def test_easel_models_add_refuses_pickles_in_one_line(
    easel_home: Path, pickled_sd: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "v1-5-pruned.ckpt"
    ckpt.write_bytes(b"PK\x03\x04 not opened")
    for argv in (
        ["models", "add", "mine", str(pickled_sd)],
        ["models", "add", "mine", str(ckpt), "--family", "sd"],
    ):
        code, _, err = _run(argv, capsys)
        assert code == 2 and "pickled" in err and len(err.strip().splitlines()) == 1, err
    code, out, _ = _run(["models", "list"], capsys)
    assert code == 0 and "mine" not in out


def test_an_entry_written_by_hand_is_unavailable_and_never_unpickled(
    easel_home: Path, trapped: tuple[Path, Path]
) -> None:
    folder, marker = trapped
    cpu = Settings(home=easel_home, device="cpu", dtype="float32")
    cpu.user_models_file.write_text(
        f'[models.old]\nfamily = "sd"\nsource = "{folder}"\n', encoding="utf-8"
    )
    catalog = ModelCatalog(cpu)
    assert {r.id: r.available for r in catalog.list()}["old"] is False
    refusal(lambda: catalog.get("old"), "model")
    refusal(lambda: ModelManager(cpu, catalog).get_pipeline("old"), "model")
    assert not marker.exists()


def test_diffusers_raises_rather_than_unpickle_with_use_safetensors(
    trapped: tuple[Path, Path],
) -> None:
    # what the loader's use_safetensors=True relies on (diffusers 0.42): a component with only
    # a .bin is an error, not a fallback to torch.load
    folder, marker = trapped
    with pytest.raises(OSError, match="safetensors"):
        StableDiffusionPipeline.from_pretrained(folder, use_safetensors=True)
    assert not marker.exists()


def test_a_converted_copy_loads_and_a_stray_pickle_beside_safetensors_is_never_read(
    easel_home: Path, pickled_sd: Path, tmp_path: Path
) -> None:
    # the conversion the refusal suggests, then the loader on the result
    converted = tmp_path / "converted"
    StableDiffusionPipeline.from_pretrained(pickled_sd).save_pretrained(converted)
    marker = tmp_path / "pickle-ran"
    torch.save(_Trap(marker), converted / "unet" / "diffusion_pytorch_model.bin")
    cpu = Settings(home=easel_home, device="cpu", dtype="float32", cpu_graphs=False)
    catalog = ModelCatalog(cpu)
    assert catalog.get(str(converted)).available
    loaded = ModelManager(cpu, catalog).get_pipeline(str(converted))
    assert isinstance(loaded.pipeline, StableDiffusionPipeline)
    assert not marker.exists()


@pytest.fixture
def root(app_services: Services) -> Iterator[dict[str, str]]:  # noqa: F811
    """Bearer headers of an admin key (admins may name model paths)."""
    _, secret = app_services.create_key("root", scopes=("admin",))
    yield {"Authorization": f"Bearer {secret}"}


def test_over_http_an_admin_naming_a_pickled_model_gets_the_404_of_a_missing_path(
    client: TestClient,  # noqa: F811
    app_services: Services,  # noqa: F811
    root: dict[str, str],
    pickled_sd: Path,
    tiny_sd_path: Path,
    tmp_path: Path,
) -> None:
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not opened")
    missing = client.post("/api/v1/jobs", json={**JOB, "model": "/no/such"}, headers=root)
    for source in (pickled_sd, ckpt):
        response = client.post("/api/v1/jobs", json={**JOB, "model": str(source)}, headers=root)
        assert response.status_code == missing.status_code == 404, response.text
        error = response.json()["error"]
        assert error["field"] == "model" and "only from .safetensors" in error["message"]
        # no path oracle: the answer is that of a path that does not exist
        assert error["message"] == missing.json()["error"]["message"].replace(
            "/no/such", str(source)
        )
    assert app_services.db.query("SELECT COUNT(*) FROM jobs")[0][0] == 0
    response = client.post("/api/v1/jobs", json={**JOB, "model": str(tiny_sd_path)}, headers=root)
    assert response.status_code == 202, response.text
