"""Training datasets (easel.datasets): the layouts accepted, a clean copy that load_dataset
reads back, and every bad or hostile input refused with InvalidParams(field="dataset"),
leaving nothing behind (no target, no partial copy, nothing outside the target)."""

from __future__ import annotations

import io
import json
import stat
import time
import tracemalloc
import uuid
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from easel import datasets
from easel.datasets import DatasetLimits, load_dataset, prepare_dataset, prepare_upload
from easel.domain import EaselError, InvalidParams

GIB = 1 << 30
_BOMB: dict[str, Path] = {}  # built once per session, whichever test module asks first


def png(colour: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (16, 12)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_with_exif() -> bytes:
    image = Image.new("RGB", (20, 10), (10, 200, 10))
    exif = Image.Exif()
    exif[0x010E] = "secret description"  # ImageDescription
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    return buffer.getvalue()


CAPTIONED = {
    "cat.png": png(),
    "cat.txt": "a red cat\n",
    "dog.png": png((0, 0, 200)),
    "dog.txt": "a blue dog",
}


def write_folder(root: Path, files: dict[str, bytes | str]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
    return root


def write_zip(path: Path, files: dict[str, bytes | str]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(zipfile.ZipInfo(name), data)  # ZipInfo: the name exactly as given
    return path


def zip_bytes(files: dict[str, bytes | str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(zipfile.ZipInfo(name), data)
    return buffer.getvalue()


def symlink_zip(target_name: str = "/etc/passwd") -> bytes:
    """A dataset zip whose third member is a symbolic link (S_IFLNK in external_attr)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a.png", png())
        archive.writestr("a.txt", "a")
        link = zipfile.ZipInfo("b.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        link.create_system = 3  # unix
        archive.writestr(link, target_name)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def zip_bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1 MB zip of a captioned dataset whose second image is 1 GiB of zeros (its header
    says so), written a MiB at a time."""
    if "path" not in _BOMB:
        path = tmp_path_factory.mktemp("bomb") / "bomb.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
            archive.writestr("a.png", png())
            archive.writestr("a.txt", "a red picture")
            archive.writestr("zeros.txt", "a black picture")
            with archive.open("zeros.png", "w") as member:
                chunk = bytes(1 << 20)
                for _ in range(GIB // len(chunk)):
                    member.write(chunk)
        _BOMB["path"] = path
    return _BOMB["path"]


def refused(source: Path, target: Path, limits: DatasetLimits | None = None) -> str:
    """prepare_dataset's message for a refused dataset, after checking nothing was left."""
    with pytest.raises(InvalidParams) as caught:
        prepare_dataset(source, target, limits or DatasetLimits())
    assert caught.value.field == "dataset"
    assert not target.exists()
    if target.parent.exists():
        assert list(target.parent.iterdir()) == [], "a partial copy was left behind"
    return caught.value.message


# --- what is accepted ---------------------------------------------------------------------------


def test_a_folder_with_txt_captions_is_copied_clean(tmp_path: Path) -> None:
    source = write_folder(
        tmp_path / "src", {**CAPTIONED, "bird.jpg": jpeg_with_exif(), "bird.txt": "  a bird  "}
    )
    summary = prepare_dataset(source, tmp_path / "out" / "ds", DatasetLimits())
    assert (summary.images, summary.captions, summary.missing_captions) == (3, 3, [])
    dataset = load_dataset(tmp_path / "out" / "ds")
    assert [(i.source, i.caption) for i in dataset.items] == [
        ("bird.jpg", "a bird"),
        ("cat.png", "a red cat"),
        ("dog.png", "a blue dog"),
    ]
    for item in dataset.items:
        assert item.image.is_absolute() and item.image.parent == dataset.folder / "images"
        with Image.open(item.image) as image:
            assert image.format == "PNG" and image.size == (item.width, item.height)
            assert "exif" not in image.info  # nothing but the pixels is kept
    assert (dataset.items[0].width, dataset.items[0].height) == (20, 10)
    assert sorted(p.name for p in (tmp_path / "out" / "ds").iterdir()) == ["dataset.json", "images"]
    manifest = json.loads((tmp_path / "out" / "ds" / "dataset.json").read_text())
    assert manifest["items"][1] == {
        "file": "images/cat.png",
        "source": "cat.png",
        "caption": "a red cat",
        "width": 16,
        "height": 12,
    }
    assert summary.bytes == sum(p.stat().st_size for p in dataset.folder.glob("images/*"))


def test_metadata_jsonl_with_text_or_caption(tmp_path: Path) -> None:
    lines = [
        {"file_name": "cat.png", "text": "a red cat"},
        {"file_name": "./dog.png", "caption": "a blue dog", "extra": 1},
    ]
    metadata = "\n".join(json.dumps(line) for line in lines) + "\n\n"
    source = write_folder(
        tmp_path / "src",
        {"cat.png": png(), "dog.png": png((0, 0, 200)), "metadata.jsonl": metadata},
    )
    prepare_dataset(source, tmp_path / "ds", DatasetLimits())
    assert [i.caption for i in load_dataset(tmp_path / "ds").items] == ["a red cat", "a blue dog"]


@pytest.mark.parametrize("top", ["", "my dataset/"])
@pytest.mark.parametrize("layout", ["txt", "metadata"])
def test_a_zip_at_its_root_or_in_one_top_folder(tmp_path: Path, top: str, layout: str) -> None:
    if layout == "txt":
        files: dict[str, bytes | str] = dict(CAPTIONED)
    else:
        files = {
            "cat.png": png(),
            "dog.png": png(),
            "metadata.jsonl": '{"file_name": "cat.png", "text": "a red cat"}\n'
            '{"file_name": "dog.png", "text": "a blue dog"}\n',
        }
    junk = {
        "__MACOSX/._cat.png": b"\0\5\26\7",
        f"{top}.DS_Store": b"\0\0\0\1Bud1",
        f"{top}Thumbs.db": b"\xd0\xcf",
        f"{top}README.md": "about this dataset",
    }
    archive = write_zip(tmp_path / "ds.zip", {f"{top}{k}": v for k, v in files.items()} | junk)
    summary = prepare_dataset(archive, tmp_path / "out", DatasetLimits())
    assert (summary.images, summary.captions) == (2, 2)
    assert [i.caption for i in load_dataset(tmp_path / "out").items] == ["a red cat", "a blue dog"]


def test_uploads_as_files_or_one_zip(tmp_path: Path) -> None:
    files = [(name, v.encode() if isinstance(v, str) else v) for name, v in CAPTIONED.items()]
    assert prepare_upload(files, tmp_path / "a", DatasetLimits()).captions == 2
    assert (
        prepare_upload([("x.zip", zip_bytes(CAPTIONED))], tmp_path / "b", DatasetLimits()).images
        == 2
    )
    with pytest.raises(InvalidParams, match="one .zip on its own"):
        prepare_upload([("x.zip", zip_bytes(CAPTIONED)), *files], tmp_path / "c", DatasetLimits())
    with pytest.raises(InvalidParams, match="goes up a folder"):
        prepare_upload([("../cat.png", png()), *files[1:]], tmp_path / "d", DatasetLimits())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_missing_captions_are_named_or_allowed(tmp_path: Path) -> None:
    uncaptioned = {f"img{i:02d}.png": png() for i in range(12)}
    source = write_folder(tmp_path / "src", {**CAPTIONED, **uncaptioned, "img00.txt": "  \n"})
    message = refused(source, tmp_path / "out" / "ds")
    assert message.startswith("12 of 14 images have no caption: img00.png, img01.png")
    assert "img09.png and 2 more" in message and "img10.png" not in message
    assert "add a .txt beside each" in message and "allow_missing_captions" in message
    summary = prepare_dataset(
        source, tmp_path / "out" / "ds", DatasetLimits(allow_missing_captions=True)
    )
    assert summary.images == 14 and summary.captions == 2
    assert summary.missing_captions == sorted(uncaptioned)
    items = {i.source: i for i in load_dataset(tmp_path / "out" / "ds").items}
    assert items["img03.png"].caption == "" and items["cat.png"].caption == "a red cat"
    assert not (tmp_path / "out" / "ds" / "images" / "img03.txt").exists()


# --- what is refused ----------------------------------------------------------------------------


def test_a_non_image_named_png_is_refused(tmp_path: Path) -> None:
    source = write_folder(
        tmp_path / "src", {**CAPTIONED, "zebra.png": b"not an image\n" * 10, "zebra.txt": "z"}
    )
    message = refused(source, tmp_path / "out" / "ds")
    assert "zebra.png is not a PNG, JPEG or WebP image" in message


def test_too_many_pixels_or_bytes_are_refused(tmp_path: Path) -> None:
    source = write_folder(tmp_path / "src", CAPTIONED)
    message = refused(source, tmp_path / "out" / "a", DatasetLimits(max_pixels=100))
    assert "at most 100 pixels" in message and "16×12" in message
    # the running count while reading, not the sizes the listing gave
    message = refused(source, tmp_path / "out" / "b", DatasetLimits(max_bytes=100))
    assert "at most 100 are allowed" in message


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("../evil.txt", "goes up a folder"),
        ("ok/../../evil.txt", "goes up a folder"),
        (f"/tmp/easel-evil-{uuid.uuid4().hex}", "is an absolute path"),
        ("C:/evil.txt", "drive letter"),
        ("..\\evil.txt", "backslash"),
    ],
    ids=["parent", "nested-parent", "absolute", "drive", "backslash"],  # the same in every process
)
def test_a_zip_member_escaping_the_target_is_refused(
    tmp_path: Path, name: str, reason: str
) -> None:
    archive = write_zip(tmp_path / "ds.zip", {**CAPTIONED, name: "pwned"})
    message = refused(archive, tmp_path / "out" / "ds")
    assert reason in message and "unsafe path" in message
    assert [p.name for p in tmp_path.rglob("*") if "evil" in p.name] == []
    assert not Path(name).exists()  # not even the absolute one
    assert [p.name for p in tmp_path.iterdir()] == ["ds.zip"]  # not even the target's parent


def test_symlinks_are_refused(tmp_path: Path) -> None:
    (tmp_path / "symlink.zip").write_bytes(symlink_zip())
    assert "symbolic link (b.png)" in refused(tmp_path / "symlink.zip", tmp_path / "out" / "a")
    source = write_folder(tmp_path / "src", CAPTIONED)
    (source / "passwd.png").symlink_to("/etc/passwd")
    assert "passwd.png in the dataset folder is a symbolic link" in refused(
        source, tmp_path / "out" / "b"
    )


def test_the_layout_is_checked(tmp_path: Path) -> None:
    cases: dict[str, tuple[dict[str, bytes | str], str]] = {
        "nested zip": ({"more.zip": zip_bytes(CAPTIONED)}, "zips inside the dataset are refused"),
        "subfolder": ({"sub/x.png": png()}, "files in subfolders are not read: sub/x.png"),
        "other file": ({"notes.pdf": b"%PDF"}, "or metadata.jsonl: notes.pdf; remove them"),
        "orphan caption": (
            {"kat.txt": "typo"},
            "captions without an image of the same name: kat.txt",
        ),
        "two captions": (
            {"metadata.jsonl": '{"file_name": "cat.png", "text": "again"}'},
            "cat.png has two captions (cat.txt and metadata.jsonl line 1)",
        ),
        "metadata names nothing": (
            {"metadata.jsonl": '\n{"file_name": "cow.png", "text": "moo"}'},
            "metadata.jsonl line 2 names 'cow.png', which is not an image",
        ),
        "metadata not json": ({"metadata.jsonl": "{oops"}, "metadata.jsonl line 1 is not JSON"),
        "metadata without text": (
            {"metadata.jsonl": '{"file_name": "cat.png"}'},
            '"text" (or "caption") string for cat.png',
        ),
        "not utf-8": ({"cat.txt": b"\xff\xfe\xfa"}, "cat.txt is not UTF-8 text"),
        "same stem": ({"cat.jpg": png()}, "two images are named cat"),
        "long caption": ({"dog.txt": "x" * 2001}, "a caption may have at most 2000 characters"),
    }
    for what, (extra, expected) in cases.items():
        source = write_folder(tmp_path / what, {**CAPTIONED, **extra})
        assert expected in refused(source, tmp_path / "out" / what), what


def test_the_number_of_images_is_checked(tmp_path: Path) -> None:
    one = write_folder(tmp_path / "one", {"cat.png": png(), "cat.txt": "a cat"})
    assert "a dataset needs 2 to 1000 images (found 1)" in refused(one, tmp_path / "out" / "a")
    empty = write_folder(tmp_path / "empty", {".DS_Store": b"x"})
    assert "(found 0; images are .png" in refused(empty, tmp_path / "out" / "b")
    many = write_folder(tmp_path / "many", {f"{i}.png": png() for i in range(4)})
    limits = DatasetLimits(max_images=3, allow_missing_captions=True)
    assert "2 to 3 images (found 4)" in refused(many, tmp_path / "out" / "c", limits)
    members = write_zip(tmp_path / "m.zip", {f"{i}.txt": "x" for i in range(120)})
    assert "at most 105" in refused(members, tmp_path / "out" / "d", DatasetLimits(max_images=1))


def test_a_damaged_image_after_good_ones_leaves_no_partial_copy(tmp_path: Path) -> None:
    whole = png()
    source = write_folder(tmp_path / "src", {**CAPTIONED, "zz.png": whole[:-30], "zz.txt": "z"})
    assert "zz.png is damaged or truncated" in refused(source, tmp_path / "out" / "ds")


def test_not_a_dataset(tmp_path: Path) -> None:
    (tmp_path / "x.tar").write_bytes(b"tar")
    assert "must be a folder or a .zip" in refused(tmp_path / "x.tar", tmp_path / "out" / "a")
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 and nothing else")
    assert "not a readable .zip" in refused(tmp_path / "broken.zip", tmp_path / "out" / "b")
    assert "is not a folder or a .zip" in refused(tmp_path / "nope", tmp_path / "out" / "c")
    with pytest.raises(InvalidParams, match="not a prepared dataset"):
        load_dataset(tmp_path)
    (tmp_path / "taken").mkdir()
    with pytest.raises(EaselError, match="already exists"):
        prepare_dataset(
            write_folder(tmp_path / "src", CAPTIONED), tmp_path / "taken", DatasetLimits()
        )


# --- bombs --------------------------------------------------------------------------------------


def test_a_zip_bomb_is_refused_from_its_header(zip_bomb: Path, tmp_path: Path) -> None:
    assert zip_bomb.stat().st_size < 2_000_000
    started = time.perf_counter()
    message = refused(zip_bomb, tmp_path / "out" / "ds")
    assert time.perf_counter() - started < 1.0
    assert f"unpacks to {GIB + len(png()) + 28} bytes; at most {512 << 20} are allowed" in message


def test_a_zip_bomb_is_refused_while_unpacking_whatever_its_header_says(
    zip_bomb: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the header check gone (a header may lie), the running count stops the unpacking at
    max_bytes: never 1 GiB in memory, nothing written."""
    monkeypatch.setattr(datasets, "_check_declared_sizes", lambda *args: None)
    # only the dataset's total applies (64 MiB, to keep the test's memory small)
    limits = DatasetLimits(max_file_bytes=2 * GIB, max_bytes=64 << 20)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        message = refused(zip_bomb, tmp_path / "out" / "ds", limits)
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f"unpacks to more than {64 << 20} bytes" in message
    assert seconds < 5
    # what was unpacked stays in memory until refused: at most max_bytes and a chunk, not 1 GiB
    assert peak < (64 << 20) + (8 << 20)
    # and the per-image cap stops it far sooner
    message = refused(zip_bomb, tmp_path / "out" / "ds", DatasetLimits())
    assert "zeros.png is larger than 20000000 bytes" in message


@pytest.mark.parametrize("caption", [b"a \x00 b", b"esc \x1b[0m", b"del \x7f", b"bell \x07"])
def test_control_characters_in_captions_are_refused_not_stripped(
    tmp_path: Path, caption: bytes
) -> None:
    files = {"a.png": png(), "a.txt": caption, "b.png": png((0, 0, 200)), "b.txt": "blue"}
    message = refused(write_folder(tmp_path / "set", files), tmp_path / "out" / "copy")
    assert message.startswith("a.txt holds U+00"), message


@pytest.mark.parametrize("text", ['"a \\ud800"', '"\\udfff"', '"nul \\u0000"'])
def test_surrogates_and_nul_in_metadata_jsonl_are_refused(tmp_path: Path, text: str) -> None:
    lines = f'{{"file_name": "a.png", "text": {text}}}\n{{"file_name": "b.png", "text": "b"}}\n'
    files = {"a.png": png(), "b.png": png((0, 0, 200)), "metadata.jsonl": lines}
    message = refused(write_folder(tmp_path / "set", files), tmp_path / "out" / "copy")
    assert message.startswith("metadata.jsonl line 1: text holds U+"), message


def test_a_file_name_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    """os.scandir gives such a name with lone surrogates (surrogateescape)."""
    folder = write_folder(tmp_path / "set", {"a.png": png(), "a.txt": "red", "b.txt": "blue"})
    with open(bytes(folder) + b"/b\xff.png", "wb") as file:  # a name os.fsdecode cannot decode
        file.write(png((0, 0, 200)))
    message = refused(folder, tmp_path / "out" / "copy")
    assert "unpaired surrogates" in message, message
