"""Crafted model files are parsed defensively, and a model path's error never tells whether the
path exists.

Each hostile file (a .safetensors header declaring 2^62 bytes, more bytes than the file, 200 MB
in a sparse file; a header nested 100,000 levels or not UTF-8; a model_index.json nested deep
or of 50 MB; a metadata.jsonl line or a PNG's easel chunk nested deep) is refused with a clear
InvalidParams naming the field, in milliseconds and a few MB (tracemalloc): by the catalog, by
`easel models add` and `easel loras add` (exit 2, one line), and over HTTP from an admin key
(a 4xx, never a 500, no job row). Over HTTP every unusable path (missing, not a model, a FIFO,
pickled, crafted) gets the same answer, the path text aside.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import struct
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image, PngImagePlugin

from easel.config import Settings
from easel.domain import InvalidParams, ModelNotFound
from easel.models.catalog import (
    MAX_SAFETENSORS_HEADER,
    UNUSABLE_PATH,
    ModelCatalog,
    safetensors_header,
)
from easel.models.loras import LoraCatalog
from easel.safejson import MAX_DEPTH, _check_shape, loads_bounded, read_json_bounded
from easel.services import Services
from tests.api.conftest import app_services, client  # noqa: F401  (shared fixtures)
from tests.jobs.conftest import settings  # noqa: F401  (shared fixture)
from tests.test_cli import _run

JOB = {"prompt": "a red circle", "num_inference_steps": 1, "width": 64, "height": 64}
DEEP = b"[" * 100_000 + b"]" * 100_000  # json.loads: RecursionError
DEEP_OBJECT = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
FAST_S = 2.0  # each refusal takes milliseconds; this leaves room for a busy machine
SMALL_BYTES = 8 << 20  # and a few MB of memory: never the declared size


def safetensors(path: Path, header: bytes, *, declared: int | None = None) -> Path:
    """A .safetensors file of ``header`` (its length field ``declared`` when given)."""
    length = len(header) if declared is None else declared
    path.write_bytes(struct.pack("<Q", length) + header)
    return path


def sparse_200mb(path: Path) -> Path:
    """A header length of 200 MB that the file really has (as a hole: nothing is written)."""
    with path.open("wb") as f:
        f.write(struct.pack("<Q", 200_000_000))
        f.truncate(8 + 200_000_000)
    return path


CRAFTED_SAFETENSORS: dict[str, Callable[[Path], Path]] = {
    "header length 2^62": lambda p: safetensors(p, b"{}", declared=2**62),
    "header length past the end": lambda p: safetensors(p, b'{"a": {}}', declared=4096),
    "200 MB header declared": sparse_200mb,
    "header nested 100,000 levels": lambda p: safetensors(p, DEEP),
    "object nested 100,000 levels": lambda p: safetensors(p, DEEP_OBJECT),
    "header not UTF-8": lambda p: safetensors(p, b'{"\xff\xfe": {"dtype": "F32"}}'),
    "shorter than a length": lambda p: (p.write_bytes(b"\x05\x00"), p)[1],
    "header not an object": lambda p: safetensors(p, b"[1, 2, 3]"),
    "shape not sizes": lambda p: safetensors(
        p, b'{"w": {"dtype": "F32", "shape": ["x"], "data_offsets": [0, 0]}}'
    ),
    "offsets past the data": lambda p: safetensors(
        p, b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4000]}}'
    ),
    "metadata not text": lambda p: safetensors(p, b'{"__metadata__": {"a": [1]}}'),
}
# what the reason (the CLI's message) says for each
REASONS = {
    "header length 2^62": f"at most {MAX_SAFETENSORS_HEADER}",
    "header length past the end": "4096-byte header in a 17-byte file",
    "200 MB header declared": "200000000-byte header",
    "header nested 100,000 levels": f"nests deeper than {MAX_DEPTH} levels",
    "object nested 100,000 levels": f"nests deeper than {MAX_DEPTH} levels",
    "header not UTF-8": "not UTF-8",
    "shorter than a length": "it has 2 bytes",
    "header not an object": "not a JSON object",
    "shape not sizes": "not a list of sizes",
    "offsets past the data": "outside the file",
    "metadata not text": "__metadata__",
}


def model_folder(path: Path, index: bytes | None = None, *, size: int | None = None) -> Path:
    """A folder whose model_index.json is ``index`` (or a sparse file of ``size`` bytes)."""
    path.mkdir()
    with (path / "model_index.json").open("wb") as f:
        f.write(index or b"")
        if size is not None:
            f.truncate(size)
    return path


# model_index.json files that cannot be parsed
BROKEN_INDEX: dict[str, Callable[[Path], Path]] = {
    "model_index.json nested 100,000 levels": lambda p: model_folder(p, DEEP),
    "model_index.json of 50 MB": lambda p: model_folder(p, b'{"_class_name": "', size=50 << 20),
    "model_index.json not UTF-8": lambda p: model_folder(p, b'{"_class_name": "\xff"}'),
    "model_index.json a list": lambda p: model_folder(p, b"[]"),
    "class name a list": lambda p: model_folder(p, b'{"_class_name": [1]}'),
}
# ones that parse, but name components that are not there
CRAFTED_FOLDERS = {
    **BROKEN_INDEX,
    "a component missing": lambda p: model_folder(
        p, b'{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet"]}'
    ),
    "a component outside the folder": lambda p: model_folder(
        p, b'{"_class_name": "StableDiffusionPipeline", "../../etc": ["diffusers", "UNet"]}'
    ),
    "a component with no name": lambda p: model_folder(
        p, b'{"_class_name": "StableDiffusionPipeline", "unet": []}'
    ),
}


def bounded(call: Callable[[], object]) -> tuple[BaseException, float, int]:
    """Run ``call``, which must raise; (the exception, seconds, peak bytes allocated)."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        call()
    except Exception as exc:  # noqa: BLE001  (returned for the caller to check)
        caught: BaseException = exc
    else:
        raise AssertionError("no error")
    finally:
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert seconds < FAST_S and peak < SMALL_BYTES, (seconds, peak)
    return caught, seconds, peak


@pytest.fixture
def catalog(easel_home: Path) -> ModelCatalog:
    return ModelCatalog(Settings(home=easel_home))


@pytest.fixture
def root(app_services: Services) -> Iterator[dict[str, str]]:  # noqa: F811
    """Bearer headers of an admin key (admins may name model paths)."""
    _, secret = app_services.create_key("root", scopes=("admin",))
    yield {"Authorization": f"Bearer {secret}"}


# --- the catalog and the CLI -------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CRAFTED_SAFETENSORS))
def test_a_crafted_safetensors_header_is_refused_fast_in_bounded_memory(
    case: str, catalog: ModelCatalog, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = CRAFTED_SAFETENSORS[case](tmp_path / "model.safetensors")
    # the parser itself: InvalidParams naming the field and the reason
    error, _, _ = bounded(lambda: safetensors_header(file, field="file"))
    assert isinstance(error, InvalidParams) and error.field == "file"
    assert "is not a readable .safetensors file" in error.message
    assert REASONS[case] in error.message, error.message
    # the catalog as the server uses it: the answer of a missing path
    error, _, _ = bounded(lambda: catalog.get(str(file)))
    assert isinstance(error, ModelNotFound) and error.field == "model"
    assert error.message == UNUSABLE_PATH.format(path=file)
    # the CLI, whose user owns the file: the reason, in one line, exit 2
    for argv in (
        ["models", "add", "mine", str(file)],
        ["loras", "add", str(file)],
        ["generate", "a red circle", "-m", str(file), "-o", str(tmp_path / "out")],
    ):
        start = time.perf_counter()
        code, out, err = _run(argv, capsys)
        assert time.perf_counter() - start < FAST_S
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
        assert REASONS[case] in err and "Traceback" not in err, err
    assert not catalog.settings.user_models_file.exists()
    assert LoraCatalog(catalog.settings).list() == []


@pytest.mark.parametrize("case", list(CRAFTED_FOLDERS))
def test_a_crafted_model_index_is_refused_fast_in_bounded_memory(
    case: str, catalog: ModelCatalog, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = CRAFTED_FOLDERS[case](tmp_path / "model")
    error, _, _ = bounded(lambda: catalog.get(str(folder)))
    assert isinstance(error, ModelNotFound) and error.field == "model"
    assert error.message == UNUSABLE_PATH.format(path=folder)
    error, _, _ = bounded(lambda: catalog.get(str(folder), explain=True))
    assert isinstance(error, InvalidParams) and error.field == "model"
    assert "not a diffusers pipeline folder" in error.message or "component" in error.message
    if case in BROKEN_INDEX:  # the others are added as entries not available yet
        code, _, err = _run(["models", "add", "mine", str(folder)], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_a_crafted_easel_json_in_a_real_model_folder(
    catalog: ModelCatalog, tiny_sd_path: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "trained"
    shutil.copytree(tiny_sd_path, folder)
    for content, reason in ((DEEP, "nests deeper"), (b"\xff{}", "not UTF-8")):
        (folder / "easel.json").write_bytes(content)
        error, _, _ = bounded(lambda: catalog.get(str(folder)))
        assert isinstance(error, ModelNotFound)
        assert error.message == UNUSABLE_PATH.format(path=folder)
        with pytest.raises(InvalidParams, match=f"cannot read .*easel.json: it .*{reason}"):
            catalog.get(str(folder), explain=True)
    (folder / "easel.json").write_text('{"defaults": {"width": 64}}')
    assert catalog.get(str(folder)).defaults["width"] == 64
    (folder / "easel.json").write_text('{"train_lora": ["circle"]}')
    with pytest.raises(InvalidParams, match="`train_lora` must be an object"):
        catalog.get(str(folder), explain=True)
    for train_lora, says in (
        ('{"learning-rate": 0.1}', "no setting 'learning-rate'"),
        ('{"prior_words": "circle"}', "`train_lora.prior_words` must be a list of words"),
        ('{"prior_words": [5]}', "must be a list of words"),
        ('{"steps": 1.5}', "`train_lora.steps` must be a whole number"),
        ('{"train_text_encoder": 1}', "must be true or false"),
    ):
        (folder / "easel.json").write_text(f'{{"train_lora": {train_lora}}}')
        with pytest.raises(InvalidParams, match=says):
            catalog.get(str(folder), explain=True)
    (folder / "easel.json").write_text('{"train_lora": {"prior_words": ["circle"]}}')
    assert catalog.get(str(folder)).train_defaults == {"prior_words": ["circle"]}


def test_a_crafted_lora_record_is_an_invalid_params(catalog: ModelCatalog) -> None:
    loras = LoraCatalog(catalog.settings)
    loras.folder.mkdir(parents=True)
    loras.path_for("ink").write_bytes(b"weights")
    (loras.folder / "ink.json").write_bytes(DEEP)
    error, _, _ = bounded(lambda: loras.get("ink"))
    assert isinstance(error, InvalidParams) and error.field == "lora"
    assert "nests deeper" in error.message


@pytest.mark.timeout(30)
def test_a_fifo_named_like_a_model_is_refused_without_blocking(
    catalog: ModelCatalog, tmp_path: Path
) -> None:
    # a plain open() would wait for a writer forever
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(InvalidParams, match="not a regular file"):
        safetensors_header(fifo)
    folder = tmp_path / "fifo-model"
    folder.mkdir()
    os.mkfifo(folder / "model_index.json")
    with pytest.raises(InvalidParams, match="not a regular file"):
        read_json_bounded(folder / "model_index.json", field="model")
    for path in (fifo, folder):
        with pytest.raises(ModelNotFound) as caught:
            catalog.get(str(path))
        assert caught.value.message == UNUSABLE_PATH.format(path=path)


# --- over HTTP ----------------------------------------------------------------------------------


def test_over_http_an_admin_naming_a_crafted_file_gets_a_4xx_and_no_job(
    client: TestClient,  # noqa: F811
    app_services: Services,  # noqa: F811
    root: dict[str, str],
    tmp_path: Path,
) -> None:
    files = [
        make(tmp_path / f"{i}.safetensors") for i, make in enumerate(CRAFTED_SAFETENSORS.values())
    ]
    files += [make(tmp_path / f"folder-{i}") for i, make in enumerate(CRAFTED_FOLDERS.values())]
    for path in files:
        start = time.perf_counter()
        response = client.post("/api/v1/jobs", json={**JOB, "model": str(path)}, headers=root)
        assert time.perf_counter() - start < FAST_S
        assert response.status_code == 404, response.text
        error = response.json()["error"]
        assert error == {
            "type": "ModelNotFound",
            "message": UNUSABLE_PATH.format(path=path),
            "field": "model",
        }
    assert app_services.db.query("SELECT COUNT(*) FROM jobs")[0][0] == 0
    assert client.get("/api/v1/health").status_code == 200


def test_no_path_oracle_every_unusable_path_gets_the_missing_paths_answer(
    client: TestClient,  # noqa: F811
    root: dict[str, str],
    tmp_path: Path,
    tiny_sd_path: Path,
) -> None:
    plain = tmp_path / "notes"
    plain.mkdir()
    (plain / "readme.txt").write_text("not a model")
    unsupported = model_folder(tmp_path / "other", b'{"_class_name": "AudioLDMPipeline"}')
    ckpt = tmp_path / "old.ckpt"
    ckpt.write_bytes(b"PK\x03\x04 never opened")
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    unknown = tmp_path / "mystery.safetensors"
    safetensors(unknown, b'{"w": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}')
    text_file = tmp_path / "passwd"
    text_file.write_text("root:x:0:0\n")
    paths = {
        "missing": tmp_path / "nothing-here",
        "missing .safetensors": tmp_path / "nothing.safetensors",
        "a folder that is not a model": plain,
        "a model of no Easel family": unsupported,
        "a pickled checkpoint": ckpt,
        "a FIFO": fifo,
        "a checkpoint of unknown family": unknown,
        "a crafted header": CRAFTED_SAFETENSORS["header nested 100,000 levels"](
            tmp_path / "deep.safetensors"
        ),
        "a plain file": text_file,
        "a file inside a file": text_file / "x",
        "a folder under root": Path("/proc/self"),
    }

    def answer(path: Path) -> tuple[int, dict[str, Any]]:
        response = client.post("/api/v1/jobs", json={**JOB, "model": str(path)}, headers=root)
        return response.status_code, response.json()["error"]

    expected = answer(paths["missing"])
    assert expected[0] == 404
    for what, path in paths.items():
        status, error = answer(path)
        same = json.loads(json.dumps(expected[1]).replace(str(paths["missing"]), str(path)))
        assert (status, error) == (404, same), what
    # and a usable one is taken
    ok = client.post("/api/v1/jobs", json={**JOB, "model": str(tiny_sd_path)}, headers=root)
    assert ok.status_code == 202, ok.text


def test_the_catalogs_message_for_a_missing_path_equals_a_non_model_folders(
    catalog: ModelCatalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "exists"
    folder.mkdir()
    missing = tmp_path / "absent"
    messages = []
    for path in (folder, missing):
        with pytest.raises(ModelNotFound) as caught:
            catalog.get(str(path))
        messages.append(caught.value.message.replace(str(path), "PATH"))
    assert messages[0] == messages[1]
    # bare names and hub-like names too: a relative folder that exists answers as one that not
    monkeypatch.chdir(tmp_path)
    (tmp_path / "someone" / "thing").mkdir(parents=True)
    for name in ("exists", "someone/thing"):
        with pytest.raises(ModelNotFound) as there:
            catalog.get(name)
        with pytest.raises(ModelNotFound) as absent:
            catalog.get(name + "x")
        assert there.value.message.replace(name, "N") == absent.value.message.replace(
            name + "x", "N"
        )


# --- datasets and images ------------------------------------------------------------------------


def test_a_deeply_nested_metadata_line_is_refused_and_nothing_is_stored(
    client: TestClient,  # noqa: F811
    app_services: Services,  # noqa: F811
) -> None:
    images = []
    for colour in ((200, 0, 0), (0, 0, 200)):
        image = io.BytesIO()
        Image.new("RGB", (32, 32), colour).save(image, format="PNG")
        images.append(image.getvalue())
    for line, reason in (
        (b'{"file_name": "a.png", "text": ' + DEEP + b"}", "nests deeper than"),
        (DEEP_OBJECT, "nests deeper than"),
        (b'{"file_name": "a.png", "text": "a"', "is not JSON"),
    ):
        files = [
            ("files", ("a.png", images[0])),
            ("files", ("b.png", images[1])),
            ("files", ("metadata.jsonl", line + b"\n")),
        ]
        start = time.perf_counter()
        response = client.post("/api/v1/datasets", files=files)
        assert time.perf_counter() - start < FAST_S
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["field"] == "dataset" and "metadata.jsonl line 1" in error["message"]
        assert reason in error["message"], error
    root = app_services.settings.datasets_dir
    assert not root.exists() or not list(root.iterdir())


def test_a_png_whose_easel_chunk_is_nested_deep_is_an_invalid_image(
    app_services: Services,  # noqa: F811
) -> None:
    for chunk in (DEEP.decode(), "[1, 2]"):
        info = PngImagePlugin.PngInfo()
        info.add_text("easel", chunk)
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16)).save(buffer, format="PNG", pnginfo=info)
        png = buffer.getvalue()
        error, _, _ = bounded(lambda: app_services.read_image_info(png))  # noqa: B023
        assert isinstance(error, InvalidParams) and error.field == "image"
        assert "easel chunk" in error.message


def test_easel_info_on_a_crafted_png_is_one_line(
    easel_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for key, text, expected in (
        ("easel", DEEP.decode(), "nests deeper than"),
        ("parameters", 'a cat\nSteps: 2, Sampler: Euler, Seed: 1, Note: "\\q"', None),
    ):
        info = PngImagePlugin.PngInfo()
        info.add_text(key, text)
        path = tmp_path / f"{key}.png"
        Image.new("RGB", (16, 16)).save(path, format="PNG", pnginfo=info)
        code, out, err = _run(["info", str(path), "--json"], capsys)
        if expected is None:  # an escape JSON does not know is kept as written
            assert code == 0 and json.loads(out)["prompt"] == "a cat", err
        else:
            assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err


# --- the bounded reader itself ------------------------------------------------------------------


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def test_the_nesting_count_is_exact_on_strings_with_brackets_quotes_and_backslashes() -> None:
    rng = random.Random(7)
    leaves = [1, None, 'a\\"[', "x]]{", "\\\\", "\\", '"', "[[[", "}}}"]

    def build(depth: int, budget: list[int]) -> Any:
        if depth == 0 or budget[0] <= 0 or rng.random() < 0.1:
            return rng.choice(leaves)
        budget[0] -= 1
        if rng.random() < 0.5:
            return [build(depth - 1, budget) for _ in range(rng.randint(1, 2))]
        return {f'k{i}\\"{{': build(depth - 1, budget) for i in range(rng.randint(1, 2))}

    near = 0
    for _ in range(400):
        value = build(rng.randint(MAX_DEPTH - 8, MAX_DEPTH + 8), [200])
        refused = _check_shape(json.dumps(value).encode(), MAX_DEPTH, 10**6) is not None
        assert refused == (_depth(value) > MAX_DEPTH), value
        near += _depth(value) in (MAX_DEPTH, MAX_DEPTH + 1)
    assert near > 10  # the boundary itself was tried
    # a million items and more are refused before parsing; depth and size limits name the field
    with pytest.raises(InvalidParams, match="more than 1000 items"):
        loads_bounded(b"[" + b"0," * 2000 + b"0]", what="x", field="f", max_items=1000)
    with pytest.raises(InvalidParams, match="at most 10 are read") as caught:
        loads_bounded(b"[" * 11, what="x", field="f", max_bytes=10)
    assert caught.value.field == "f"
    with pytest.raises(InvalidParams, match="cannot be parsed"):  # a 5000-digit integer
        loads_bounded(b"1" * 5000, what="x", field="f")
    assert loads_bounded('{"a": ["\\\\", "]"]}', what="x", field="f") == {"a": ["\\", "]"]}
