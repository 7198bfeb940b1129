"""Meta-Dataset's 13 sources as episodic class splits: registry, conversion, builder.

Meta-Dataset (Triantafillou et al. 2020) evaluates few-shot classification on 13 image
sources; the first 8 are "seen" (a backbone is trained on each one's *train classes*),
the last 5 "unseen" (test-only). What makes a source a benchmark domain is its *class
split*: which classes are train / valid / test. Those splits are pinned as class-name
lists and shipped with this package (``assets/meta_dataset_splits/``, provenance in that
folder's README.md), so every machine gets the same classes with the same labels.

Data flow (TensorFlow only for the TFDS catalogue, the optional ``[prepare]`` extra)::

  MD's records ($RECORDS)     MD's $DATASRC tree        archive dir      TFDS catalogue
   | records.py: TFRecord       | md_datasrc_examples()   | local_        | catalogue_
   | + Example, no TF,          | (PIL/numpy/scipy)       | examples()    | examples()
   | staged per class           +-------------+-----------+---------------+
   |  (builder.prepare_from_records)          v
   |              convert_split(): class name -> (split, local label) from the shipped
   |              lists; invert (Omniglot); RGB; per-source resize (``resize_rule``);
   |              optional MD JPEG; ImageNet drops MD's duplicate lists
   |              (``--md_duplicates_dir``, from the user's MD checkout)
   +------------------------------------------+
                                              v
      MetaDatasetSource (builder ``flatfsc_meta_dataset``, one config per source) writes
      the episodic split format (see ``sources.py``) with ``provenance`` in its metadata
                                              v
      sources.read_prepared_split() (through ``benchmarks.load_split``): random access
      without TensorFlow, labels cached on disk

One module per job: ``specs`` (sources and shipped class splits), ``convert`` (pure image
and split conversion), ``hierarchy`` (MD's ImageNet sampling graph), ``extract`` (examples
from the catalogue, an archive or MD's $DATASRC), ``records`` (MD's records, no
TensorFlow), ``miniature`` (a miniature MD in the records format), ``builder`` (the TFDS
builder, ``prepare``, ``prepare_from_records``), ``provenance`` (where a split came from),
``availability`` (prepared or not, the prepare command). This file re-exports their
public names, so ``meta_dataset.X`` works for every X below.

Where our preparation differs from Meta-Dataset's own conversion scripts: every
remaining deviation, with its effect, is listed in one place
(docs/meta-dataset.md#deviations). In short:
images are stored resized (uint8, rounded), MD's JPEG re-encoding is an option
(``md_jpeg``), and the 72-px Visual Domain Decathlon copies of Aircraft and GTSRB are
used only when asked for (``--allow_vdd``). ``provenance`` records, per
prepared source, which of these applied.
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
    BILINEAR,
    LANCZOS,
    MD_JPEG_SOURCES,
    RESIZE_RULES,
    Example,
    coco_crop_box,
    convert_split,
    crop,
    decode_image,
    jpeg_round_trip,
    resize_bilinear,
    resize_lanczos,
    resize_rule,
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
    md_datasrc_examples,
)
from flatfsc_jax.data.meta_dataset.hierarchy import (
    MD_SPLIT_ROOTS,
    MissingHierarchyError,
    class_hierarchy_for,
    class_hierarchy_from_edges,
    class_hierarchy_from_graph,
    eligible_nodes,
    hierarchy_origin,
    load_class_hierarchy,
    md_split_graphs,
    read_hierarchy_edges,
    spec_split_graphs,
)
from flatfsc_jax.data.meta_dataset.provenance import format_provenance, provenance
from flatfsc_jax.data.meta_dataset.specs import (
    ALL_SOURCES,
    BENCHMARK,
    BUILDER_NAME,
    IMAGE_SIZE,
    IMAGENET_DUPLICATE_LISTS,
    MD_DATASRC_DIRS,
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
    imagenet_duplicates,
    load_class_splits,
    missing_duplicates_message,
    with_imagenet_duplicates,
)

__all__ = [
    "ALL_SOURCES",
    "BENCHMARK",
    "BILINEAR",
    "BUILDER_NAME",
    "CatalogueSpec",
    "ClassSplits",
    "Example",
    "IMAGENET_DUPLICATE_LISTS",
    "IMAGE_SIZE",
    "LANCZOS",
    "MD_DATASRC_DIRS",
    "MD_JPEG_SOURCES",
    "MD_SPLIT_ROOTS",
    "MetaDatasetSource",
    "MissingHierarchyError",
    "PREPARE_MODULE",
    "RESIZE_RULES",
    "SEEN_SOURCES",
    "SOURCES",
    "SPLITS",
    "SourceSpec",
    "TF_INSTALL_HINT",
    "UNSEEN_SOURCES",
    "VDD_DEVKIT_URL",
    "asset_path",
    "catalogue_examples",
    "catalogue_extractor",
    "check_source",
    "check_split",
    "class_folder_examples",
    "class_hierarchy_for",
    "class_hierarchy_from_edges",
    "class_hierarchy_from_graph",
    "coco_crop_box",
    "convert_split",
    "crop",
    "decode_image",
    "eligible_nodes",
    "fgvc_aircraft_examples",
    "format_provenance",
    "fungi_examples",
    "gtsrb_examples",
    "hierarchy_origin",
    "imagenet_duplicates",
    "missing_duplicates_message",
    "with_imagenet_duplicates",
    "jpeg_round_trip",
    "load_class_hierarchy",
    "load_class_splits",
    "local_examples",
    "md_datasrc_examples",
    "md_split_graphs",
    "missing_sources",
    "prepare",
    "prepare_command",
    "prepared_class_splits",
    "provenance",
    "read_hierarchy_edges",
    "require_sources",
    "resize_bilinear",
    "resize_lanczos",
    "resize_rule",
    "source_status",
    "spec_split_graphs",
    "standardize_image",
    "to_rgb",
]
