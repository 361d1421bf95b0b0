"""Evaluation inputs: labelled image sets and caption sets, from the layouts benchmarks ship in.

Image sets (`ImageSet`: where each image's bytes are, its label, optionally its group):
  gpr1200   a folder of `{class}_{name}.jpg` (GPR1200 as it ships); groups = subsets in blocks of
            200 classes (Landmarks, iNat, Sketch, INSTRE, SOP, Faces)
  folder    an image-folder tree `class/xxx.jpg`
  shards    our image shards (`<root>/images/*.tar` with `.cls`; labels named from labels.json)
Caption sets (`CaptionSet`: texts and the images that carry each text, identical texts merged):
  karpathy  the Karpathy-split json of COCO/Flickr30k (`images[].filepath/filename/sentences[].raw`)
  shards    our shards: alt text (`.txt`) or a caption set's captions (`captions/<set>/`)
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shards.captions import ALT_TEXT
from stages.errors import StageConfigError
from stages.layout import RunLayout, read_labels

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
GPR1200_SUBSETS = ("Landmarks", "iNat", "Sketch", "INSTRE", "SOP", "Faces")
GPR1200_NAME = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class ImageRef:
    """Image bytes in a file, or `size` bytes at `offset` inside a tar."""

    path: Path
    offset: int = 0
    size: int = -1

    def read(self) -> bytes:
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            return handle.read(self.size)


@dataclass
class ImageSet:
    name: str
    refs: list[ImageRef]
    labels: np.ndarray  # one label string per image
    groups: np.ndarray | None = None
    _identity: str | None = field(default=None, repr=False, compare=False)

    def identity(self) -> str:
        """Changes when any listed image is added, removed, resized or relabelled (the name is not part)."""
        if self._identity is not None:
            return self._identity
        digest = hashlib.sha256()
        for ref, label in zip(self.refs, self.labels):
            stat = ref.path.stat()
            digest.update(
                f"{ref.path}|{ref.offset}|{ref.size}|{stat.st_size}|{stat.st_mtime_ns}|{label}\n".encode()
            )
        self._identity = digest.hexdigest()[:16]
        return self._identity


@dataclass
class CaptionSet:
    images: ImageSet
    texts: list[str]
    owners: list[np.ndarray] = field(default_factory=list)  # per text: indices of the images carrying it


def _require_dir(path: Path, what: str) -> Path:
    if not Path(path).is_dir():
        raise StageConfigError(f"{what} not found: {path}")
    return Path(path)


def gpr1200_folder(path: Path, name: str = "gpr1200") -> ImageSet:
    files = sorted(
        p for p in _require_dir(path, "GPR1200 folder").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
    )
    labels, groups = [], []
    for file in files:
        match = GPR1200_NAME.match(file.stem)
        if not match:
            raise StageConfigError(f"{file}: not a GPR1200 file name (expected '<class>_<name>.jpg')")
        cls = int(match.group(1))
        labels.append(str(cls))
        groups.append(
            GPR1200_SUBSETS[cls // 200] if cls < 200 * len(GPR1200_SUBSETS) else f"block{cls // 200}"
        )
    if not files:
        raise StageConfigError(f"GPR1200 folder has no images: {path}")
    return ImageSet(name, [ImageRef(f) for f in files], np.array(labels), np.array(groups))


def image_folder(path: Path, name: str = "folder") -> ImageSet:
    root = _require_dir(path, "image folder")
    refs, labels = [], []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(class_dir.iterdir(), key=_natural):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                refs.append(ImageRef(file))
                labels.append(class_dir.name)
    if not refs:
        raise StageConfigError(f"image folder has no 'class/image' files: {path}")
    return ImageSet(name, refs, np.array(labels))


def _natural(path: Path) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name))


def shard_images(root: Path, name: str = "shards", captions: str | None = None):
    """Our image shards under `<root>/images/`; returns (ImageSet, the SampleRefs behind it)."""
    from stages.training.data import index_samples

    layout = RunLayout(root)
    units = layout.downloaded().units
    if captions is not None:
        layout.captioned(captions)
    samples = index_samples(layout.root, units, captions)
    names = dict(enumerate(read_labels(layout) or []))
    labels = np.array([names.get(s.cls, str(s.cls)) for s in samples])
    return ImageSet(name, [ImageRef(s.tar, s.jpg_offset, s.jpg_size) for s in samples], labels), samples


def karpathy_captions(
    path: Path, image_root: Path | None = None, split: str = "test", name: str = "karpathy"
) -> CaptionSet:
    """Images of `split` and their sentences; `filepath/filename` are taken from `image_root`
    (default: the json's folder)."""
    try:
        entries = json.loads(Path(path).read_text())["images"]
    except FileNotFoundError:
        raise StageConfigError(f"caption file not found: {path}") from None
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise StageConfigError(f"{path}: not a Karpathy-split json with an 'images' list ({err})") from None
    root = Path(image_root) if image_root is not None else Path(path).parent
    refs, labels, texts = [], [], []
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict) or entry.get("split", split) != split:
            continue
        try:
            file = root / entry.get("filepath", "") / entry["filename"]
            sentences = [s["raw"] for s in entry.get("sentences", [])]
        except (KeyError, TypeError) as err:
            raise StageConfigError(
                f"{path}: image entry {number} has no {err} (Karpathy json: filename, sentences[].raw)"
            ) from None
        if not file.is_file():
            raise StageConfigError(f"{path}: image {file} listed in the caption file does not exist")
        refs.append(ImageRef(file))
        labels.append(entry.get("filepath", ""))
        texts.append(sentences)
    if not refs:
        raise StageConfigError(f"{path}: no images in split {split!r}")
    return merge_texts(ImageSet(name, refs, np.array(labels)), texts)


def shard_captions(root: Path, captions: str = ALT_TEXT, name: str = "shards") -> CaptionSet:
    """Our shards' alt text (`captions: alt`) or every caption of a caption set."""
    images, samples = shard_images(root, name, None if captions == ALT_TEXT else captions)
    texts = [[s.alt_text] if captions == ALT_TEXT else list(s.captions) for s in samples]
    return merge_texts(images, texts)


def merge_texts(images: ImageSet, texts_per_image: list[list[str]]) -> CaptionSet:
    """One query per distinct text (whitespace and case folded); its owners are every image carrying it."""
    owners: dict[str, list[int]] = {}
    shown: dict[str, str] = {}
    for index, texts in enumerate(texts_per_image):
        for text in texts:
            folded = " ".join(text.lower().split())
            if folded:
                owners.setdefault(folded, []).append(index)
                shown.setdefault(folded, text.strip())
    if not owners:
        raise StageConfigError(f"{images.name}: no captions to query with")
    return CaptionSet(images, [shown[k] for k in owners], [np.unique(v) for v in owners.values()])


def class_names(path: Path) -> dict[str, str]:
    """Label -> class name, from a json mapping or a text file of `label<TAB>name` (or one name per
    line, the label being the name itself)."""
    path = Path(path)
    if not path.is_file():
        raise StageConfigError(f"class names file not found: {path}")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise StageConfigError(f"{path}: class names are not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise StageConfigError(f"{path}: expected a json object label -> class name")
        return {str(k): str(v) for k, v in data.items()}
    pairs = [line.split("\t", 1) for line in path.read_text().splitlines() if line.strip()]
    return {p[0]: p[-1].strip() for p in pairs}
