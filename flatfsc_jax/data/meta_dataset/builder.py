"""The TFDS builder that writes a Meta-Dataset source in the episodic split format.

``MetaDatasetSource`` (registered as ``meta_dataset``, one config per source) writes the
converted examples as array_record files (the format is described in ``sources.py``);
``prepare`` builds one source from the TFDS catalogue or an original archive directory.
Reading goes through ``sources.read_prepared_split``, the one reader of the format.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from flatfsc_jax.data import sources
from flatfsc_jax.data.meta_dataset.availability import prepare_command
from flatfsc_jax.data.meta_dataset.convert import IMAGE_SIZE, Example, convert_split
from flatfsc_jax.data.meta_dataset.extract import (
    catalogue_examples,
    local_examples,
    require_tensorflow,
)
from flatfsc_jax.data.meta_dataset.hierarchy import load_class_hierarchy
from flatfsc_jax.data.meta_dataset.specs import (
    ALL_SOURCES,
    BENCHMARK,
    BUILDER_NAME,
    SOURCES,
    SPLITS,
    ClassSplits,
    check_source,
    load_class_splits,
    no_catalogue_message,
)

# ----------------------------------------------------------------------------------------
# The TFDS builder
# ----------------------------------------------------------------------------------------


class MetaDatasetSource(tfds.core.GeneratorBasedBuilder):
    """Writes one Meta-Dataset source in the episodic split format (one config each).

    Args (besides tfds's ``data_dir``, ``config``, ``file_format``...):
      examples_fn: zero-argument callable returning a fresh iterable of examples
        ``(image, class name[, group])``; called once per split. Default: the TFDS
        catalogue (``catalogue_examples``, needs TensorFlow).
      class_splits: override of the shipped class splits (tests use subsets).
      class_hierarchy: split -> node -> class indices (``load_class_hierarchy``).
      max_images_per_class: keep the first N images of each class (None: all).
      manual_dir, vdd_annotations_dir: passed to ``catalogue_examples``.
    """

    name = BUILDER_NAME
    # TFDS records the builder's module in every prepared dataset_info.json ("moduleName")
    # and finds checksum files next to it: keep the name it had before meta_dataset became
    # a package, so the JSON files of directories prepared before and after are the same.
    __module__ = "flatfsc_jax.data.meta_dataset"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {
        "1.0.0": "Meta-Dataset class splits, 84x84 uint8 (bilinear, aligned corners).",
    }
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name=s, description=f"Meta-Dataset source {s}") for s in ALL_SOURCES
    ]

    def __init__(
        self,
        *,
        examples_fn: Callable[[], Iterable[Example]] | None = None,
        class_splits: ClassSplits | None = None,
        class_hierarchy: Mapping[str, Mapping[str, Sequence[int]]] | None = None,
        max_images_per_class: int | None = None,
        manual_dir: str | None = None,
        vdd_annotations_dir: str | None = None,
        **kwargs,
    ):
        # tfds calls _info() inside __init__, so everything it reads is set first.
        config = kwargs.get("config")
        config_name = config if isinstance(config, str) else getattr(config, "name", None)
        self._source = check_source(config_name or ALL_SOURCES[0])
        self._class_splits = class_splits or load_class_splits(self._source)
        self._class_hierarchy = class_hierarchy
        self._max_images_per_class = max_images_per_class
        self._catalogue_dir = os.path.expanduser(kwargs.get("data_dir") or "~/tensorflow_datasets")
        self._manual_dir = manual_dir
        self._vdd_annotations_dir = vdd_annotations_dir
        self._examples_fn = examples_fn
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        metadata = self._class_splits.metadata()
        if self._class_hierarchy is not None:
            metadata["class_hierarchy"] = {
                s: {node: [int(i) for i in idx] for node, idx in nodes.items()}
                for s, nodes in self._class_hierarchy.items()
            }
        if self._max_images_per_class is not None:
            metadata["max_images_per_class"] = int(self._max_images_per_class)
        spec = SOURCES[self._source]
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                f"Meta-Dataset source {self._source} ("
                + ("seen" if spec.seen else "unseen")
                + " domain) as class splits at 84x84: "
                + ", ".join(f"{s} {self._class_splits.num_classes(s)} classes" for s in SPLITS)
            ),
            features=tfds.features.FeaturesDict(
                {
                    # zlib: strokes/flat backgrounds (Omniglot, QuickDraw) shrink a lot.
                    "image": tfds.features.Tensor(
                        shape=(IMAGE_SIZE, IMAGE_SIZE, 3),
                        dtype=np.uint8,
                        encoding=tfds.features.Encoding.ZLIB,
                    ),
                    "label": tfds.features.Scalar(dtype=np.int64),
                }
            ),
            metadata=tfds.core.MetadataDict(metadata),
            homepage="https://github.com/google-research/meta-dataset",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the catalogue datasets are prepared by their own builders
        return {s: self._generate_examples(s) for s in self._class_splits.splits_with_classes()}

    def _examples(self) -> Iterable[Example]:
        if self._examples_fn is not None:
            return self._examples_fn()
        return catalogue_examples(
            self._source,
            data_dir=self._catalogue_dir,
            manual_dir=self._manual_dir,
            vdd_annotations_dir=self._vdd_annotations_dir,
            class_splits=self._class_splits,
        )

    def _generate_examples(self, split: str):
        yield from convert_split(
            self._examples(),
            self._class_splits,
            split,
            invert=SOURCES[self._source].invert,
            max_images_per_class=self._max_images_per_class,
        )


def prepare(
    source: str,
    data_dir: str,
    *,
    source_dir: str | None = None,
    manual_dir: str | None = None,
    vdd_annotations_dir: str | None = None,
    hierarchy_file: str | None = None,
    max_images_per_class: int | None = None,
    overwrite: bool = False,
    examples_fn: Callable[[], Iterable[Example]] | None = None,
    class_splits: ClassSplits | None = None,
) -> str:
    """Converts ``source`` into ``data_dir``; returns the prepared version directory.

    From ``source_dir`` (an original archive, see ``local_examples``) when given, else
    from the TFDS catalogue (TensorFlow needed). Caches the labels of every split.
    """
    source = check_source(source)
    data_dir = os.path.expanduser(data_dir)
    class_splits = class_splits or load_class_splits(source)
    if examples_fn is None:
        if source_dir is not None:
            examples_fn = functools.partial(local_examples, source, source_dir, class_splits)
        elif SOURCES[source].catalogue is None:
            raise FileNotFoundError(no_catalogue_message(source))
        else:
            require_tensorflow(f"Preparing meta_dataset/{source} from the TFDS catalogue")
    hierarchy = load_class_hierarchy(hierarchy_file, class_splits) if hierarchy_file else None
    builder = MetaDatasetSource(
        config=source,
        data_dir=data_dir,
        file_format="array_record",
        examples_fn=examples_fn,
        class_splits=class_splits,
        class_hierarchy=hierarchy,
        max_images_per_class=max_images_per_class,
        manual_dir=manual_dir,
        vdd_annotations_dir=vdd_annotations_dir,
    )
    mode = (
        tfds.download.GenerateMode.FORCE_REDOWNLOAD
        if overwrite
        else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=manual_dir, download_mode=mode, try_download_gcs=False
        )
    )
    for split in class_splits.splits_with_classes():  # fills the label cache
        sources.read_prepared_split(
            data_dir,
            BUILDER_NAME,
            source,
            split,
            source=f"{BENCHMARK}/{source}",
            in_memory=False,
            class_names=class_splits.classes[split],
            prepare_command=prepare_command([source], data_dir),
        )
    return str(builder.data_path)
