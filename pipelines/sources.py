"""The torch backend's and the data tools' sources: one split of a data set as a list of (encoded image, label).

``open_split(source, root, split)`` indexes a split once, in the main process: a ``SplitIndex`` of numpy arrays (shared
by forked workers), item i read by ``image_file(i)`` and named ``name(i)``, int64 ``labels``, ``class_names`` in label
order. Layouts of ``root``; both splits take the train split's classes:
- ``folder``: ``train/`` + ``test/``, or all 'train'; sorted non-hidden class folders (recursive) or one class;
  symlinks are followed, each real folder once: a loop or a second link to a folder warns and adds nothing;
- ``filelist``: ``train.txt`` + ``test.txt`` or one ``.txt``; lines ``<path> <label>``, the label last, the path
  relative to the list (it may hold spaces); blank and '#' lines skipped;
- ``webdataset``: plain tar shards (``train/`` + ``test/`` or not), by name; a sample: ``<key>.<ext>`` + ``<key>.cls``;
  each shard is verified as it is indexed (``scan_shard``). ``dali_index`` writes DALI's index of a shard's samples.
Class names of the last two (DALI's rule too): ``classes.txt`` beside lists or shards, else the sorted train labels.
Images by extension (jpg, jpeg, png, bmp, webp, any case); hidden names skipped; labels are integers >= 0.
"""

from __future__ import annotations

import io
import os
import posixpath
import tarfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, NamedTuple, Protocol

import numpy as np

from gali.engine.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SPLITS = ("train", "test")
CLASSES_FILE = "classes.txt"
SOURCES_ON_DISK = ("folder", "filelist", "webdataset")
DALI_INDEX_VERSION = "v1.2"  # the format of DALI's ``wds2idx`` tool, which ``fn.readers.webdataset`` reads

Member = tuple[str, int, int]  # a tar member: (name, offset of its data, size)


class SplitIndex(Protocol):
    """One split of a source: item i is the image ``image_file(i)`` with label ``labels[i]``."""

    where: Path  # the split's folder, list file or shard folder, for messages
    labels: np.ndarray  # int64, one per item
    class_names: list[str]  # label order

    def __len__(self) -> int: ...

    def name(self, i: int) -> str:
        """Where item i lives, for messages: a file path, or '<shard>:<member>'."""
        ...

    def image_file(self, i: int) -> str | BinaryIO:
        """What ``PIL.Image.open`` reads for item i: a file path, or a file object of the image's bytes."""
        ...


@dataclass(frozen=True)
class FileIndex:
    """Image files: ``paths`` relative to ``base`` (bytes, one numpy array), labels, class names."""

    where: Path
    base: Path
    paths: np.ndarray
    labels: np.ndarray
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, i: int) -> str:
        """The image file's path."""
        return os.path.join(self.base, os.fsdecode(self.paths[i]))

    def image_file(self, i: int) -> str:
        """The image file's path (opened by Pillow, so that a missing file fails where it is decoded)."""
        return self.name(i)


@dataclass(frozen=True)
class ShardIndex:
    """Images inside tar shards: per item its shard (index into ``shards``), data offset, size, member name."""

    where: Path
    shards: list[str]
    shard_ids: np.ndarray
    offsets: np.ndarray
    sizes: np.ndarray
    members: np.ndarray
    labels: np.ndarray
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.members)

    def name(self, i: int) -> str:
        """'<shard path>:<member name>'."""
        return f"{self.shards[self.shard_ids[i]]}:{os.fsdecode(self.members[i])}"

    def image_file(self, i: int) -> BinaryIO:
        """The member's bytes: the shard is opened, seeked and read here (in the worker that asks)."""
        shard = self.shards[self.shard_ids[i]]
        try:
            with open(shard, "rb") as f:
                f.seek(int(self.offsets[i]))
                data = f.read(int(self.sizes[i]))
        except OSError as e:
            raise DataError(f"cannot read shard {shard}: {e}; was it moved or rewritten since it was indexed?") from e
        if len(data) != self.sizes[i]:
            raise DataError(f"shard {shard} ends inside {self.name(i)}; it was truncated since it was indexed")
        return io.BytesIO(data)


def is_image_name(name: str) -> bool:
    """True for a non-hidden file name with an image extension (any case)."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _seen_already(path: str, seen: dict[str, str]) -> bool:
    """True, with a warning naming ``path``, if the folder ``path`` leads back to a folder above it (a symlink loop)
    or to one in ``seen`` (real path -> the path it was first reached by); else ``path`` is added to ``seen``.

    So that a link never indexes an image twice, and a loop does not multiply the data set 40-fold.
    """
    real = os.path.realpath(path)
    above = os.path.realpath(os.path.dirname(path))
    if above == real or above.startswith(real.rstrip(os.sep) + os.sep):
        warnings.warn(
            f"{path} is a symlink loop (it leads back to {real}); it adds no images or classes, remove it",
            stacklevel=2,
        )
        return True
    if real in seen:
        warnings.warn(
            f"{path} leads to {seen[real]}, which is indexed already; it adds no images or classes: "
            "remove the link, or copy the folder if its images should count twice",
            stacklevel=2,
        )
        return True
    seen[real] = path
    return False


def _new_folders(parent: str, names: list[str], seen: dict[str, str]) -> list[str]:
    """The non-hidden ``names`` of folders in ``parent`` that lead to a folder not in ``seen`` (they are added);
    real folders come first, so that a link to one of them is the one skipped."""
    paths = sorted(
        (os.path.join(parent, n) for n in names if not n.startswith(".")), key=lambda p: (os.path.islink(p), p)
    )
    return [os.path.basename(p) for p in paths if not _seen_already(p, seen)]


def list_classes(folder: Path, seen: dict[str, str] | None = None) -> list[str]:
    """The class folder names of ``folder``, sorted: its non-hidden immediate subfolders, but for a loop or a link
    to a folder in ``seen`` (real path -> path; default: ``folder``), each warned about; the classes join ``seen``."""
    seen = {os.path.realpath(folder): str(folder)} if seen is None else seen
    return sorted(_new_folders(str(folder), [e.name for e in os.scandir(folder) if e.is_dir()], seen))


def _require_root(root: Path, source: str) -> None:
    if not root.exists():
        what = {
            "folder": "a folder of images (class subfolders give labels), or use data.source=digits for the demo",
            "filelist": "a folder holding train.txt [+ test.txt], or a single .txt list",
            "webdataset": "a folder holding train/*.tar [+ test/*.tar], or *.tar shards directly",
        }[source]
        raise DataError(f"data folder {root} does not exist or is not a folder; set data.root to {what}")


def _require_folder(folder: Path) -> None:
    if not folder.is_dir():
        _require_root(folder, "folder")
        raise DataError(f"{folder} is not a folder; set data.root to a folder of images (class subfolders give labels)")


def walk_images(top: Path, relative_to: Path, seen: dict[str, str] | None = None) -> list[str]:
    """Image files under ``top`` (recursive, hidden entries skipped), relative to ``relative_to``, sorted.

    Symlinks are followed, each real folder once: ``seen`` (real path -> path) holds the folders indexed already
    (``top`` is added); a loop or a second link to a folder warns and is skipped (``_new_folders``).
    """
    seen = {} if seen is None else seen
    seen.setdefault(os.path.realpath(top), str(top))
    found = []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        dirnames[:] = _new_folders(dirpath, dirnames, seen)
        rel = os.path.relpath(dirpath, relative_to)
        found.extend(os.path.normpath(os.path.join(rel, f)) for f in filenames if is_image_name(f))
    return sorted(found)


def _describe_classes(classes: list[str]) -> str:
    if not classes:
        return "no class folders (images directly inside)"
    return "class folders " + ", ".join(classes[:5]) + (f", ... ({len(classes)} in all)" if len(classes) > 5 else "")


def _paths_array(paths: list[str]) -> np.ndarray:
    return np.array([os.fsencode(p) for p in paths], dtype=np.bytes_)


def scan_image_folder(
    folder: Path, class_folders: list[str] | None = None, *, one_class: str | None = None
) -> FileIndex:
    """Index the images under ``folder``; raise ``DataError`` if there are none or the layout is unclear.

    ``class_folders`` fixes the label order (label i = ``class_folders[i]``) so that a test folder
    labels its images like its train folder; ``None`` takes ``folder``'s own class folders, and
    ``[]`` expects a folder without subfolders: one class, named ``one_class`` (default: ``folder``'s name).
    """
    folder = Path(folder)
    _require_folder(folder)
    seen = {os.path.realpath(folder): str(folder)}
    classes = list_classes(folder, seen)
    loose = sorted(e.name for e in os.scandir(folder) if e.is_file() and is_image_name(e.name))
    if classes and loose:
        raise DataError(
            f"{folder} holds both {_describe_classes(classes)} and {len(loose)} images directly inside "
            f"(e.g. {loose[0]}); move those images into a class folder, or into one folder of their own, "
            "so that every image has a label"
        )
    if class_folders is None:
        class_folders = classes
    elif bool(classes) != bool(class_folders) or not set(classes) <= set(class_folders):
        raise DataError(
            f"{folder} has {_describe_classes(classes)}, which do not match the train split's "
            f"{_describe_classes(class_folders)}; give the test split the class folders of the train split"
        )
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(class_folders):
        if name in classes:
            found = walk_images(folder / name, folder, seen)
            paths.extend(found)
            labels.extend([label] * len(found))
    if not class_folders:
        paths, labels = loose, [0] * len(loose)
    if not paths:
        raise DataError(
            f"{folder} holds no image files ({', '.join(IMAGE_EXTENSIONS)}; searched recursively); "
            "point data.root at a folder of images (class subfolders give labels)"
        )
    return FileIndex(
        where=folder,
        base=folder,
        paths=_paths_array(paths),
        labels=np.array(labels, dtype=np.int64),
        class_names=list(class_folders) or [one_class or folder.name],
    )


def all_image_files(root: Path) -> FileIndex:
    """Every image file under the folder ``root`` whatever its layout (label 0 each), for the data tools."""
    _require_folder(root)
    paths = walk_images(root, root)
    if not paths:
        raise DataError(f"{root} holds no image files ({', '.join(IMAGE_EXTENSIONS)}; searched recursively)")
    return FileIndex(
        where=root, base=root, paths=_paths_array(paths), labels=np.zeros(len(paths), np.int64), class_names=[]
    )


def _no_test_split(root: Path, layout: str) -> DataError:
    return DataError(f"{root} has no test split (all of it is split 'train'); for a held-out split {layout}")


def _split_folder(root: Path, split: str, what: str) -> Path:
    """The folder of ``split`` in a root that is either split into train/ and test/ or all 'train'."""
    if (root / "train").is_dir():
        folder = root / split
        if not folder.is_dir():
            raise DataError(
                f"split '{split}' needs the folder {folder}, which does not exist; add it "
                f"(laid out like {root / 'train'}) or use split 'train'"
            )
        return folder
    if split == "test":
        if what == "folder":
            raise DataError(
                f"{root} has no train/ subfolder, so all of it is split 'train' and there is no "
                f"split 'test'; for a held-out split arrange it as {root}/train/<class>/... and "
                f"{root}/test/<class>/..."
            )
        raise _no_test_split(root, f"put the shards in {root}/train/ and {root}/test/")
    return root


def _open_folder(root: Path, split: str) -> FileIndex:
    _require_folder(root)
    folder = _split_folder(root, split, "folder")
    class_folders = list_classes(root / "train") if folder != root else None
    return scan_image_folder(folder, class_folders, one_class=root.name)


def read_class_names(path: Path) -> list[str]:
    """The class names in ``path`` (``classes.txt``): one per non-blank line, in label order."""
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read class names {path}: {e}") from e
    names = [n for n in names if n]
    if not names:
        raise DataError(f"{path} names no classes; write one class name per line (line i names label i)")
    return names


def _class_table(train_labels: np.ndarray, folders: list[Path]) -> tuple[list[str], np.ndarray, str]:
    """Class names, the map from label value to class index (-1 where none) and where they come from.

    The first ``classes.txt`` among ``folders`` names labels 0..K-1; without one, the sorted distinct
    labels of the train split are the classes (each label maps to its position among them).
    """
    for folder in folders:
        if (folder / CLASSES_FILE).is_file():
            names = read_class_names(folder / CLASSES_FILE)
            return names, np.arange(len(names), dtype=np.int64), f"the {len(names)} classes of {folder / CLASSES_FILE}"
    distinct = np.unique(train_labels)
    table = np.full(int(distinct.max()) + 1, -1, dtype=np.int64)
    table[distinct] = np.arange(len(distinct))
    return [str(v) for v in distinct], table, f"the labels of the train split (or add {folders[0] / CLASSES_FILE})"


def _map_labels(values: np.ndarray, table: np.ndarray, origin: str, locate: Callable[[int], str]) -> np.ndarray:
    """Class indices of the label ``values``; ``DataError`` naming the first label outside ``table``."""
    inside = values < len(table)
    mapped = np.where(inside, table[np.minimum(values, len(table) - 1)], -1)
    bad = np.flatnonzero(mapped < 0)
    if bad.size:
        raise DataError(f"{locate(int(bad[0]))}: label {int(values[bad[0]])} is not among {origin}")
    return mapped


def _list_file(root: Path, split: str) -> Path:
    if root.is_file():
        if split == "test":
            raise _no_test_split(root, "put train.txt and test.txt in one folder and point data.root at it")
        return root
    path = root / f"{split}.txt"
    if not path.is_file():
        raise DataError(
            f"{root} holds no {split}.txt; a filelist root is a folder with train.txt (and test.txt) of "
            "'<path> <label>' lines, or a single .txt list"
        )
    return path


def _parse_list(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The entries of the list file ``path``: paths (as written), label values, line numbers."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read file list {path}: {e}") from e
    paths: list[str] = []
    labels: list[int] = []
    lines: list[int] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = stripped.rsplit(None, 1)
        if len(fields) != 2 or not fields[1].isdigit() or not fields[1].isascii():
            raise DataError(
                f"{path}, line {lineno}: expected '<path> <label>' with an integer label >= 0, got {line!r}"
            )
        paths.append(fields[0])
        labels.append(int(fields[1]))
        lines.append(lineno)
    if not paths:
        raise DataError(f"{path} lists no images; write one '<path> <label>' line per image")
    return paths, np.array(labels, dtype=np.int64), np.array(lines, dtype=np.int64)


def _open_filelist(root: Path, split: str) -> FileIndex:
    _require_root(root, "filelist")
    list_file, train_file = _list_file(root, split), _list_file(root, "train")
    paths, values, lines = _parse_list(list_file)
    train_values = values if list_file == train_file else _parse_list(train_file)[1]
    names, table, origin = _class_table(train_values, [list_file.parent])
    labels = _map_labels(values, table, origin, lambda j: f"{list_file}, line {lines[j]}")
    base = list_file.parent
    missing = [j for j, p in enumerate(paths) if not os.path.isfile(os.path.join(base, p))]
    if missing:
        raise DataError(
            f"{list_file} lists {len(missing)} files that do not exist, e.g. line {lines[missing[0]]}: "
            f"{os.path.join(base, paths[missing[0]])}; fix the list (paths are relative to its folder)"
        )
    return FileIndex(where=list_file, base=base, paths=_paths_array(paths), labels=labels, class_names=names)


def _member_key(name: str) -> tuple[str, str] | None:
    """(key, lower-case extension) of a tar member name, or None for a hidden or extension-less one."""
    base = posixpath.basename(name)
    dot = base.find(".")
    if base.startswith(".") or dot <= 0:
        return None
    return name[: len(name) - len(base) + dot], base[dot + 1 :].lower()


def _end_of_archive_problem(f: BinaryIO, end: int, size: int) -> str | None:
    """Why the bytes of a tar file from ``end`` (just past its last whole member) to its ``size`` are not the
    end-of-archive marker (zero blocks, at least one whole), or None if they are."""
    if end > size:
        return f"it ends at byte offset {size}, inside the padding of its last member (which runs to byte {end})"
    if end == size:
        return (
            f"it ends at byte offset {size}, right after a member, without the end-of-archive zero blocks "
            "(cut short at a member boundary?)"
        )
    f.seek(end)
    position = end
    while chunk := f.read(1 << 20):
        nonzero = len(chunk) - len(chunk.lstrip(b"\0"))
        if nonzero < len(chunk):
            where = position + nonzero
            if size - end < tarfile.BLOCKSIZE:
                return f"it ends at byte offset {size}, inside the header of a member that starts at byte {end}"
            return (
                f"byte offset {where} holds data that is not a tar header (trailing garbage, or a damaged header), "
                f"{size - end} bytes after the last whole member at byte {end}"
            )
        position += len(chunk)
    if size - end < tarfile.BLOCKSIZE:
        return f"it ends at byte offset {size}, inside the end-of-archive block that starts at byte {end}"
    return None


def _truncated(shard: Path, problem: str) -> DataError:
    return DataError(
        f"shard {shard} is damaged: {problem}; it was cut short or overwritten (an interrupted copy?): "
        "copy it again, or rewrite it with `gali data prepare`"
    )


class ShardSample(NamedTuple):
    """One sample of a shard: its key, its label value, and its image and label (``.cls``) members."""

    key: str
    label: int
    image: Member
    label_member: Member


def scan_shard(shard: str | Path) -> list[ShardSample]:
    """The samples of one shard in order (by their image members).

    The shard is verified, not trusted: every member's data must lie inside the file and the file must end with
    the tar end-of-archive zero blocks right after its last member. A tar that ends inside a member (its header or
    its data), at a member boundary, or that holds anything but zeros after its last member raises ``DataError``
    naming the shard and the byte offset, so that a shard cut short never becomes a smaller data set.
    """
    shard = Path(shard)
    images: dict[str, Member] = {}
    labels: dict[str, tuple[int, Member]] = {}
    at = 0  # where the header being read starts, for messages
    try:
        with open(shard, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            size = os.fstat(f.fileno()).st_size
            while True:
                at = tar.offset
                try:
                    member = tar.next()
                except tarfile.ReadError:  # "unexpected end of data": the last member's padding is cut
                    if tar.offset > size:
                        raise _truncated(shard, _end_of_archive_problem(f, tar.offset, size)) from None
                    raise
                if member is None:
                    break
                if member.offset_data + member.size > size:
                    raise _truncated(
                        shard,
                        f"it ends at byte offset {size}, inside the data of member {member.name} "
                        f"(bytes {member.offset_data} to {member.offset_data + member.size})",
                    )
                parsed = _member_key(member.name) if member.isfile() else None
                if parsed is None:
                    continue
                key, ext = parsed
                if ext == "cls":
                    raw = tar.extractfile(member).read()
                    text = raw.decode("ascii", errors="replace").strip()
                    if not text.isdigit() or not text.isascii():
                        raise DataError(
                            f"shard {shard}: sample '{key}': {member.name} holds {raw[:20]!r}, "
                            "expected an integer label >= 0"
                        )
                    labels[key] = (int(text), (member.name, member.offset_data, member.size))
                elif "." + ext in IMAGE_EXTENSIONS:
                    if key in images:
                        raise DataError(
                            f"shard {shard}: sample '{key}' has two images ({images[key][0]}, {member.name}); "
                            "keep one image per key"
                        )
                    images[key] = (member.name, member.offset_data, member.size)
            problem = _end_of_archive_problem(f, tar.offset, size)
            if problem is not None:
                raise _truncated(shard, problem)
    except (tarfile.TarError, OSError) as e:
        raise DataError(
            f"cannot read shard {shard}: {type(e).__name__}: {e} (at byte offset {at}); "
            "is it a plain (uncompressed) tar?"
        ) from e
    orphans = sorted(labels.keys() - images.keys())
    if orphans:
        raise DataError(
            f"shard {shard}: sample '{orphans[0]}' has a .cls label but no image ({', '.join(IMAGE_EXTENSIONS)})"
        )
    samples = []
    for key, image in images.items():
        if key not in labels:
            raise DataError(f"shard {shard}: sample '{key}' ({image[0]}) has no {key}.cls label")
        samples.append(ShardSample(key, labels[key][0], image, labels[key][1]))
    return samples


def dali_index(samples: list[list[Member]]) -> str:
    """DALI's index of a shard (the format of its ``wds2idx`` tool) that lists ``samples`` in order, each given by
    its members: a line 'v1.2 <samples>', then per sample '<ext> <data offset> <size> <name>' for each member.

    DALI's ``fn.readers.webdataset`` reads the samples of an index in its order, and only those. A name is
    DALI's label of the member in messages; whitespace in it (which would end the field) becomes '_'.
    """
    lines = [f"{DALI_INDEX_VERSION} {len(samples)}"]
    for members in samples:
        fields = []
        for name, offset, size in members:
            base = posixpath.basename(name)
            fields.append(f"{base[base.find('.') + 1 :]} {offset} {size} {'_'.join(name.split())}")
        lines.append(" ".join(fields))
    return "\n".join(lines) + "\n"


def dali_index_path(shard: str | Path) -> Path:
    """Where DALI's index of ``shard`` lies: beside it, named as ``wds2idx`` names it (``shard-00000.idx``)."""
    return Path(shard).with_suffix(".idx")


def _scan_shards(folder: Path, shards: list[Path]) -> ShardIndex:
    """Index ``shards`` (the split in ``folder``); ``labels`` holds the raw .cls values."""
    shard_ids, offsets, sizes, members, labels = [], [], [], [], []
    for sid, shard in enumerate(shards):
        for sample in scan_shard(shard):
            member, offset, size = sample.image
            shard_ids.append(sid)
            offsets.append(offset)
            sizes.append(size)
            members.append(os.fsencode(member))
            labels.append(sample.label)
    if not members:
        raise DataError(f"the shards in {folder} hold no samples (<key>.<jpg|png|...> + <key>.cls)")
    return ShardIndex(
        where=folder,
        shards=[str(s) for s in shards],
        shard_ids=np.array(shard_ids, dtype=np.int32),
        offsets=np.array(offsets, dtype=np.int64),
        sizes=np.array(sizes, dtype=np.int64),
        members=np.array(members, dtype=np.bytes_),
        labels=np.array(labels, dtype=np.int64),
        class_names=[],
    )


def _shards_of(root: Path, split: str) -> tuple[Path, list[Path]]:
    """The folder of ``split``'s shards and the shards, sorted by name."""
    if root.is_file():
        if split == "test":
            raise _no_test_split(root, f"put the shards in {root.parent}/train/ and {root.parent}/test/")
        return root.parent, [root]
    folder = _split_folder(root, split, "webdataset")
    shards = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(".tar"))
    if not shards:
        raise DataError(
            f"{folder} holds no .tar shards; a webdataset root holds train/*.tar (and test/*.tar) or *.tar "
            "directly, e.g. as written by `gali data prepare`"
        )
    return folder, shards


def _open_webdataset(root: Path, split: str) -> ShardIndex:
    _require_root(root, "webdataset")
    index = _scan_shards(*_shards_of(root, split))
    train_folder, train_shards = _shards_of(root, "train")
    train_values = index.labels if split == "train" else _scan_shards(train_folder, train_shards).labels
    names, table, origin = _class_table(train_values, [root.parent] if root.is_file() else [root, train_folder])
    labels = _map_labels(index.labels, table, origin, lambda j: f"sample {index.name(j)}")
    return replace(index, labels=labels, class_names=names)


def open_split(source: str, root: str | Path, split: str) -> SplitIndex:
    """Index ``split`` ('train' or 'test') of the ``source`` ('folder', 'filelist', 'webdataset') at ``root``.

    Raises ``DataError`` naming the path (and line, or shard and key) for a missing root or split,
    an empty one, or a malformed entry; ``ValueError`` for an unknown source or split.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(root).expanduser()
    if source == "folder":
        return _open_folder(root, split)
    if source == "filelist":
        return _open_filelist(root, split)
    if source == "webdataset":
        return _open_webdataset(root, split)
    raise ValueError(f"source must be one of {SOURCES_ON_DISK}, got {source!r}")


def detect_source(root: str | Path) -> str:
    """The layout of ``root``: 'filelist' (a .txt file, or a folder with train.txt/test.txt),
    'webdataset' (a .tar file, or .tar shards in the folder or its train/ or test/), else 'folder'."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"{root} does not exist; give an image folder, a filelist folder or .txt, or a shard folder")
    if root.is_file():
        if root.name.endswith(".txt"):
            return "filelist"
        if root.name.endswith(".tar"):
            return "webdataset"
        raise DataError(f"{root} is neither a .txt list nor a .tar shard; give an image folder, a list or shards")
    for folder in (root, root / "train", root / "test"):
        if folder.is_dir() and any(p.name.endswith(".tar") and p.is_file() for p in folder.iterdir()):
            return "webdataset"
    if (root / "train.txt").is_file() or (root / "test.txt").is_file():
        return "filelist"
    return "folder"


def split_names(source: str, root: str | Path) -> list[str]:
    """The splits that ``root`` holds in the ``source`` layout: ['train'] or ['train', 'test']."""
    root = Path(root).expanduser()
    if source == "filelist":
        has_test = root.is_dir() and (root / "test.txt").is_file()
    else:
        has_test = (root / "train").is_dir() and (root / "test").is_dir()
    return ["train", "test"] if has_test else ["train"]
