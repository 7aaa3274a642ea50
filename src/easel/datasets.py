"""Training datasets: a folder (or a .zip of one) of captioned images, checked and copied clean.

A dataset is given in one of two layouts, at the root of a folder or zip, or inside one top
folder of it:

- images with same-name captions: ``cat.png`` + ``cat.txt`` (the text is the caption);
- images with a ``metadata.jsonl``, one ``{"file_name": "cat.png", "text": "..."}`` a line
  (Hugging Face's imagefolder layout; ``"caption"`` is read as well as ``"text"``).

Both may be mixed, but one image has one caption. PIL, zipfile and json only (no torch), so the
API, the CLI and the trainer share one set of rules:

    summary = prepare_dataset(Path("cats.zip"), home / "datasets" / id, limits)  # InvalidParams
    dataset = load_dataset(home / "datasets" / id)                             # the trainer
    for item in dataset.items: item.image, item.caption                        # Path, str

What :func:`prepare_dataset` refuses, each with ``InvalidParams(field="dataset")`` naming the
file and the allowed range, before anything is written outside a temporary folder beside the
target (removed on error, so a refused dataset leaves no target behind):

- images that do not decode as PNG, JPEG or WebP (the bytes decide, not the name), have more
  than ``max_pixels`` pixels (read from the header: a decompression bomb is not decoded) or
  more than ``max_file_bytes`` bytes, or fail the other checks of
  :func:`easel.imaging.decode_image` (truncated, data appended, metadata bombs, chunk floods);
  fewer than ``min_images`` or more than ``max_images``;
- images without a caption (unless ``allow_missing_captions``; the trainer then gives them
  the trigger word alone), captions without an image, two captions for one image, captions
  longer than ``max_caption_chars`` or not UTF-8;
- more than ``max_bytes`` unpacked in all (counted while decompressing, whatever a zip's
  header claims) or more than ``max_members`` zip members or folder entries;
- paths that could leave the target (``..``, absolute paths, drive letters, backslashes),
  symlinks (zip members marked S_IFLNK, links in a folder), files in subfolders, zips inside the
  zip (refused, not opened: unpack them into the dataset), any other kind of file.

Skipped silently, never read: ``__MACOSX/``, hidden files and folders (``.DS_Store``, ``._cat.png``,
``.git/``), ``Thumbs.db``, ``desktop.ini`` and README/LICENSE files.

The clean copy holds only what was decoded: ``images/<name>.png`` (the pixels re-encoded as PNG,
no metadata), ``images/<name>.txt`` (the caption as written) and ``dataset.json`` (the
manifest that :func:`load_dataset` reads).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any

from easel.domain import EaselError, InvalidParams, check_text
from easel.imaging import decode_image
from easel.safejson import loads_bounded, read_json_bounded

if TYPE_CHECKING:
    from easel.config import Settings

FIELD = "dataset"
MANIFEST = "dataset.json"
IMAGES_DIR = "images"
METADATA = "metadata.jsonl"
MAX_MANIFEST_BYTES = 64 << 20  # dataset.json: some 150 bytes an image
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CAPTION_SUFFIX = ".txt"
JUNK_NAMES = ("__macosx", "thumbs.db", "ehthumbs.db", "desktop.ini")
DOC_STEMS = ("readme", "license", "licence")
MIN_IMAGES = 2
MAX_NAMED = 10  # files an error message names before "and N more"
CHUNK = 1 << 20  # bytes read at a time while decompressing
MANIFEST_VERSION = 1
_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")  # and lone surrogates (os.fsdecode)
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


@dataclass(frozen=True)
class DatasetLimits:
    """What :func:`prepare_dataset` accepts. ``DatasetLimits.from_settings(settings)`` takes
    them from the server's settings; the defaults are those settings' defaults."""

    min_images: int = MIN_IMAGES
    max_images: int = 1000  # settings.max_dataset_images
    max_bytes: int = 512 * 1024 * 1024  # unpacked total; settings.max_dataset_bytes
    max_file_bytes: int = 20_000_000  # one image file; settings.max_upload_bytes
    max_pixels: int = 4096 * 4096  # one image; settings.max_upload_pixels
    max_caption_chars: int = 2000  # settings.max_prompt_chars
    allow_missing_captions: bool = False

    @property
    def max_members(self) -> int:
        """Zip members (or folder entries) read at most: an image, its caption, their macOS
        ``._`` shadows and a folder entry each, plus a few more."""
        return 5 * self.max_images + 100

    @classmethod
    def from_settings(
        cls, settings: Settings, *, allow_missing_captions: bool = False
    ) -> DatasetLimits:
        return cls(
            max_images=settings.max_dataset_images,
            max_bytes=settings.max_dataset_bytes,
            max_file_bytes=settings.max_upload_bytes,
            max_pixels=settings.max_upload_pixels,
            max_caption_chars=settings.max_prompt_chars,
            allow_missing_captions=allow_missing_captions,
        )


@dataclass(frozen=True)
class DatasetSummary:
    """A prepared dataset's counts, as written in its manifest."""

    images: int
    captions: int  # images with a caption
    missing_captions: list[str]  # the names (as given) of the images without one
    bytes: int  # size of the clean copy on disk
    created_at: datetime


@dataclass(frozen=True)
class DatasetItem:
    """One training example. ``caption`` is "" for an image without one."""

    image: Path  # absolute path of the PNG
    caption: str
    width: int
    height: int
    source: str  # its name in the folder or zip it came from


@dataclass(frozen=True)
class Dataset:
    """A prepared dataset as :func:`load_dataset` reads it back."""

    folder: Path
    items: list[DatasetItem]
    summary: DatasetSummary

    def __len__(self) -> int:
        return len(self.items)


# --- public functions ---------------------------------------------------------------------------


def prepare_dataset(source: Path, target: Path, limits: DatasetLimits) -> DatasetSummary:
    """Check the folder or ``.zip`` at ``source`` and write its clean copy to ``target`` (which
    must not exist; its parent is created). Raises InvalidParams(field="dataset") saying what is
    wrong; then nothing is left at ``target``.

    >>> prepare_dataset(Path("cats/"), Path("out/cats"), DatasetLimits()).images
    12
    """
    if source.is_dir():
        return _prepare(_folder_members(source, limits), target, limits)
    if not source.is_file():
        raise InvalidParams(f"dataset {source} is not a folder or a .zip file", field=FIELD)
    with source.open("rb") as handle:
        magic = handle.read(4)
    if source.suffix.lower() != ".zip" and magic not in _ZIP_MAGIC:
        raise InvalidParams(
            f"dataset {source} must be a folder or a .zip of one (got a {source.suffix or 'plain'}"
            " file)",
            field=FIELD,
        )
    with _open_zip(source) as archive:
        return _prepare(_zip_members(archive, limits), target, limits)


def prepare_upload(
    files: list[tuple[str, bytes]], target: Path, limits: DatasetLimits
) -> DatasetSummary:
    """:func:`prepare_dataset` for an HTTP upload: ``files`` is one zip, or several images,
    ``.txt`` captions and a ``metadata.jsonl``, as ``(file name, bytes)``."""
    if not files:
        raise InvalidParams(
            "dataset is empty: send one .zip, or images with their captions", field=FIELD
        )
    zips = [name for name, data in files if _is_zip(name, data)]
    if zips and len(files) > 1:
        raise InvalidParams(
            f"send one .zip on its own, or images and captions without a zip (got {zips[0]} "
            f"among {len(files)} files)",
            field=FIELD,
        )
    if zips:
        with _open_zip(io.BytesIO(files[0][1])) as archive:
            return _prepare(_zip_members(archive, limits), target, limits)
    return _prepare(_upload_members(files, limits), target, limits)


def load_dataset(folder: Path) -> Dataset:
    """The prepared dataset in ``folder`` (from :func:`prepare_dataset`): its items, with
    absolute image paths, in name order. Raises InvalidParams(field="dataset") for a folder
    without a readable manifest or whose manifest names a missing or outside file."""
    root = folder.resolve()
    manifest = _read_manifest(root)
    items = []
    for entry in manifest["items"]:
        image = (root / entry["file"]).resolve()
        if not image.is_relative_to(root) or not image.is_file():
            raise InvalidParams(
                f"dataset {folder} is damaged: its manifest names {entry['file']}, which is not "
                "a file inside it; prepare the dataset again",
                field=FIELD,
            )
        items.append(
            DatasetItem(
                image=image,
                caption=entry["caption"],
                width=entry["width"],
                height=entry["height"],
                source=entry["source"],
            )
        )
    return Dataset(folder=root, items=items, summary=_summary_of(manifest))


def read_summary(folder: Path) -> DatasetSummary:
    """The counts of the prepared dataset in ``folder``, without checking its files."""
    return _summary_of(_read_manifest(folder))


# --- sources: what a folder, a zip or an upload holds ------------------------------------------


@dataclass(frozen=True)
class _Member:
    """A file of the source, not read yet."""

    name: str  # "/"-separated path inside the source, checked by _check_name
    open: Callable[[], IO[bytes]]
    declared: int = 0  # size the zip header or file system states: a hint, never trusted


def _zip_members(archive: zipfile.ZipFile, limits: DatasetLimits) -> list[_Member]:
    infos = archive.infolist()
    if len(infos) > limits.max_members:
        raise InvalidParams(
            f"the zip has {len(infos)} members; a dataset zip may have at most "
            f"{limits.max_members} (max_dataset_images {limits.max_images} × 5 + 100)",
            field=FIELD,
        )
    members = []
    seen: set[str] = set()
    for info in infos:
        name = _check_name(info.filename)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise InvalidParams(
                f"the zip holds a symbolic link ({info.filename}); datasets may hold only files",
                field=FIELD,
            )
        if info.is_dir() or _is_junk(name):
            continue
        if info.flag_bits & 0x1:
            raise InvalidParams(
                f"{info.filename} in the zip is encrypted; send a zip without a password",
                field=FIELD,
            )
        if name in seen:
            raise InvalidParams(f"the zip holds {info.filename} twice", field=FIELD)
        seen.add(name)
        members.append(_Member(name, _zip_opener(archive, info), declared=info.file_size))
    return members


def _zip_opener(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> Callable[[], IO[bytes]]:
    return lambda: archive.open(info)


def _folder_members(root: Path, limits: DatasetLimits) -> list[_Member]:
    members: list[_Member] = []
    entries = 0
    pending = [(root, "")]
    while pending:
        folder, prefix = pending.pop()
        with os.scandir(folder) as scan:
            for entry in sorted(scan, key=lambda e: e.name):
                entries += 1
                if entries > limits.max_members:
                    raise InvalidParams(
                        f"dataset folder {root} has more than {limits.max_members} entries "
                        f"(max_dataset_images {limits.max_images} × 5 + 100)",
                        field=FIELD,
                    )
                name = _check_name(prefix + entry.name)
                if entry.is_symlink():
                    raise InvalidParams(
                        f"{name} in the dataset folder is a symbolic link; copy the file there "
                        "instead",
                        field=FIELD,
                    )
                if _is_junk(name):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    pending.append((Path(entry.path), name + "/"))
                elif entry.is_file(follow_symlinks=False):
                    size = entry.stat(follow_symlinks=False).st_size
                    members.append(_Member(name, _file_opener(Path(entry.path)), declared=size))
                else:
                    raise InvalidParams(
                        f"{name} in the dataset folder is not a regular file", field=FIELD
                    )
    return members


def _file_opener(path: Path) -> Callable[[], IO[bytes]]:
    # O_NOFOLLOW: a file swapped for a link after the listing is refused, not followed
    return lambda: os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb")


def _upload_members(files: list[tuple[str, bytes]], limits: DatasetLimits) -> list[_Member]:
    if len(files) > limits.max_members:
        raise InvalidParams(
            f"{len(files)} files sent; a dataset upload may have at most {limits.max_members} "
            "(send a .zip)",
            field=FIELD,
        )
    members = []
    seen: set[str] = set()
    for raw_name, data in files:
        name = _check_name(raw_name)
        if _is_junk(name):
            continue
        if name in seen:
            raise InvalidParams(f"{raw_name} was sent twice", field=FIELD)
        seen.add(name)
        members.append(_Member(name, _bytes_opener(data), declared=len(data)))
    return members


def _bytes_opener(data: bytes) -> Callable[[], IO[bytes]]:
    return lambda: io.BytesIO(data)


# --- the checks and the copy --------------------------------------------------------------------


@dataclass
class _Plan:
    """What the listing says the dataset is (nothing read yet)."""

    images: dict[str, _Member] = field(default_factory=dict)  # name -> member
    captions: dict[str, _Member] = field(default_factory=dict)  # image stem -> its .txt
    metadata: _Member | None = None


class _Budget:
    """The running count of unpacked bytes, against ``limits.max_bytes``."""

    def __init__(self, limits: DatasetLimits) -> None:
        self.limits = limits
        self.used = 0

    def read(self, member: _Member, max_bytes: int, what: str) -> bytes:
        """The member's bytes, decompressed a chunk at a time: stops (InvalidParams) as soon as
        it passes ``max_bytes`` or the dataset's total, so a bomb is never unpacked."""
        chunks = []
        size = 0
        try:
            with member.open() as stream:
                while chunk := stream.read(CHUNK):
                    size += len(chunk)
                    self.used += len(chunk)
                    if size > max_bytes:
                        raise InvalidParams(
                            f"{member.name} is larger than {max_bytes} bytes; {what}",
                            field=FIELD,
                        )
                    if self.used > self.limits.max_bytes:
                        raise _too_big(self.limits, f"more than {self.limits.max_bytes}")
                    chunks.append(chunk)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as exc:
            raise InvalidParams(
                f"{member.name} could not be read: {exc} (a damaged zip?)", field=FIELD
            ) from None
        return b"".join(chunks)


def _prepare(members: list[_Member], target: Path, limits: DatasetLimits) -> DatasetSummary:
    if target.exists():
        raise EaselError(f"{target} already exists; choose a new folder for the dataset")
    # 1. check the listing: layout, kinds of file, counts, declared sizes
    plan = _plan(_strip_top_folder(members), limits)
    budget = _Budget(limits)
    # 2. read the captions; refuse images without one (unless allowed) before decoding any
    captions = _read_captions(plan, budget, limits)
    missing = sorted(name for name in plan.images if not captions.get(name))
    if missing and not limits.allow_missing_captions:
        raise InvalidParams(
            f"{len(missing)} of {len(plan.images)} images have no caption: "
            f"{_some(missing)}; add a .txt beside each (cat.png + cat.txt) or a metadata.jsonl "
            "line, or pass allow_missing_captions to train them with the trigger word alone",
            field=FIELD,
        )
    # 3. decode every image and write the clean copy into a temporary folder beside the target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(
        tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    )
    try:
        items = _write_images(plan, captions, budget, limits, partial / IMAGES_DIR)
        summary = DatasetSummary(
            images=len(items),
            captions=sum(1 for item in items if item["caption"]),
            missing_captions=missing,
            bytes=sum(p.stat().st_size for p in (partial / IMAGES_DIR).iterdir()),
            created_at=datetime.now(UTC),
        )
        _write_manifest(partial / MANIFEST, summary, items)
        # 4. publish: one rename, so the target is either absent or complete
        os.rename(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return summary


def _strip_top_folder(members: list[_Member]) -> list[_Member]:
    """Files inside one top folder (``cats/a.png``, ``cats/a.txt``) as if at the root."""
    tops = {m.name.split("/", 1)[0] for m in members}
    if len(tops) != 1 or not all("/" in m.name for m in members):
        return members
    return [_Member(m.name.split("/", 1)[1], m.open, m.declared) for m in members if "/" in m.name]


def _plan(members: list[_Member], limits: DatasetLimits) -> _Plan:
    plan = _Plan()
    nested = [m.name for m in members if "/" in m.name]
    if nested:
        raise InvalidParams(
            f"files in subfolders are not read: {_some(nested)}; put images and captions at "
            "the root (of the folder, or of the zip or of its one top folder)",
            field=FIELD,
        )
    zips = [m.name for m in members if m.name.lower().endswith(".zip")]
    if zips:
        raise InvalidParams(
            f"zips inside the dataset are refused, not opened: {_some(zips)}; unpack them into it",
            field=FIELD,
        )
    other = []
    stems: dict[str, str] = {}
    for member in members:
        path = PurePosixPath(member.name)
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            if path.stem in stems:
                raise InvalidParams(
                    f"two images are named {path.stem} ({stems[path.stem]}, {member.name}); "
                    "one caption file could not tell them apart: rename one",
                    field=FIELD,
                )
            stems[path.stem] = member.name
            plan.images[member.name] = member
        elif suffix == CAPTION_SUFFIX:
            if path.stem in plan.captions:
                raise InvalidParams(
                    f"two captions are named {path.stem} ({plan.captions[path.stem].name}, "
                    f"{member.name}): keep one",
                    field=FIELD,
                )
            plan.captions[path.stem] = member
        elif member.name.lower() == METADATA:
            plan.metadata = member
        else:
            other.append(member.name)
    if other:
        raise InvalidParams(
            f"not an image (.png, .jpg, .jpeg, .webp), a caption (.txt) or {METADATA}: "
            f"{_some(other)}; remove them",
            field=FIELD,
        )
    count = len(plan.images)
    if not limits.min_images <= count <= limits.max_images:
        raise InvalidParams(
            f"a dataset needs {limits.min_images} to {limits.max_images} images (found {count}"
            f"{'' if count else '; images are .png, .jpg, .jpeg or .webp files'})",
            field=FIELD,
        )
    orphans = sorted(m.name for stem, m in plan.captions.items() if stem not in stems)
    if orphans:
        raise InvalidParams(
            f"captions without an image of the same name: {_some(orphans)} (cat.txt is the "
            "caption of cat.png)",
            field=FIELD,
        )
    _check_declared_sizes(members, plan, limits)
    return plan


def _check_declared_sizes(members: list[_Member], plan: _Plan, limits: DatasetLimits) -> None:
    """Refuse early what the zip header (or the file system) says is too big. A header may
    lie, so reading counts the bytes again (``_Budget``); this only saves unpacking an honest
    bomb."""
    declared = sum(m.declared for m in members)
    if declared > limits.max_bytes:
        raise _too_big(limits, str(declared))
    big = sorted(m.name for m in plan.images.values() if m.declared > limits.max_file_bytes)
    if big:
        raise InvalidParams(
            f"images larger than {limits.max_file_bytes} bytes: {_some(big)}", field=FIELD
        )


def _read_captions(plan: _Plan, budget: _Budget, limits: DatasetLimits) -> dict[str, str]:
    """Image name -> caption (stripped; "" when the .txt or the line is empty)."""
    most = limits.max_caption_chars
    # UTF-8 takes at most 4 bytes a character; a BOM and a final newline may come on top
    caption_bytes = 4 * most + 16
    too_long = f"a caption may have at most {most} characters"
    captions: dict[str, str] = {}
    sources: dict[str, str] = {}
    stems = {PurePosixPath(name).stem: name for name in plan.images}
    for stem, member in sorted(plan.captions.items()):
        text = _text(budget.read(member, caption_bytes, too_long), member.name).strip()
        _check_caption(text, member.name)
        captions[stems[stem]] = text
        sources[stems[stem]] = member.name
    if plan.metadata is not None:
        data = budget.read(plan.metadata, limits.max_file_bytes, "split the dataset")
        for number, line in enumerate(_text(data, METADATA).splitlines(), start=1):
            if not line.strip():
                continue
            name, text = _metadata_line(line, number)
            _check_caption(name, f"{METADATA} line {number}: file_name")
            _check_caption(text, f"{METADATA} line {number}: text")
            if name not in plan.images:
                raise InvalidParams(
                    f"{METADATA} line {number} names {name!r}, which is not an image of the "
                    "dataset",
                    field=FIELD,
                )
            if name in sources:
                raise InvalidParams(
                    f"{name} has two captions ({sources[name]} and {METADATA} line {number}); "
                    "keep one",
                    field=FIELD,
                )
            captions[name] = text.strip()
            sources[name] = f"{METADATA} line {number}"
    long = sorted(sources[name] for name, text in captions.items() if len(text) > most)
    if long:
        raise InvalidParams(f"captions too long: {_some(long)}; {too_long}", field=FIELD)
    return captions


def _check_caption(text: str, where: str) -> None:
    """A caption (or a name in metadata.jsonl) is text the system can hold and show: no lone
    surrogate, no control character but tab and newline (``domain.check_text``); refused, not
    stripped, with where it is."""
    try:
        check_text(text, where)
    except InvalidParams as exc:
        raise InvalidParams(exc.message, field=FIELD) from None


def _metadata_line(line: str, number: int) -> tuple[str, str]:
    """(file name, caption) of one metadata.jsonl line (its nesting bounded before parsing:
    the file comes from the uploader)."""
    # the file's size is bounded already (max_dataset_file_bytes)
    row = loads_bounded(line, what=f"{METADATA} line {number}", field=FIELD, max_bytes=None)
    if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
        raise InvalidParams(
            f'{METADATA} line {number} must be an object with "file_name" and "text" '
            '(or "caption")',
            field=FIELD,
        )
    text = row.get("text", row.get("caption"))
    if not isinstance(text, str):
        raise InvalidParams(
            f'{METADATA} line {number} needs a "text" (or "caption") string for {row["file_name"]}',
            field=FIELD,
        )
    name = row["file_name"].removeprefix("./")
    return name, text


def _write_images(
    plan: _Plan,
    captions: dict[str, str],
    budget: _Budget,
    limits: DatasetLimits,
    folder: Path,
) -> list[dict[str, Any]]:
    folder.mkdir()
    items = []
    for name, member in sorted(plan.images.items()):
        data = budget.read(member, limits.max_file_bytes, "a dataset image may not be larger")
        try:
            image = decode_image(data, field=name, max_pixels=limits.max_pixels)
        except InvalidParams as exc:  # its message starts with the file's name
            raise InvalidParams(exc.message, field=FIELD) from None
        stem = PurePosixPath(name).stem
        # compress_level 1: a third of the time of the default for 10-20 % more bytes, and a
        # 1000-image upload is prepared within its HTTP request
        image.save(folder / f"{stem}.png", format="PNG", compress_level=1)
        caption = captions.get(name, "")
        if caption:
            (folder / f"{stem}{CAPTION_SUFFIX}").write_text(caption + "\n", encoding="utf-8")
        items.append(
            {
                "file": f"{IMAGES_DIR}/{stem}.png",
                "source": name,
                "caption": caption,
                "width": image.width,
                "height": image.height,
            }
        )
    return items


def _write_manifest(path: Path, summary: DatasetSummary, items: list[dict[str, Any]]) -> None:
    manifest = {
        "version": MANIFEST_VERSION,
        "created_at": summary.created_at.isoformat(),
        "images": summary.images,
        "captions": summary.captions,
        "missing_captions": summary.missing_captions,
        "bytes": summary.bytes,
        "items": items,
    }
    path.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.exists():
        raise InvalidParams(
            f"{folder} is not a prepared dataset (it has no {MANIFEST}); prepare it with "
            "`easel.datasets.prepare_dataset` or POST /api/v1/datasets",
            field=FIELD,
        )
    try:
        manifest = read_json_bounded(path, field=FIELD, max_bytes=MAX_MANIFEST_BYTES)
        if not isinstance(manifest, dict) or not isinstance(manifest.get("items"), list):
            raise ValueError("it is not a manifest")
        if manifest.get("version") != MANIFEST_VERSION:
            raise ValueError(f"unknown manifest version {manifest.get('version')!r}")
        return dict(manifest)
    except InvalidParams as exc:
        raise InvalidParams(f"{exc.message}; prepare the dataset again", field=FIELD) from None
    except ValueError as exc:
        raise InvalidParams(
            f"{path} could not be read ({exc}); prepare the dataset again", field=FIELD
        ) from None


def _summary_of(manifest: dict[str, Any]) -> DatasetSummary:
    return DatasetSummary(
        images=manifest["images"],
        captions=manifest["captions"],
        missing_captions=list(manifest["missing_captions"]),
        bytes=manifest["bytes"],
        created_at=datetime.fromisoformat(manifest["created_at"]),
    )


# --- small helpers ------------------------------------------------------------------------------


def _check_name(raw: str) -> str:
    """A member's path, "/"-separated without "." parts; InvalidParams for one that could land
    outside the target (``..``, absolute, a drive letter, a backslash) or has control
    characters. The copy never uses these paths as they are, but such a name means a crafted
    or broken archive: refusing says so."""
    if "\\" in raw:
        reason = "has a backslash"
    elif raw.startswith("/"):
        reason = "is an absolute path"
    elif _DRIVE.match(raw):
        reason = "starts with a drive letter"
    elif _CONTROL.search(raw):
        reason = "has control characters or unpaired surrogates"
    elif ".." in raw.split("/"):
        reason = "goes up a folder (..)"
    else:
        parts = [part for part in raw.split("/") if part not in ("", ".")]
        if parts and all(len(part.encode()) <= 200 for part in parts):
            return "/".join(parts)
        reason = "is empty" if not parts else "has a part longer than 200 bytes"
    raise InvalidParams(
        f"unsafe path {raw!r} in the dataset: it {reason}; paths must stay inside the dataset",
        field=FIELD,
    )


def _is_junk(name: str) -> bool:
    """What operating systems and tools leave beside files; skipped without being read."""
    parts = name.split("/")
    if any(part.startswith(".") or part.lower() in JUNK_NAMES for part in parts):
        return True
    path = PurePosixPath(name)
    return path.stem.lower() in DOC_STEMS and path.suffix.lower() not in IMAGE_SUFFIXES


def _is_zip(name: str, data: bytes) -> bool:
    return name.lower().endswith(".zip") or data[:4] in _ZIP_MAGIC


def _open_zip(file: Path | IO[bytes]) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(file)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as exc:
        raise InvalidParams(f"the dataset is not a readable .zip ({exc})", field=FIELD) from None


def _text(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InvalidParams(f"{name} is not UTF-8 text", field=FIELD) from None


def _too_big(limits: DatasetLimits, size: str) -> InvalidParams:
    return InvalidParams(
        f"the dataset unpacks to {size} bytes; at most {limits.max_bytes} are allowed "
        "(max_dataset_bytes)",
        field=FIELD,
    )


def _some(names: Iterable[str]) -> str:
    """Up to MAX_NAMED names, then how many more."""
    names = list(names)
    shown = ", ".join(names[:MAX_NAMED])
    return shown if len(names) <= MAX_NAMED else f"{shown} and {len(names) - MAX_NAMED} more"
