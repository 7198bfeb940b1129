"""One domain's class split as random-access data: the unit every consumer reads.

A *source* is a domain of a benchmark ("glyphs/latin", "meta_dataset/omniglot"); its
classes are partitioned into the splits "train", "valid" and "test" (Meta-Dataset's
class splits, not image splits). ``SplitData`` is what the episode sampler, the training
input pipeline and the evaluator consume: integer labels ``0..num_classes-1`` local to
the split, and images fetched by index (uint8, HWC).
"""

from __future__ import annotations

import dataclasses
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
