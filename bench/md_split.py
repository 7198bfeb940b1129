"""A synthetic Meta-Dataset split on disk, written by the project's own writer.

``synthetic_md_split(data_dir, num_images)`` prepares ``meta_dataset/ilsvrc_2012``'s
train split in ``data_dir`` through ``meta_dataset.prepare`` (the TFDS builder that
writes real sources: 84x84x3 uint8, zlib-compressed tensors in array_record shards), with
generated pixels and a reduced class list, and reads it back lazily through
``benchmarks.load_split``: the same read path as a prepared ImageNet train split. It is
written once per ``(data_dir, num_images, num_classes)`` and reused.

The pixels are smooth colour fields plus mild noise, so zlib has about as much to do as
on photographs (random noise would not compress; flat images would compress to nothing).
"""

from __future__ import annotations

import os

import numpy as np

SOURCE = "ilsvrc_2012"


def _class_splits(num_classes: int):
    from flatfsc_jax.data import meta_dataset as md

    names = tuple(f"synthetic_{c:04d}" for c in range(num_classes))
    return md.ClassSplits(SOURCE, {"train": names, "valid": (), "test": ()})


def _image(index: int, num_classes: int) -> np.ndarray:
    """Example ``index``'s pixels: an upsampled 6x6 colour field plus noise, seeded by
    the index (so a rebuilt split is identical)."""
    rng = np.random.default_rng(index)
    coarse = rng.integers(0, 256, (6, 6, 3)).astype(np.float32)
    field = np.kron(coarse, np.ones((14, 14, 1), np.float32))  # 84 x 84 x 3
    noise = rng.normal(0.0, 6.0, field.shape).astype(np.float32)
    return np.clip(field + noise, 0, 255).astype(np.uint8)


def synthetic_md_split(data_dir: str, num_images: int, num_classes: int = 100):
    """The lazily read ``SplitData`` of a synthetic MD-format train split of
    ``num_images`` 84-px images in ``num_classes`` classes, prepared under ``data_dir``
    (``<data_dir>/n<num_images>_c<num_classes>``) unless it is there already."""
    from flatfsc_jax.data import benchmarks
    from flatfsc_jax.data import meta_dataset as md

    if num_images < num_classes:
        raise ValueError(f"num_images={num_images} must be >= num_classes={num_classes}")
    root = os.path.join(os.path.abspath(data_dir), f"n{num_images}_c{num_classes}")
    splits = _class_splits(num_classes)

    def examples():
        for i in range(num_images):
            # A callable: convert_split only computes the pixels of examples it keeps.
            yield (lambda i=i: _image(i, num_classes)), splits.classes["train"][i % num_classes]

    marker = os.path.join(root, "COMPLETE")
    if not os.path.exists(marker):
        from tensorflow_datasets.core import shuffle

        # TFDS's writer spills a split of more than MAX_MEM_BUFFER_SIZE (1 GB) of records
        # to temporary files through tf.io.gfile, which needs TensorFlow: keep it in
        # memory instead (about 21 KB per image). The files written are the same.
        limit = shuffle.MAX_MEM_BUFFER_SIZE
        shuffle.MAX_MEM_BUFFER_SIZE = max(limit, 32 * 1024 * num_images)
        try:
            md.prepare(SOURCE, root, examples_fn=examples, class_splits=splits, overwrite=True)
        finally:
            shuffle.MAX_MEM_BUFFER_SIZE = limit
        with open(marker, "w") as f:
            f.write(f"{num_images} images\n")
    return benchmarks.load_split("meta_dataset", SOURCE, "train", root, class_splits=splits)
