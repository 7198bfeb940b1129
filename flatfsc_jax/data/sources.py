"""One domain's class split as random-access data: the unit every consumer reads.

A *source* is a domain of a benchmark ("glyphs/latin", "meta_dataset/omniglot"); its
classes are partitioned into the splits "train", "valid" and "test" (Meta-Dataset's
class splits, not image splits). ``SplitData`` is what the episode sampler, the training
input pipeline and the evaluator consume: integer labels ``0..num_classes-1`` local to
the split, and images fetched by index (uint8, HWC).

This module is also the one reader of the *episodic split format* every benchmark is
prepared into (``read_prepared_split``, with the cheap ``verify_prepared``). It knows no
benchmark: ``benchmarks.load_split`` chooses the builder, config and checks per
benchmark, so the benchmark modules import this one and never the reverse.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

SPLITS = ("train", "valid", "test")


def preprocess(images: Any) -> Any:
    """uint8 [0, 255] -> float32 [-1, 1], Meta-Dataset's ``2 * (x / 255 - 0.5)``.

    Works on numpy and jax arrays alike (uses the array's own methods).
    """
    return images.astype(np.float32) * (2.0 / 255.0) - 1.0


@dataclasses.dataclass
class SplitData:
    """One class split of one source.

    Attributes:
      source: "benchmark/domain", e.g. "glyphs/latin".
      split: "train", "valid" or "test".
      images: random access to uint8 HWC images: an ``np.ndarray`` [N, H, W, C] or any
        object with ``__len__`` and ``__getitem__(int)`` (e.g. a ``tfds.data_source``
        wrapped to return the image).
      labels: int32 [N] class index in ``0..num_classes-1``.
      class_names: one name per class index.
      class_groups: optional int32 [num_classes]: the super-group of each class
        (Omniglot's alphabet), used by the alphabet-first episode sampler.
      class_hierarchy: optional mapping node name -> int array of the class indices
        (leaves) under it (ImageNet's WordNet DAG restricted to the split).
      provenance: optional dict: where the source's images came from and how they were
        made (``meta_dataset.provenance``), as its metadata records it.
    """

    source: str
    split: str
    images: Any
    labels: np.ndarray
    class_names: Sequence[str]
    class_groups: np.ndarray | None = None
    class_hierarchy: dict[str, np.ndarray] | None = None
    provenance: dict | None = None

    def __post_init__(self):
        self.labels = np.asarray(self.labels, np.int32)
        if len(self.labels) != len(self.images):
            raise ValueError(
                f"{self.source}/{self.split}: {len(self.images)} images but "
                f"{len(self.labels)} labels"
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(np.asarray(self.images[0]).shape)

    def get_images(self, indices) -> np.ndarray:
        """uint8 [len(indices), H, W, C] for integer ``indices``."""
        indices = np.asarray(indices)
        if isinstance(self.images, np.ndarray):
            return self.images[indices]
        return np.stack([np.asarray(self.images[int(i)]) for i in indices])

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)


# ----------------------------------------------------------------------------------------
# The "episodic split format": how every prepared source is stored (TFDS, array_record).
#
#   <data_dir>/<builder>/<config>/<version>/   (written by a tfds GeneratorBasedBuilder)
#   features: image = Tensor(H, W, C) uint8, label = Scalar int64 (class index local to split)
#   splits:   any of "train", "valid", "test" (class splits)
#   metadata: {"class_names": {split: [str]},
#              optional "class_groups": {split: [int per class]}, "group_names": [str],
#              optional "class_hierarchy": {split: {node: [class indices]}}}
# Glyphs and the Meta-Dataset sources are both written this way, so one reader serves all.
# ----------------------------------------------------------------------------------------


class MissingDataError(FileNotFoundError):
    """A source has not been prepared in the data directory."""


def prepared_dir(data_dir, builder: str, config: str):
    """The newest prepared version directory of ``builder/config`` or ``None``."""
    from etils import epath

    root = epath.Path(data_dir) / builder / config
    if not root.exists():
        return None
    versions = [
        p
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith("incomplete") and (p / "dataset_info.json").exists()
    ]
    if not versions:
        return None
    return max(versions, key=lambda p: tuple(int(x) for x in p.name.split(".")))


# The only feature classes our builders write (data/glyphs.py, data/meta_dataset/builder.py).
# TFDS imports the Python module named by each "pythonClassName" of a prepared
# features.json when it opens the directory: anything else is refused before TFDS reads it.
FEATURE_CLASSES = frozenset(
    {
        "tensorflow_datasets.core.features.features_dict.FeaturesDict",
        "tensorflow_datasets.core.features.tensor_feature.Tensor",
        "tensorflow_datasets.core.features.scalar.Scalar",
    }
)


def _class_names(tree) -> list[str]:
    if isinstance(tree, dict):
        out = [tree["pythonClassName"]] if isinstance(tree.get("pythonClassName"), str) else []
        for v in tree.values():
            out += _class_names(v)
        return out
    if isinstance(tree, list):
        return [n for v in tree for n in _class_names(v)]
    return []


def verify_prepared(path, splits, *, source: str) -> None:
    """Checks a prepared version directory without reading any image (cheap).

    Presence and JSON of ``dataset_info.json``, ``features.json`` and ``metadata.json``,
    only our own feature classes in ``features.json``, every requested split listed and
    all of its shard files present. Raises ``MissingDataError`` naming the file and fix.
    """
    root = os.fspath(path)
    fix = f"delete {root!r} and prepare it again"
    docs = {}
    for name in ("dataset_info.json", "features.json", "metadata.json"):
        try:
            with open(os.path.join(root, name), encoding="utf-8") as f:
                docs[name] = json.load(f)
        except (OSError, ValueError) as e:
            raise MissingDataError(
                f"source {source!r}: {name} in {root!r} is missing or unreadable "
                f"({type(e).__name__}: {e}); {fix}"
            ) from e
        if not isinstance(docs[name], dict):
            raise MissingDataError(
                f"source {source!r}: {name} in {root!r} is not a JSON object; {fix}"
            )
    foreign = sorted(set(_class_names(docs["features.json"])) - FEATURE_CLASSES)
    if foreign:
        raise MissingDataError(
            f"source {source!r}: features.json in {root!r} names feature classes this "
            f"project never writes ({foreign}); TFDS would import them. Data directories "
            f"are trusted input: {fix}"
        )
    info = docs["dataset_info.json"]
    listed = {sp.get("name"): sp for sp in info.get("splits", []) if isinstance(sp, dict)}
    for split in splits:
        if split not in listed:
            raise MissingDataError(
                f"source {source!r}: dataset_info.json in {root!r} has no {split!r} split; {fix}"
            )
        shards = len(listed[split].get("shardLengths", []))
        for i in range(shards):
            name = f"{info.get('name')}-{split}.{info.get('fileFormat')}-{i:05d}-of-{shards:05d}"
            if not os.path.isfile(os.path.join(root, name)):
                raise MissingDataError(f"source {source!r}: {name} is missing in {root!r}; {fix}")


class _LazyImages:
    """Random access to the stored images; read errors name the directory to rebuild.

    Pickles as (path, split) and reopens the files on first access, so grain worker
    processes get their own readers.
    """

    def __init__(self, path: str, split: str, num_examples: int, corrupt, data_source=None):
        self._path, self._split = path, split
        self._num_examples = num_examples
        self._corrupt = corrupt
        self._ds = data_source

    def __len__(self) -> int:
        return self._num_examples

    def __getitem__(self, index) -> np.ndarray:
        import tensorflow_datasets as tfds

        try:
            if self._ds is None:
                self._ds = tfds.builder_from_directory(self._path).as_data_source(self._split)
            return self._ds[int(index)]["image"]
        except Exception as e:
            raise MissingDataError(self._corrupt(e)) from e

    def __getitems__(self, indices) -> list[np.ndarray]:
        """The images at ``indices`` in one batched array_record read."""
        import tensorflow_datasets as tfds

        try:
            if self._ds is None:
                self._ds = tfds.builder_from_directory(self._path).as_data_source(self._split)
            return [r["image"] for r in self._ds.__getitems__([int(i) for i in indices])]
        except Exception as e:
            raise MissingDataError(self._corrupt(e)) from e

    def __getstate__(self):
        return {**self.__dict__, "_ds": None}


@dataclasses.dataclass(frozen=True)
class _CorruptMessage:
    """The error text of a damaged prepared directory (picklable: lazy images keep one)."""

    source: str
    path: str
    prepare_command: str | None = None

    def __call__(self, error: Exception) -> str:
        command = f": {self.prepare_command}" if self.prepare_command else ""
        return (
            f"source {self.source!r} in {self.path!r} is corrupted ({type(error).__name__}: "
            f"{error}); delete that directory and prepare it again{command}"
        )


def _cached_labels(builder, split: str, path: str, num_examples: int, corrupt) -> np.ndarray:
    """Labels of a split, cached in ``<version dir>/labels/<split>.npy``.

    Reading them means parsing every record (images are not decoded), so the first read
    of a large source takes a while; the cache makes later reads instant.
    """
    import tensorflow_datasets as tfds

    cache = os.path.join(path, "labels", f"{split}.npy")
    if epath.Path(cache).exists():
        try:
            with epath.Path(cache).open("rb") as f:
                labels = np.load(f)
            if labels.shape == (num_examples,):
                return labels.astype(np.int32)
        except (OSError, ValueError):
            pass  # unreadable cache: recompute below
    ds = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
    labels = np.empty(num_examples, np.int32)
    chunk = 8192
    try:
        for start in range(0, num_examples, chunk):
            stop = min(num_examples, start + chunk)
            records = ds.__getitems__(list(range(start, stop)))
            labels[start:stop] = [r["label"] for r in records]
    except Exception as e:
        raise MissingDataError(corrupt(e)) from e
    if "://" in cache:  # cloud storage (gs://): object writes are atomic already
        with contextlib.suppress(OSError):
            epath.Path(cache).parent.mkdir(parents=True, exist_ok=True)
            with epath.Path(cache).open("wb") as f:
                np.save(f, labels)
        return labels
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        # Atomic: processes sharing a data directory (one per GPU) never read a
        # half-written cache; the last writer's identical file wins.
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(cache), suffix=".npy.tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, labels)
            os.replace(tmp, cache)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass  # read-only data directory: no cache, still correct
    return labels


def _check_shards(data_source, split_info, corrupt) -> None:
    """Reads the first and last record of every shard: a truncated file fails here."""
    offsets = np.cumsum([0] + list(split_info.shard_lengths))
    try:
        for start, stop in zip(offsets[:-1], offsets[1:], strict=True):
            if stop > start:
                data_source.__getitems__([int(start), int(stop) - 1])
    except Exception as e:
        raise MissingDataError(corrupt(e)) from e


def _read_all(data_source, num_examples: int, corrupt) -> tuple[np.ndarray, np.ndarray]:
    """Every image and label of a split, read in chunks of records."""
    images, labels = [], []
    try:
        for start in range(0, num_examples, 4096):
            records = data_source.__getitems__(list(range(start, min(num_examples, start + 4096))))
            images.extend(r["image"] for r in records)
            labels.extend(r["label"] for r in records)
    except Exception as e:
        raise MissingDataError(corrupt(e)) from e
    return np.stack(images), np.asarray(labels, np.int32)


def read_prepared_split(
    data_dir,
    builder: str,
    config: str,
    split: str,
    *,
    source: str | None = None,
    in_memory: bool = True,
    class_names: Sequence[str] | None = None,
    prepare_command: str | None = None,
) -> SplitData:
    """Reads one class split stored in the episodic split format: the only reader of it.

    Args:
      data_dir: the TFDS data directory.
      builder, config: e.g. ``"glyphs", "latin"``.
      split: ``"train"``, ``"valid"`` or ``"test"``.
      source: name recorded in the result (default ``"builder/config"``).
      in_memory: load all images into one numpy array (right for small sources such as
        Glyphs); otherwise images are read lazily by index from the array_record files
        (picklable for grain workers) and the labels are read once and cached on disk.
      class_names: the classes the split must have been prepared with (Meta-Dataset's
        class splits in use); ``None`` accepts the stored ones.
      prepare_command: the command that prepares the source again, added to errors.

    Raises:
      ValueError: unknown split, or prepared with other ``class_names``.
      MissingDataError: not prepared, or the prepared files are damaged.
    """
    import tensorflow_datasets as tfds

    source = source or f"{builder}/{config}"
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is unknown; choose one of {SPLITS}")
    path = prepared_dir(data_dir, builder, config)
    if path is None:
        raise MissingDataError(
            f"source {source!r} is not prepared in data_dir={str(data_dir)!r} "
            f"(no {builder}/{config}/<version>/dataset_info.json)"
        )
    verify_prepared(path, (split,), source=source)
    corrupt = _CorruptMessage(source, str(path), prepare_command)
    try:
        tfds_builder = tfds.builder_from_directory(str(path))
        split_info = tfds_builder.info.splits[split]
    except Exception as e:  # corrupted dataset_info/features files, or a split missing
        raise MissingDataError(corrupt(e)) from e
    metadata = tfds_builder.info.metadata or {}
    stored_names = list(metadata.get("class_names", {}).get(split, []))
    if class_names is not None and stored_names != list(class_names):
        raise ValueError(
            f"{source} in {str(path)!r} was prepared with other {split} classes than the "
            f"class splits in use ({len(stored_names)} vs {len(class_names)}); prepare it "
            "again with --overwrite"
        )
    num_examples = split_info.num_examples
    if num_examples == 0:
        raise MissingDataError(corrupt(ValueError("empty split")))
    data_source = tfds_builder.as_data_source(split)
    if in_memory:
        images, labels = _read_all(data_source, num_examples, corrupt)
    else:
        _check_shards(data_source, split_info, corrupt)
        labels = _cached_labels(tfds_builder, split, str(path), num_examples, corrupt)
        images = _LazyImages(str(path), split, num_examples, corrupt, data_source)
    if not stored_names:
        stored_names = [str(c) for c in range(int(labels.max()) + 1)]
    groups = metadata.get("class_groups", {}).get(split)
    hierarchy = metadata.get("class_hierarchy", {}).get(split)
    return SplitData(
        source=source,
        split=split,
        images=images,
        labels=labels,
        class_names=stored_names,
        class_groups=None if groups is None else np.asarray(groups, np.int32),
        class_hierarchy=None
        if hierarchy is None
        else {k: np.asarray(v, np.int32) for k, v in hierarchy.items()},
        provenance=metadata.get("provenance"),
    )
