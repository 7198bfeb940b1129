"""Meta-Dataset's 13 sources as episodic class splits: registry, conversion, builder.

Meta-Dataset (Triantafillou et al. 2020) evaluates few-shot classification on 13 image
sources; the first 8 are "seen" (a backbone is trained on each one's *train classes*),
the last 5 "unseen" (test-only). What makes a source a benchmark domain is its *class
split*: which classes are train / valid / test. Those splits are pinned as class-name
lists and shipped with this package (``assets/meta_dataset_splits/``, provenance in that
folder's README.md), so every machine gets the same classes with the same labels.

Data flow (only the first step needs TensorFlow, the optional ``[prepare]`` extra)::

  TFDS catalogue dataset (omniglot, imagenet2012, ...)     original archive directory
      | catalogue_examples(): TF iteration,                  | local_examples(): PIL only
      | yields (lazy image, class name)                      | (fungi, or any source)
      +-------------------------------+----------------------+
                                      v
      convert_split(): pure python/numpy. class name -> (split, local label) from the
      shipped lists; invert (Omniglot); grayscale -> RGB; bilinear resize to 84x84 with
      aligned corners (Meta-Dataset's decoder); strict checks (unknown or empty classes)
                                      v
      MetaDatasetSource (tfds GeneratorBasedBuilder, one config per source) writes the
      episodic split format (see ``sources.py``) as array_record
                                      v
      sources.read_prepared_split() (through ``benchmarks.load_split``): random access
      without TensorFlow, labels cached on disk

One module per job: ``specs`` (sources and shipped class splits), ``convert`` (pure image
and split conversion), ``hierarchy`` (ImageNet's WordNet DAG), ``extract`` (examples from
the catalogue or an archive), ``builder`` (the TFDS builder and ``prepare``),
``availability`` (prepared or not, the prepare command). This file re-exports their
public names, so ``meta_dataset.X`` works for every X below.

Where our preparation differs from Meta-Dataset's own conversion scripts (documented so
results are read with them in mind):
  * aircraft / traffic_sign from the catalogue come from the Visual Domain Decathlon
    (images already resized to 72 px on the short side; aircraft without Meta-Dataset's
    bounding-box crop and only the 6,667 train+val images, test labels are withheld).
    ``local_examples`` reads the original FGVC-Aircraft / GTSRB archives exactly like
    Meta-Dataset instead.
  * ilsvrc_2012 drops the 43 ImageNet training images that duplicate CUB images (the
    Caltech-101/256 duplicate lists Meta-Dataset also drops are not shipped: those
    sources are not part of this benchmark).
  * Images are stored already resized (uint8, rounded) rather than as original JPEGs;
    Meta-Dataset resizes at read time to float. The difference is < 0.5/255 per pixel.
  * mnist / cifar10 / cifar100 (Meta-Dataset v2 / SUR convention): all classes are test
    classes, images from the catalogue's test split.
"""

from flatfsc_jax.data.meta_dataset.availability import (
    missing_sources,
    prepare_command,
    prepared_class_splits,
    require_sources,
    source_status,
)
from flatfsc_jax.data.meta_dataset.builder import MetaDatasetSource, prepare
from flatfsc_jax.data.meta_dataset.convert import (
    Example,
    coco_crop_box,
    convert_split,
    crop,
    decode_image,
    resize_bilinear,
    standardize_image,
    to_rgb,
)
from flatfsc_jax.data.meta_dataset.extract import (
    catalogue_examples,
    catalogue_extractor,
    class_folder_examples,
    fgvc_aircraft_examples,
    fungi_examples,
    gtsrb_examples,
    local_examples,
)
from flatfsc_jax.data.meta_dataset.hierarchy import (
    class_hierarchy_from_edges,
    load_class_hierarchy,
    read_hierarchy_edges,
)
from flatfsc_jax.data.meta_dataset.specs import (
    ALL_SOURCES,
    BENCHMARK,
    BUILDER_NAME,
    IMAGE_SIZE,
    PREPARE_MODULE,
    SEEN_SOURCES,
    SOURCES,
    SPLITS,
    TF_INSTALL_HINT,
    UNSEEN_SOURCES,
    VDD_DEVKIT_URL,
    CatalogueSpec,
    ClassSplits,
    SourceSpec,
    asset_path,
    check_source,
    check_split,
    load_class_splits,
)

__all__ = [
    "ALL_SOURCES",
    "BENCHMARK",
    "BUILDER_NAME",
    "IMAGE_SIZE",
    "PREPARE_MODULE",
    "SEEN_SOURCES",
    "SOURCES",
    "SPLITS",
    "TF_INSTALL_HINT",
    "UNSEEN_SOURCES",
    "VDD_DEVKIT_URL",
    "CatalogueSpec",
    "ClassSplits",
    "Example",
    "MetaDatasetSource",
    "SourceSpec",
    "asset_path",
    "catalogue_examples",
    "catalogue_extractor",
    "check_source",
    "check_split",
    "class_folder_examples",
    "class_hierarchy_from_edges",
    "coco_crop_box",
    "convert_split",
    "crop",
    "decode_image",
    "fgvc_aircraft_examples",
    "fungi_examples",
    "gtsrb_examples",
    "load_class_hierarchy",
    "load_class_splits",
    "local_examples",
    "missing_sources",
    "prepare",
    "prepare_command",
    "prepared_class_splits",
    "read_hierarchy_edges",
    "require_sources",
    "resize_bilinear",
    "source_status",
    "standardize_image",
    "to_rgb",
]
