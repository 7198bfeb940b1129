"""The TFDS builder that writes a Meta-Dataset source in the episodic split format.

``MetaDatasetSource`` (registered as ``flatfsc_meta_dataset``, one config per source;
never ``meta_dataset``, which is Meta-Dataset's own TFDS build) writes the converted
examples as array_record files (the format is described in ``sources.py``); ``prepare``
builds one source from the TFDS catalogue or an original archive directory, and
``prepare_from_records`` from Meta-Dataset's converted records (``records.py``).
Reading goes through ``sources.read_prepared_split``, the one reader of the format.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from flatfsc_jax.data import sources
from flatfsc_jax.data.meta_dataset.availability import prepare_command
from flatfsc_jax.data.meta_dataset.convert import IMAGE_SIZE, Example, convert_split
from flatfsc_jax.data.meta_dataset.extract import (
    catalogue_examples,
    local_examples,
    md_datasrc_examples,
    require_tensorflow,
)
from flatfsc_jax.data.meta_dataset.hierarchy import (
    class_hierarchy_for,
    hierarchy_origin,
    load_class_hierarchy,
)
from flatfsc_jax.data.meta_dataset.provenance import provenance
from flatfsc_jax.data.meta_dataset.records import (
    RecordsError,
    RecordsSpec,
    class_splits_from_spec,
    load_staged_class,
    read_dataset_spec,
    read_md_tfds_spec,
    stage_class,
    staged_class_path,
)
from flatfsc_jax.data.meta_dataset.specs import (
    ALL_SOURCES,
    BENCHMARK,
    BUILDER_NAME,
    MD_DATASRC_DIRS,
    SOURCES,
    SPLITS,
    ClassSplits,
    check_source,
    deviating_catalogue_message,
    load_class_splits,
    missing_duplicates_message,
    no_catalogue_message,
    with_imagenet_duplicates,
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
      invert: invert intensities (default: the source's rule; Meta-Dataset's records
        are inverted already).
      md_jpeg: re-encode as MD's records hold the images (``convert.MD_JPEG_SOURCES``).
      allow_deviating_catalogue: accept the 72-px VDD catalogue copies (Aircraft, GTSRB).
      provenance: the source's ``provenance.provenance`` record, stored as metadata.
    """

    name = BUILDER_NAME
    # TFDS records the builder's module in every prepared dataset_info.json ("moduleName")
    # and finds checksum files next to it: keep the name it had before meta_dataset became
    # a package, so the JSON files of directories prepared before and after are the same.
    __module__ = "flatfsc_jax.data.meta_dataset"
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.1.0": "Provenance of each source in its metadata; per-source resize (Lanczos for "
        "MNIST/CIFAR); optional MD JPEG re-encoding; MD's ImageNet graph and duplicate lists.",
        "1.0.0": "Meta-Dataset class splits, 84x84 uint8 (bilinear, aligned corners); "
        "examples in class order.",
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
        invert: bool | None = None,
        md_jpeg: bool = False,
        allow_deviating_catalogue: bool = False,
        provenance: Mapping[str, Any] | None = None,
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
        self._invert = SOURCES[self._source].invert if invert is None else invert
        self._md_jpeg = md_jpeg
        self._allow_deviating_catalogue = allow_deviating_catalogue
        self._provenance = provenance
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
        if self._provenance is not None:
            metadata["provenance"] = dict(self._provenance)
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
            # Class order as generated: no shuffling pass (and no temporary copy of it);
            # readers address images by index and sample classes themselves.
            disable_shuffling=True,
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
            allow_deviating_catalogue=self._allow_deviating_catalogue,
        )

    def _generate_examples(self, split: str):
        yield from convert_split(
            self._examples(),
            self._class_splits,
            split,
            invert=self._invert,
            max_images_per_class=self._max_images_per_class,
            md_jpeg=self._md_jpeg,
        )


def prepare(
    source: str,
    data_dir: str,
    *,
    source_dir: str | None = None,
    md_datasrc: str | None = None,
    manual_dir: str | None = None,
    vdd_annotations_dir: str | None = None,
    hierarchy_file: str | None = None,
    md_duplicates_dir: str | None = None,
    md_jpeg: bool = False,
    allow_vdd: bool = False,
    max_images_per_class: int | None = None,
    overwrite: bool = False,
    examples_fn: Callable[[], Iterable[Example]] | None = None,
    class_splits: ClassSplits | None = None,
) -> str:
    """Converts ``source`` into ``data_dir``; returns the prepared version directory.

    From ``md_datasrc`` (MD's conversion-guide tree, ``md_datasrc_examples``) or
    ``source_dir`` (an original archive, see ``local_examples``) when given, else from the
    TFDS catalogue (TensorFlow needed). ImageNet drops MD's three duplicate lists, read
    from ``md_duplicates_dir`` (MD's ``meta_dataset/dataset_conversion``; required unless
    ``examples_fn`` is given), and its hierarchy defaults to MD's shipped spec. The
    source's provenance is stored in its metadata. Caches the labels of every split.
    """
    source = check_source(source)
    data_dir = os.path.expanduser(data_dir)
    class_splits = class_splits or load_class_splits(source)
    origin = "md_datasrc" if md_datasrc else "archive" if source_dir else "catalogue"
    location = md_datasrc or source_dir
    if source == "ilsvrc_2012" and examples_fn is None:
        if not md_duplicates_dir:
            raise ValueError(missing_duplicates_message(f"Preparing ilsvrc_2012 from {origin}"))
        class_splits = with_imagenet_duplicates(class_splits, md_duplicates_dir)
    if examples_fn is None:
        if md_datasrc is not None:
            examples_fn = functools.partial(md_datasrc_examples, source, md_datasrc, class_splits)
            location = os.path.join(os.path.expanduser(md_datasrc), MD_DATASRC_DIRS[source])
        elif source_dir is not None:
            examples_fn = functools.partial(local_examples, source, source_dir, class_splits)
        elif SOURCES[source].catalogue is None:
            raise FileNotFoundError(no_catalogue_message(source))
        else:
            if SOURCES[source].catalogue.deviation and not allow_vdd:
                raise ValueError(deviating_catalogue_message(source))
            require_tensorflow(f"Preparing meta_dataset/{source} from the TFDS catalogue")
    hierarchy = class_hierarchy_for(source, class_splits, hierarchy_file)
    record = None
    if examples_fn is None or origin != "catalogue":
        record = provenance(
            source,
            origin,
            location=location,
            md_jpeg=md_jpeg,
            hierarchy=hierarchy_origin(source, hierarchy_file),
            md_duplicates_dir=md_duplicates_dir,
        )
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
        md_jpeg=md_jpeg,
        allow_deviating_catalogue=allow_vdd,
        provenance=record,
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
    _cache_labels(source, data_dir, class_splits)
    return str(builder.data_path)


def _cache_labels(source: str, data_dir: str, class_splits: ClassSplits) -> None:
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


# ----------------------------------------------------------------------------------------
# From Meta-Dataset's converted records
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RecordsReport:
    """What ``prepare_from_records`` did to one source (sizes in bytes, all measured)."""

    source: str
    path: str
    images: int
    classes: int
    input_bytes: int
    peak_bytes: int
    output_bytes: int
    seconds: float
    reused: bool = False
    converted: int = 0  # images decoded by this run (fewer than ``images`` when resumed)


def tree_bytes(path: str) -> int:
    """Bytes of the files under ``path`` (0 if absent)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass  # a temporary file renamed meanwhile
    return total


def worker_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    """Processes for class conversion; spawned, so none inherits a parent's threads."""
    return concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn")
    )


def _run_all(executor, fn, items) -> None:
    futures = [executor.submit(fn, item) for item in items]
    try:
        for future in concurrent.futures.as_completed(futures):
            future.result()
    finally:
        for future in futures:
            future.cancel()


def staging_dir(data_dir: str, source: str) -> str:
    """Where finished classes wait for the TFDS writer (outside every version directory)."""
    return os.path.join(os.path.expanduser(data_dir), BUILDER_NAME, "_staging", source)


class _StagedExamples:
    """Examples ``(lazy image, class name[, group])`` from the staged class files.

    Each image is a callable, so ``convert_split`` loads only the classes of the split it
    writes; the last loaded class is kept (examples come class by class).
    """

    def __init__(self, staging: str, spec: RecordsSpec, class_splits: ClassSplits, counts):
        self._staging, self._spec, self._splits = staging, spec, class_splits
        self._counts = counts
        self._cached: tuple[int, np.ndarray] | None = None

    def _image(self, class_id: int, index: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != class_id:
            self._cached = (class_id, load_staged_class(self._staging, class_id))
        return self._cached[1][index]

    def __call__(self) -> Iterable[Example]:
        for split in self._splits.splits_with_classes():
            groups = self._splits.groups[split] if self._splits.groups is not None else None
            for label, class_id in enumerate(self._spec.split_classes[split]):
                name = self._splits.classes[split][label]
                for j in range(self._counts[class_id]):
                    image = functools.partial(self._image, class_id, j)
                    yield (image, name) if groups is None else (image, name, groups[label])


def prepare_from_records(
    source: str,
    records_dir: str,
    data_dir: str,
    *,
    workers: int = 1,
    overwrite: bool = False,
    max_images_per_class: int | None = None,
    check_data_crc: bool | None = None,
    executor: concurrent.futures.Executor | None = None,
    md_tfds: bool = False,
    log: Callable[[str], None] = lambda message: None,
) -> RecordsReport:
    """Prepares ``source`` from ``<records_dir>/<source>/`` (MD's converted records).

    Classes are converted in parallel (``workers`` processes) into a staging directory,
    one atomically written file per class, so a killed run resumes where it stopped;
    then the TFDS builder writes the source and the staging directory is removed. A
    source already prepared is kept unless ``overwrite``. ImageNet's class hierarchy is
    read from its ``dataset_spec.json`` (``hierarchy.load_class_hierarchy``). Pass an
    ``executor`` to share one pool of workers across sources (``workers`` is then unused).
    With ``md_tfds``, ``records_dir`` is instead the TFDS data directory of Meta-Dataset's
    own TFDS build (``records.read_md_tfds_spec``); everything else is the same.

    Raises:
      RecordsError: missing spec or class file, corrupt record (naming the file), or
        classes outside Meta-Dataset's class splits.
    """
    source = check_source(source)
    data_dir = os.path.expanduser(data_dir)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    start = time.perf_counter()
    records_dir = os.path.expanduser(records_dir)
    if md_tfds:
        spec = read_md_tfds_spec(records_dir, source)
    else:
        spec = read_dataset_spec(os.path.join(records_dir, source))
    class_splits = class_splits_from_spec(source, spec)
    shipped = load_class_splits(source)
    if any(class_splits.classes[s] != shipped.classes[s] for s in SPLITS):
        log(
            f"   {source}: the records hold {sum(map(len, class_splits.classes.values()))} of "
            f"the {sum(map(len, shipped.classes.values()))} classes of Meta-Dataset's splits; "
            "read them with class_splits=availability.prepared_class_splits(...)"
        )
    class_ids = [i for s in SPLITS for i in spec.split_classes[s]]
    files = spec.input_files()
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        kind = "shard" if spec.shards else "class"
        raise RecordsError(
            f"{len(missing)} of {len(files)} {kind} files listed in {spec.path} are "
            f"missing, e.g. {missing[0]}; copy the complete directory"
        )
    input_bytes = tree_bytes(spec.path) + sum(tree_bytes(f) for f in files)
    existing = sources.prepared_dir(data_dir, BUILDER_NAME, source)
    if existing is not None and not overwrite:
        log(f"   {source}: already prepared in {existing} (--overwrite to rebuild)")
        size = tree_bytes(os.fspath(existing))
        return RecordsReport(
            source, os.fspath(existing), 0, len(class_ids), input_bytes, size, size, 0.0, True
        )
    staging = staging_dir(data_dir, source)
    if overwrite:
        shutil.rmtree(staging, ignore_errors=True)
        if existing is not None:
            shutil.rmtree(os.fspath(existing))
    os.makedirs(staging, exist_ok=True)
    todo = [i for i in class_ids if not os.path.exists(staged_class_path(staging, i))]
    if len(todo) < len(class_ids):
        log(f"   {source}: resuming, {len(class_ids) - len(todo)} of {len(class_ids)} classes done")
    stage = functools.partial(
        stage_class,
        spec,
        staging_dir=staging,
        max_images=max_images_per_class,
        check_data_crc=check_data_crc,
    )
    if executor is not None:
        _run_all(executor, stage, todo)
    elif workers == 1 or len(todo) <= 1:
        for class_id in todo:
            stage(class_id)
    else:
        with worker_pool(workers) as pool:
            _run_all(pool, stage, todo)
    counts = {
        i: min(spec.images_per_class[i], max_images_per_class or spec.images_per_class[i])
        for i in class_ids
    }
    hierarchy = None
    if spec.split_subgraphs:  # from MD's spec file, whichever layout held it
        spec_file = spec.path
        if spec.shards:
            spec_file = os.path.join(staging, f"{source}_dataset_spec.json")
            with open(spec.path, encoding="utf-8") as f:  # md_tfds's metadata.json
                doc = json.load(f)["dataset_specs"]["v1"]
            with open(spec_file, "w", encoding="utf-8") as f:
                json.dump(doc, f)
        hierarchy = load_class_hierarchy(spec_file, class_splits)
    version_root = os.path.join(data_dir, BUILDER_NAME, source)
    if os.path.isdir(version_root):  # a writer killed earlier leaves incomplete.* behind
        for name in os.listdir(version_root):
            if name.startswith("incomplete"):
                shutil.rmtree(os.path.join(version_root, name), ignore_errors=True)
    builder = MetaDatasetSource(
        config=source,
        data_dir=data_dir,
        file_format="array_record",
        examples_fn=_StagedExamples(staging, spec, class_splits, counts),
        class_splits=class_splits,
        class_hierarchy=hierarchy,
        max_images_per_class=max_images_per_class,
        invert=False,  # MD's converter inverted Omniglot already
        provenance=provenance(
            source,
            "records",
            location=spec.path,
            hierarchy=spec.path if hierarchy is not None else None,
        ),
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS,
            try_download_gcs=False,
        )
    )
    path = str(builder.data_path)
    _cache_labels(source, data_dir, class_splits)
    output_bytes = tree_bytes(path)
    peak_bytes = output_bytes + tree_bytes(staging)
    shutil.rmtree(staging, ignore_errors=True)
    return RecordsReport(
        source=source,
        path=path,
        images=int(sum(counts.values())),
        converted=int(sum(counts[i] for i in todo)),
        classes=len(class_ids),
        input_bytes=input_bytes,
        peak_bytes=peak_bytes,
        output_bytes=output_bytes,
        seconds=time.perf_counter() - start,
    )


def _size(num_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1024 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    raise AssertionError("unreachable")


def format_records_table(reports: Sequence[RecordsReport]) -> str:
    """One row per source: input (records) size, peak disk, time, output size, and the
    images this run converted per second (a resumed run converts only what was left)."""
    header = (
        f"{'source':<13} {'classes':>7} {'images':>9} {'input':>10} {'peak disk':>10} "
        f"{'time':>8} {'output':>10} {'images/s':>9}"
    )
    lines = [header, "-" * len(header)]
    for r in reports:
        rate = "reused" if r.reused else f"{r.converted / max(r.seconds, 1e-9):.0f}"
        lines.append(
            f"{r.source:<13} {r.classes:>7} {r.images:>9} {_size(r.input_bytes):>10} "
            f"{_size(r.peak_bytes):>10} {r.seconds:>7.1f}s {_size(r.output_bytes):>10} {rate:>9}"
        )
    return "\n".join(lines)
