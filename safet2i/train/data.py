"""Labelled images for the cost-model trainer: folders, a CSV, or the lab world.

Every source gives an :class:`ImageSet`: labels (1 = unsafe, 0 = safe), a name per image and
a loader that returns one ``uint8 [H, W, 3]`` RGB image at a time, so a large set is never
held decoded in memory (the trainer turns images into network inputs or frozen features in
chunks). Files are read with :func:`safet2i.images.load_image_file`, the filter's own reader:
the same byte and pixel budgets, EXIF orientation and colour-profile handling, so a model is
trained on the pixels the filter will see. An animated file contributes its first frame.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ImageInputError

#: Label words accepted in a CSV (case-insensitive) -> 1 unsafe / 0 safe.
LABEL_WORDS = {"unsafe": 1, "1": 1, "true": 1, "nsfw": 1, "safe": 0, "0": 0, "false": 0, "sfw": 0}


@dataclass
class ImageSet:
    """Labelled images: ``labels[i]`` (1 unsafe, 0 safe), ``names[i]`` (a path or a lab-world
    sample id, for messages) and ``load(i)`` -> ``uint8 [H, W, 3]`` RGB."""

    labels: np.ndarray
    names: list[str]
    load: Callable[[int], np.ndarray]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> ImageSet:
        """The images at ``index`` (in that order)."""
        index = np.asarray(index, np.int64)
        load = self.load
        names = [self.names[i] for i in index]
        return ImageSet(self.labels[index].copy(), names, lambda i: load(int(index[i])))

    def chunks(self, size: int) -> Iterator[list[np.ndarray]]:
        """The images, ``size`` at a time, in order."""
        for start in range(0, len(self), size):
            yield [self.load(i) for i in range(start, min(start + size, len(self)))]

    def counts(self) -> dict[str, int]:
        return {"unsafe": int(self.labels.sum()), "safe": int(len(self.labels) - self.labels.sum())}


def _read_image(path: str) -> np.ndarray:
    """The first frame of an image file as ``uint8 [H, W, 3]`` RGB (the filter's reader)."""
    from ..images import load_image_file  # noqa: PLC0415

    try:
        return load_image_file(path).frames[0]
    except ImageInputError as exc:
        raise ImageInputError(f"Training image {path} cannot be used: {exc}") from exc


def _file_set(paths: list[str], labels: list[int]) -> ImageSet:
    if not paths:
        raise ValueError("No training images found.")
    return ImageSet(np.asarray(labels, np.int64), list(paths), lambda i: _read_image(paths[i]))


def from_folders(root: str | os.PathLike) -> ImageSet:
    """Images under ``root/unsafe/`` (label 1) and ``root/safe/`` (label 0), searched
    recursively, in sorted order; only the filter's image extensions are taken."""
    from ..filter.files import IMAGE_EXTS  # noqa: PLC0415

    root = Path(root)
    paths, labels = [], []
    for label, sub in ((1, "unsafe"), (0, "safe")):
        folder = root / sub
        if not folder.is_dir():
            raise ValueError(f"{root} needs the sub-folders 'safe/' and 'unsafe/' (missing: {folder}).")
        found = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
        paths += [str(p) for p in found]
        labels += [label] * len(found)
    _need_both(labels, str(root))
    return _file_set(paths, labels)


def from_csv(path: str | os.PathLike) -> ImageSet:
    """A CSV of ``path,label`` rows (an optional header row ``path,label``). Labels: unsafe/safe,
    1/0, true/false, nsfw/sfw. Relative paths are relative to the CSV's folder."""
    path = Path(path)
    base = path.parent
    paths, labels = [], []
    with open(path, newline="", encoding="utf-8") as fh:
        for n, row in enumerate(csv.reader(fh), 1):
            if not row or all(not c.strip() for c in row):
                continue
            if n == 1 and [c.strip().lower() for c in row[:2]] == ["path", "label"]:
                continue
            if len(row) < 2:
                raise ValueError(f"{path} line {n}: expected 'path,label', got {row!r}.")
            word = row[1].strip().lower()
            if word not in LABEL_WORDS:
                raise ValueError(f"{path} line {n}: unknown label {row[1]!r}; use unsafe/safe (or 1/0).")
            p = Path(row[0].strip())
            paths.append(str(p if p.is_absolute() else base / p))
            labels.append(LABEL_WORDS[word])
    _need_both(labels, str(path))
    return _file_set(paths, labels)


def _need_both(labels: list[int], where: str) -> None:
    if 1 not in labels or 0 not in labels:
        raise ValueError(f"{where}: training needs both safe and unsafe images "
                         f"({labels.count(1)} unsafe, {labels.count(0)} safe found).")


def from_world(n_per_class: int, *, split: str = "train", size: int = 32, concept: str = "red",
               seed: int = 0) -> ImageSet:
    """``n_per_class`` concept ("unsafe") and ``n_per_class`` benign ("safe") images of the lab
    world (:mod:`safet2i.lab`). Concept images cycle through the four caption forms (the
    image does not depend on the form's wording, only on the sampled attributes). ``split``
    ``"heldout"`` draws only attribute combinations never drawn by ``"train"``."""
    from ..lab import CONCEPT_FORMS, World, WorldConfig  # noqa: PLC0415

    if n_per_class < 1:
        raise ValueError(f"n_per_class must be at least 1, got {n_per_class}.")
    world = World(WorldConfig(size=size, concept=concept, seed=seed))
    ids = [(i, CONCEPT_FORMS[i % len(CONCEPT_FORMS)]) for i in range(n_per_class)]
    ids += [(i, "benign") for i in range(n_per_class)]
    labels = np.array([1] * n_per_class + [0] * n_per_class, np.int64)
    names = [f"world:{concept}/{size}px/seed{seed}/{split}/{form}/{i}" for i, form in ids]
    return ImageSet(labels, names, lambda k: world.sample(ids[k][0], ids[k][1], split).image)


def split_heldout(data: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """A stratified, seeded split into (train, held-out): ``fraction`` of each class (at least
    one image of each) is held out."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"The held-out fraction must be in (0, 1), got {fraction}.")
    rng = np.random.default_rng([seed, 1])
    train, held = [], []
    for label in (1, 0):
        idx = np.flatnonzero(data.labels == label)
        if len(idx) < 2:
            raise ValueError(f"Need at least 2 {'unsafe' if label else 'safe'} images to hold one out.")
        idx = rng.permutation(idx)
        k = min(len(idx) - 1, max(1, round(fraction * len(idx))))
        held.append(idx[:k])
        train.append(idx[k:])
    return data.subset(np.sort(np.concatenate(train))), data.subset(np.sort(np.concatenate(held)))
