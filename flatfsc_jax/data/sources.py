"""One domain's class split as random-access data: the unit every consumer reads.

A *source* is a domain of a benchmark ("glyphs/latin", "meta_dataset/omniglot"); its
classes are partitioned into the splits "train", "valid" and "test" (Meta-Dataset's
class splits, not image splits). ``SplitData`` is what the episode sampler, the training
input pipeline and the evaluator consume: integer labels ``0..num_classes-1`` local to
the split, and images fetched by index (uint8, HWC).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

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
    """

    source: str
    split: str
    images: Any
    labels: np.ndarray
    class_names: Sequence[str]
    class_groups: np.ndarray | None = None
    class_hierarchy: dict[str, np.ndarray] | None = None

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


# The only feature classes our builders write (data/glyphs.py, data/meta_dataset.py).
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


class _ImageView:
    """Random access to the ``image`` feature of a ``tfds`` data source."""

    def __init__(self, data_source):
        self._ds = data_source

    def __len__(self):
        return len(self._ds)

    def __getitem__(self, i):
        return self._ds[int(i)]["image"]


def read_prepared_split(
    data_dir,
    builder: str,
    config: str,
    split: str,
    *,
    source: str | None = None,
    in_memory: bool = True,
) -> SplitData:
    """Reads one class split stored in the episodic split format.

    Args:
      data_dir: the TFDS data directory.
      builder, config: e.g. ``"glyphs", "latin"``.
      split: ``"train"``, ``"valid"`` or ``"test"``.
      source: name recorded in the result (default ``"builder/config"``).
      in_memory: load all images into one numpy array (right for small sources such as
        Glyphs); otherwise images are read lazily by index from the array_record files.
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
    try:
        tfds_builder = tfds.builder_from_directory(str(path))
    except Exception as e:  # corrupted dataset_info/features files
        raise MissingDataError(
            f"source {source!r} in {str(path)!r} is corrupted ({type(e).__name__}: {e}); "
            "delete that directory and prepare it again"
        ) from e
    if split not in tfds_builder.info.splits:
        available = sorted(tfds_builder.info.splits.keys())
        raise ValueError(f"source {source!r} has no {split!r} split; it has {available}")
    metadata = tfds_builder.info.metadata or {}
    class_names = list(metadata.get("class_names", {}).get(split, []))
    data_source = tfds_builder.as_data_source(split)
    n = len(data_source)
    if n == 0:
        raise ValueError(f"source {source!r} split {split!r} is empty in {str(path)!r}")
    try:
        records = data_source.__getitems__(list(range(n))) if in_memory else None
    except Exception as e:
        raise MissingDataError(
            f"source {source!r} split {split!r}: reading {str(path)!r} failed "
            f"({type(e).__name__}: {e}); delete that directory and prepare it again"
        ) from e
    if in_memory:
        images = np.stack([r["image"] for r in records])
        labels = np.asarray([r["label"] for r in records], np.int32)
    else:
        images = _ImageView(data_source)
        labels = _labels_of(data_source)
    if not class_names:
        class_names = [str(c) for c in range(int(labels.max()) + 1)]
    groups = metadata.get("class_groups", {}).get(split)
    hierarchy = metadata.get("class_hierarchy", {}).get(split)
    return SplitData(
        source=source,
        split=split,
        images=images,
        labels=labels,
        class_names=class_names,
        class_groups=None if groups is None else np.asarray(groups, np.int32),
        class_hierarchy=None
        if hierarchy is None
        else {k: np.asarray(v, np.int32) for k, v in hierarchy.items()},
    )


def _labels_of(data_source) -> np.ndarray:
    """All labels of a data source, read in chunks (decodes images too: cache if large)."""
    n, chunk, out = len(data_source), 4096, []
    for start in range(0, n, chunk):
        recs = data_source.__getitems__(list(range(start, min(n, start + chunk))))
        out.extend(r["label"] for r in recs)
    return np.asarray(out, np.int32)


# ----------------------------------------------------------------------------------------
# One entry point for every benchmark's sources.
# ----------------------------------------------------------------------------------------

BENCHMARKS = ("meta_dataset", "glyphs")


def load(source: str, split: str, data_dir, **kwargs) -> SplitData:
    """The class split ``split`` of ``source`` = ``"<benchmark>/<domain>"``.

    ``"meta_dataset/<name>"`` (names in ``meta_dataset.ALL_SOURCES``) and
    ``"glyphs/<domain>"``; keyword arguments go to the benchmark's ``load_split``.
    The benchmark modules are imported on first use.
    """
    benchmark, sep, domain = str(source).partition("/")
    if sep and domain and benchmark == "meta_dataset":
        from flatfsc_jax.data import meta_dataset

        return meta_dataset.load_split(domain, split, data_dir, **kwargs)
    if sep and domain and benchmark == "glyphs":
        from flatfsc_jax.data import glyphs

        return glyphs.load_split(domain, split, data_dir, **kwargs)
    from flatfsc_jax.data import meta_dataset

    valid = [f"meta_dataset/{name}" for name in meta_dataset.ALL_SOURCES] + ["glyphs/<domain>"]
    raise ValueError(
        f"source {source!r} is unknown; use '<benchmark>/<domain>' with benchmark in "
        f"{BENCHMARKS}: {valid}"
    )
