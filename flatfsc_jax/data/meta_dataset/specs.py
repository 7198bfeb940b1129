"""Meta-Dataset's 13 sources: what each one is, where it comes from, its class split.

The registry every other module of the package reads: source names (seen / unseen
domains), each source's TFDS catalogue entry and original archive layout
(``SourceSpec``), and the shipped class splits (``ClassSplits``, from
``assets/meta_dataset_splits/``, provenance in that folder's README.md) that make a
source a benchmark domain. Pure python: no TFDS, no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping
from importlib import resources
from typing import Any

# The source names live in a TFDS-free module shared with config_lib; re-exported here.
from flatfsc_jax.data.meta_dataset_spec import (  # noqa: F401
    ALL_SOURCES,
    SEEN_SOURCES,
    UNSEEN_SOURCES,
)
from flatfsc_jax.data.sources import SPLITS

BENCHMARK = "meta_dataset"
# <data_dir>/flatfsc_meta_dataset/<source>/<version>/: a name of our own, because
# Meta-Dataset's TFDS build (md_tfds) writes meta_dataset/<source>/1.0.0.
BUILDER_NAME = "flatfsc_meta_dataset"
LEGACY_BUILDER_NAME = "meta_dataset"  # what flatfsc_jax wrote before it had its own name
IMAGE_SIZE = 84

PREPARE_MODULE = "python -m flatfsc_jax.cli.prepare"
TF_INSTALL_HINT = "pip install -e .[prepare]  (tensorflow==2.21.0)"

# The devkit archive that `visual_domain_decathlon` downloads; its annotation files hold
# the category names that the TFDS builder drops (labels are indices into them).
VDD_DEVKIT_URL = "http://www.robots.ox.ac.uk/~vgg/share/decathlon-1.0-devkit.tar.gz"


@dataclasses.dataclass(frozen=True)
class CatalogueSpec:
    """Where a source lives in the TFDS catalogue and how its class names are read.

    Attributes:
      name: TFDS name (with config), e.g. ``"coco/2017"``.
      splits: catalogue (image) splits whose union forms the source.
      class_name_rule: how one catalogue example's class name is obtained.
      manual_download: the catalogue dataset cannot be downloaded automatically.
      deviation: how the catalogue copy differs from the source MD converts (None: the
        same images); such a copy is used only when asked for explicitly.
    """

    name: str
    splits: tuple[str, ...]
    class_name_rule: str
    manual_download: str | None = None
    deviation: str | None = None


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One Meta-Dataset source.

    Attributes:
      name: Meta-Dataset's name of the source.
      catalogue: its TFDS catalogue dataset, or None when the catalogue lacks it.
      invert: invert intensities (Meta-Dataset stores Omniglot inverted).
      local_layout: the original archive layout ``local_examples`` reads for it.
    """

    name: str
    catalogue: CatalogueSpec | None
    invert: bool = False
    local_layout: str = "class folders: <dir>/<class name>/<image files>"

    @property
    def seen(self) -> bool:
        return self.name in SEEN_SOURCES


SOURCES: dict[str, SourceSpec] = {
    s.name: s
    for s in (
        SourceSpec(
            "ilsvrc_2012",
            CatalogueSpec(
                "imagenet2012",
                ("train",),
                "label name = WordNet id (labels.txt); CUB duplicates skipped by file_name",
                manual_download=(
                    "imagenet2012 needs a manual download: put ILSVRC2012_img_train.tar and "
                    "ILSVRC2012_img_val.tar in --manual_dir (see the TFDS imagenet2012 page)"
                ),
            ),
            local_layout="class folders named by WordNet id: <dir>/n01440764/*.JPEG",
        ),
        SourceSpec(
            "omniglot",
            CatalogueSpec(
                "omniglot",
                ("train", "test"),
                "'<alphabet>-character<NN>' from the alphabet name and alphabet_char_id + 1",
            ),
            invert=True,
        ),
        SourceSpec(
            "aircraft",
            CatalogueSpec(
                "visual_domain_decathlon/aircraft",
                ("train", "validation"),
                "label = index into the categories of the VDD devkit's aircraft_train.json",
                deviation=(
                    "the Visual Domain Decathlon copy: images resized to 72 px on the short "
                    "side, without MD's bounding-box crop, and only the 6,667 train+val of "
                    "MD's 10,000 images"
                ),
            ),
            local_layout="FGVC-Aircraft archive: <dir>/data/images_variant_*.txt, images_box.txt",
        ),
        SourceSpec(
            "cu_birds",
            CatalogueSpec(
                "caltech_birds2011",
                ("train", "test"),
                "shipped name whose 3-digit prefix is label + 1 (TFDS lower-cases names)",
            ),
        ),
        SourceSpec(
            "dtd",
            CatalogueSpec("dtd", ("train", "validation", "test"), "label name (texture attribute)"),
        ),
        SourceSpec(
            "quickdraw",
            CatalogueSpec("quickdraw_bitmap", ("train",), "label name (category)"),
        ),
        SourceSpec(
            "fungi",
            None,
            local_layout=(
                "FGVCx 2018 fungi archive: <dir>/train.json, <dir>/val.json and the image "
                "files they name (https://github.com/visipedia/fgvcx_fungi_comp)"
            ),
        ),
        SourceSpec(
            "vgg_flower",
            CatalogueSpec(
                "oxford_flowers102",
                ("train", "validation", "test"),
                "shipped name whose 3-digit prefix is label + 1",
            ),
        ),
        SourceSpec(
            "traffic_sign",
            CatalogueSpec(
                "visual_domain_decathlon/gtsrb",
                ("train", "validation"),
                "label = GTSRB class id (VDD keeps GTSRB's class order)",
                deviation=(
                    "the Visual Domain Decathlon copy: images resized to 72 px on the short "
                    "side instead of GTSRB's original crops"
                ),
            ),
            local_layout="GTSRB archive: <dir>/Final_Training/Images/000NN/*.ppm",
        ),
        SourceSpec(
            "mscoco",
            CatalogueSpec(
                "coco/2017",
                ("train",),
                "one example per object: its label name; crop = box scaled by 1.2",
            ),
        ),
        SourceSpec("mnist", CatalogueSpec("mnist", ("test",), "label name ('0'..'9')")),
        SourceSpec("cifar10", CatalogueSpec("cifar10", ("test",), "label name")),
        SourceSpec("cifar100", CatalogueSpec("cifar100", ("test",), "fine label name")),
    )
}


# Where each source lies under $DATASRC in MD's doc/dataset_conversion.md (its
# --<source>_data_root flags); MNIST/CIFAR where CNAPs' prepare_extra_datasets.py reads them.
MD_DATASRC_DIRS = {
    "ilsvrc_2012": "ILSVRC2012_img_train",
    "omniglot": "omniglot",
    "aircraft": "fgvc-aircraft-2013b",
    "cu_birds": "CUB_200_2011",
    "dtd": "dtd",
    "quickdraw": "quickdraw",
    "fungi": "fungi",
    "vgg_flower": "vgg_flower",
    "traffic_sign": "GTSRB",
    "mscoco": "mscoco",
    "mnist": ".",
    "cifar10": "cifar-10-batches-py",
    "cifar100": "cifar-100-python",
}

# MD's lists of ImageNet training images that duplicate images of other datasets
# (ImageNetConverter drops all three). They are read from the user's Meta-Dataset checkout
# (its meta_dataset/dataset_conversion/ folder), not shipped: see docs/meta-dataset.md.
IMAGENET_DUPLICATE_LISTS = (
    "ImageNet_Caltech101_duplicates.txt",
    "ImageNet_Caltech256_duplicates.txt",
    "ImageNet_CUBirds_duplicates.txt",
)
MD_DUPLICATES_HOME = "meta_dataset/dataset_conversion/ in google-research/meta-dataset"


def md_asset_path(name: str):
    """A file copied from MD's repository (Apache-2.0, LICENSE beside it)."""
    return resources.files("flatfsc_jax.data").joinpath("assets", "meta_dataset_md", name)


def parse_duplicate_list(text: str) -> list[str]:
    """File names of an MD duplicate list, read as ``ImageNetConverter`` reads them:
    lines ``synset/file.JPEG  # other file``, comment lines skipped, base names kept."""
    names = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            names.append(os.path.basename(line.split("#")[0].strip()))
    return names


def missing_duplicates_message(what: str) -> str:
    return (
        f"{what} needs Meta-Dataset's three ImageNet duplicate lists "
        f"({', '.join(IMAGENET_DUPLICATE_LISTS)}); pass --md_duplicates_dir=<dir> where <dir> "
        f"is {MD_DUPLICATES_HOME} (git clone https://github.com/google-research/meta-dataset)"
    )


def imagenet_duplicates(duplicates_dir: str) -> dict[str, frozenset[str]]:
    """list file -> ImageNet file names it drops, for MD's three lists in
    ``duplicates_dir`` (MD's ``meta_dataset/dataset_conversion``)."""
    lists = {}
    for name in IMAGENET_DUPLICATE_LISTS:
        path = os.path.join(os.path.expanduser(duplicates_dir), name)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"--md_duplicates_dir={duplicates_dir!r} has no {name}: "
                + missing_duplicates_message("ImageNet")
            )
        with open(path, encoding="utf-8") as f:
            lists[name] = frozenset(parse_duplicate_list(f.read()))
    return lists


def with_imagenet_duplicates(class_splits: ClassSplits, duplicates_dir: str) -> ClassSplits:
    """``class_splits`` skipping, besides its own ``skip_files``, MD's three lists."""
    dropped = frozenset().union(*imagenet_duplicates(duplicates_dir).values())
    return dataclasses.replace(class_splits, skip_files=class_splits.skip_files | dropped)


def deviating_catalogue_message(source: str) -> str:
    cat = SOURCES[source].catalogue
    return (
        f"meta_dataset/{source} from the TFDS catalogue ({cat.name}) would be "
        f"{cat.deviation}. Prepare it from MD's original archive instead: "
        f"--md_datasrc=$DATASRC (with $DATASRC/{MD_DATASRC_DIRS[source]}) or "
        f"--source_dirs={source}=<dir>, where <dir> is the {SOURCES[source].local_layout}; "
        "or accept the difference with --allow_vdd"
    )


def check_source(source: str) -> str:
    """Meta-Dataset source name (accepts ``"meta_dataset/<name>"``) or a ValueError."""
    name = source.split("/", 1)[1] if source.startswith(BENCHMARK + "/") else source
    if name not in SOURCES:
        raise ValueError(
            f"Meta-Dataset source {source!r} is unknown; choose from {list(ALL_SOURCES)}"
        )
    return name


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is unknown; choose one of {SPLITS}")


# ----------------------------------------------------------------------------------------
# Shipped class splits
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClassSplits:
    """A source's class split: class names per split, in local-label order.

    Attributes:
      source: Meta-Dataset source name.
      classes: split -> class names; a class's local label is its position.
      groups: optional split -> group (Omniglot alphabet) of each class.
      skip_files: file names to leave out (ImageNet images duplicating images of
        Caltech-101, Caltech-256 and CUB: MD's three lists).
    """

    source: str
    classes: Mapping[str, tuple[str, ...]]
    groups: Mapping[str, tuple[str, ...]] | None = None
    skip_files: frozenset[str] = frozenset()

    def __post_init__(self):
        if set(self.classes) != set(SPLITS):
            raise ValueError(f"{self.source}: class splits need exactly the keys {SPLITS}")
        seen: dict[str, str] = {}
        for split in SPLITS:
            for name in self.classes[split]:
                if name in seen:
                    raise ValueError(
                        f"{self.source}: class {name!r} is listed twice "
                        f"({seen[name]} and {split}); class splits must be disjoint"
                    )
                seen[name] = split
        if self.groups is not None:
            for split in SPLITS:
                if len(self.groups[split]) != len(self.classes[split]):
                    raise ValueError(f"{self.source}: one group per class needed in {split}")

    def num_classes(self, split: str) -> int:
        return len(self.classes[split])

    def splits_with_classes(self) -> tuple[str, ...]:
        return tuple(s for s in SPLITS if self.classes[s])

    @functools.cached_property
    def assignment(self) -> dict[str, tuple[str, int]]:
        """class name -> (split, local label)."""
        return {name: (s, i) for s in SPLITS for i, name in enumerate(self.classes[s])}

    @property
    def group_names(self) -> list[str]:
        """All groups in order of first appearance (train, valid, test)."""
        if self.groups is None:
            return []
        return list(dict.fromkeys(g for s in SPLITS for g in self.groups[s]))

    def metadata(self) -> dict[str, Any]:
        """The episodic split format's metadata (``sources.py``) for these splits."""
        meta: dict[str, Any] = {
            "class_names": {s: list(self.classes[s]) for s in self.splits_with_classes()}
        }
        if self.groups is not None:
            index = {g: i for i, g in enumerate(self.group_names)}
            meta["group_names"] = self.group_names
            meta["class_groups"] = {
                s: [index[g] for g in self.groups[s]] for s in self.splits_with_classes()
            }
        return meta


def asset_path(source: str):
    return resources.files("flatfsc_jax.data").joinpath(
        "assets", "meta_dataset_splits", f"{source}.json"
    )


@functools.cache
def load_class_splits(source: str) -> ClassSplits:
    """The shipped class split of ``source`` (see assets/meta_dataset_splits/README.md)."""
    source = check_source(source)
    data = json.loads(asset_path(source).read_text(encoding="utf-8"))
    classes = {s: tuple(data[s]) for s in SPLITS}
    groups = None
    if "alphabets" in data:  # Omniglot: the group of a class is its alphabet
        groups = {
            s: tuple(name for name, count in data["alphabets"][s] for _ in range(count))
            for s in SPLITS
        }
    skip_files = frozenset(data.get("skip_files", ()))
    return ClassSplits(source=source, classes=classes, groups=groups, skip_files=skip_files)


def no_catalogue_message(source: str) -> str:
    return (
        f"meta_dataset/{source} is not in the TFDS catalogue; download it yourself and pass "
        f"--source_dirs={source}=<dir> to {PREPARE_MODULE}, where <dir> is the "
        f"{SOURCES[source].local_layout}"
    )
