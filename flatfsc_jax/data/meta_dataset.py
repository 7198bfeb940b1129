"""Meta-Dataset's 13 sources as episodic class splits: registry, conversion, builder, reader.

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
      load_split(): random access without TensorFlow, labels cached on disk

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

from __future__ import annotations

import dataclasses
import functools
import glob
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from importlib import resources
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from flatfsc_jax.data import sources
from flatfsc_jax.data.sources import SPLITS, MissingDataError, SplitData

BENCHMARK = "meta_dataset"
BUILDER_NAME = "meta_dataset"  # <data_dir>/meta_dataset/<source>/<version>/
IMAGE_SIZE = 84

SEEN_SOURCES = (
    "ilsvrc_2012",
    "omniglot",
    "aircraft",
    "cu_birds",
    "dtd",
    "quickdraw",
    "fungi",
    "vgg_flower",
)
UNSEEN_SOURCES = ("traffic_sign", "mscoco", "mnist", "cifar10", "cifar100")
ALL_SOURCES = SEEN_SOURCES + UNSEEN_SOURCES

PREPARE_MODULE = "python -m flatfsc_jax.data.prepare"
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
    """

    name: str
    splits: tuple[str, ...]
    class_name_rule: str
    manual_download: str | None = None


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


def check_source(source: str) -> str:
    """Meta-Dataset source name (accepts ``"meta_dataset/<name>"``) or a ValueError."""
    name = source.split("/", 1)[1] if source.startswith(BENCHMARK + "/") else source
    if name not in SOURCES:
        raise ValueError(
            f"Meta-Dataset source {source!r} is unknown; choose from {list(ALL_SOURCES)}"
        )
    return name


def _check_split(split: str) -> None:
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
      skip_files: catalogue file names to leave out (ImageNet images duplicating CUB).
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


def _asset_path(source: str):
    return resources.files("flatfsc_jax.data").joinpath(
        "assets", "meta_dataset_splits", f"{source}.json"
    )


@functools.cache
def load_class_splits(source: str) -> ClassSplits:
    """The shipped class split of ``source`` (see assets/meta_dataset_splits/README.md)."""
    source = check_source(source)
    data = json.loads(_asset_path(source).read_text(encoding="utf-8"))
    classes = {s: tuple(data[s]) for s in SPLITS}
    groups = None
    if "alphabets" in data:  # Omniglot: the group of a class is its alphabet
        groups = {
            s: tuple(name for name, count in data["alphabets"][s] for _ in range(count))
            for s in SPLITS
        }
    return ClassSplits(
        source=source,
        classes=classes,
        groups=groups,
        skip_files=frozenset(data.get("skip_files", ())),
    )


# ----------------------------------------------------------------------------------------
# Pure image conversion
# ----------------------------------------------------------------------------------------


def to_rgb(image: Any) -> np.ndarray:
    """uint8 HxWx3 from a uint8/bool image: gray (HxW, HxWx1) repeated, alpha dropped.

    Matches PIL's ``convert("RGB")``, which Meta-Dataset applies to every source.
    """
    image = np.asarray(image)
    if image.dtype == np.bool_:
        image = image.astype(np.uint8) * 255
    if image.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (or bool), got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"expected an HxW or HxWxC (C in 1..4) image, got shape {image.shape}")
    if image.shape[-1] in (1, 2):  # gray (+ alpha)
        return np.repeat(image[..., :1], 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])


def _interpolation_weights(n_in: int, n_out: int):
    """Source indices and weights of 1-d linear interpolation with aligned corners."""
    if n_out == 1 or n_in == 1:
        pos = np.zeros(n_out)
    else:  # the first and last output samples sit exactly on the first/last input pixel
        pos = np.arange(n_out) * ((n_in - 1) / (n_out - 1))
    lo = np.minimum(np.floor(pos).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, pos - lo


def resize_bilinear(image: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Bilinear resize to ``size x size`` with aligned corners, rounded back to uint8.

    Meta-Dataset's decoder resizes with ``tf.image.resize_images(..., BILINEAR,
    align_corners=True)`` (no anti-aliasing); this is the same map computed in float64.
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"expected an HxWxC image, got shape {image.shape}")
    h_lo, h_hi, h_w = _interpolation_weights(image.shape[0], size)
    w_lo, w_hi, w_w = _interpolation_weights(image.shape[1], size)
    x = image.astype(np.float64)
    rows = x[h_lo] * (1.0 - h_w)[:, None, None] + x[h_hi] * h_w[:, None, None]
    out = rows[:, w_lo] * (1.0 - w_w)[None, :, None] + rows[:, w_hi] * w_w[None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def standardize_image(image: Any, *, invert: bool = False, size: int = IMAGE_SIZE) -> np.ndarray:
    """One catalogue image -> the stored uint8 ``size x size x 3`` image."""
    rgb = to_rgb(image)
    if invert:  # before resizing, as in Meta-Dataset (inverted at conversion time)
        rgb = 255 - rgb
    return resize_bilinear(rgb, size)


def crop(image: np.ndarray, box: Sequence[int]) -> np.ndarray:
    """PIL ``Image.crop((xmin, ymin, xmax, ymax))``: zero-padded where outside the image."""
    xmin, ymin, xmax, ymax = (int(v) for v in box)
    if xmax <= xmin or ymax <= ymin:
        raise ValueError(f"empty crop box {tuple(box)}")
    out = np.zeros((ymax - ymin, xmax - xmin) + image.shape[2:], image.dtype)
    y0, y1 = max(ymin, 0), min(ymax, image.shape[0])
    x0, x1 = max(xmin, 0), min(xmax, image.shape[1])
    if y1 > y0 and x1 > x0:
        out[y0 - ymin : y1 - ymin, x0 - xmin : x1 - xmin] = image[y0:y1, x0:x1]
    return out


def coco_crop_box(
    bbox_xywh: Sequence[float], width: int, height: int, scale: float = 1.2
) -> tuple[int, int, int, int] | None:
    """Meta-Dataset's MSCOCO crop: the box grown by ``scale`` about its centre.

    COCO boxes use half-integer pixel centres, PIL crops integer corners; the rounding
    (Python's round-half-to-even) and clamping follow Meta-Dataset's converter. Returns
    ``(xmin, ymin, xmax, ymax)`` or None for an empty crop (Meta-Dataset skips those).
    """
    x, y, w, h = (float(v) for v in bbox_xywh)
    x -= 0.5 * w * (scale - 1.0)
    y -= 0.5 * h * (scale - 1.0)
    w *= scale
    h *= scale
    xmin = max(int(round(x - 0.5)), 0)
    ymin = max(int(round(y - 0.5)), 0)
    xmax = min(int(round(x + w - 0.5)) + 1, width)
    ymax = min(int(round(y + h - 0.5)) + 1, height)
    if xmax <= xmin or ymax <= ymin:
        return None
    return xmin, ymin, xmax, ymax


def decode_image(data: Any) -> np.ndarray:
    """Encoded bytes, a file path or an array -> uint8 array (gray or RGB), via PIL."""
    if isinstance(data, np.ndarray) and data.dtype != object:
        return data
    from PIL import Image  # the [prepare] extra; only needed to decode encoded images

    if isinstance(data, (bytes, bytearray, np.bytes_)):
        handle = io.BytesIO(bytes(data))
    else:
        handle = os.fspath(data)
    with Image.open(handle) as img:
        if img.mode not in ("L", "RGB"):  # '1', 'P', 'RGBA', 'CMYK', 'I;16', ...
            img = img.convert("RGB")
        return np.asarray(img)


# ----------------------------------------------------------------------------------------
# Pure split conversion
# ----------------------------------------------------------------------------------------

# An example is (image, class name) or (image, class name, group); the image is an array
# or a zero-argument callable returning one (so skipped examples are never decoded), or
# None to drop the example.
Example = tuple


def convert_split(
    examples: Iterable[Example],
    class_splits: ClassSplits,
    split: str,
    *,
    invert: bool = False,
    image_size: int = IMAGE_SIZE,
    max_images_per_class: int | None = None,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yields ``(key, {"image", "label"})`` for the examples that belong to ``split``.

    Every example's class must be in the class split (an unknown name means the class
    name rule and the shipped lists disagree: an error, not a silent drop), a given group
    must match the shipped one, and every class of ``split`` must receive at least one
    image. ``max_images_per_class`` keeps the first N images of each class.
    """
    _check_split(split)
    names = class_splits.classes[split]
    if not names:
        raise ValueError(f"{class_splits.source} has no {split!r} classes")
    if max_images_per_class is not None and max_images_per_class < 1:
        raise ValueError(f"max_images_per_class must be >= 1, got {max_images_per_class}")
    assignment = class_splits.assignment
    counts = np.zeros(len(names), np.int64)
    for example in examples:
        image, class_name = example[0], example[1]
        if class_name not in assignment:
            raise ValueError(
                f"{class_splits.source}: catalogue class {class_name!r} is not in the shipped "
                f"class splits (e.g. {list(assignment)[:3]}); the class-name rule and the "
                "split lists disagree"
            )
        example_split, label = assignment[class_name]
        if len(example) > 2 and class_splits.groups is not None:
            expected = class_splits.groups[example_split][label]
            if example[2] != expected:
                raise ValueError(
                    f"{class_splits.source}: class {class_name!r} has group {example[2]!r}, "
                    f"the shipped splits say {expected!r}"
                )
        if example_split != split:
            continue
        if max_images_per_class is not None and counts[label] >= max_images_per_class:
            continue
        pixels = image() if callable(image) else image
        if pixels is None:  # the callable dropped it (an empty MSCOCO crop)
            continue
        record = {
            "image": standardize_image(pixels, invert=invert, size=image_size),
            "label": label,
        }
        yield f"{label:05d}_{counts[label]:08d}", record
        counts[label] += 1
    empty = [names[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise ValueError(
            f"{class_splits.source}/{split}: {len(empty)} of {len(names)} classes got no "
            f"images, e.g. {empty[:5]}; the catalogue or directory is incomplete"
        )


# ----------------------------------------------------------------------------------------
# Optional ImageNet class hierarchy (WordNet)
# ----------------------------------------------------------------------------------------


def class_hierarchy_from_edges(
    edges: Iterable[tuple[str, str]], class_names: Sequence[str]
) -> dict[str, list[int]]:
    """node -> sorted indices of the classes below it, for every ancestor of a class.

    ``edges`` are (parent, child) pairs of a DAG (WordNet's is-a relation; a node may
    have several parents). Class nodes themselves are not listed.
    """
    parents: dict[str, set[str]] = {}
    for parent, child in edges:
        parents.setdefault(child, set()).add(parent)
    uncovered = [c for c in class_names if c not in parents]
    if uncovered:
        raise ValueError(
            f"the hierarchy has no parent for {len(uncovered)} of {len(class_names)} "
            f"classes, e.g. {uncovered[:5]}; is it the WordNet hierarchy of these classes?"
        )
    classes = set(class_names)
    below: dict[str, set[int]] = {}
    for index, name in enumerate(class_names):
        stack, visited = [name], {name}
        while stack:
            for parent in parents.get(stack.pop(), ()):
                if parent not in visited:
                    visited.add(parent)
                    stack.append(parent)
                    if parent not in classes:
                        below.setdefault(parent, set()).add(index)
    return {node: sorted(below[node]) for node in sorted(below)}


def read_hierarchy_edges(path: str) -> list[tuple[str, str]]:
    """(parent, child) edges from ImageNet's ``wordnet.is_a.txt`` ("parent child" per line)
    or from Meta-Dataset's ``ilsvrc_2012_dataset_spec.json`` (its ``split_subgraphs``)."""
    with open(os.path.expanduser(path), encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("{"):
        spec = json.loads(text)
        if "split_subgraphs" not in spec:
            raise ValueError(f"{path}: a JSON hierarchy must have 'split_subgraphs'")
        return [
            (node["wn_id"], child)
            for nodes in spec["split_subgraphs"].values()
            for node in nodes
            for child in node["children_ids"]
        ]
    edges = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != 2:
            raise ValueError(f"{path}:{number}: expected 'parent child', got {line!r}")
        edges.append((fields[0], fields[1]))
    return edges


def load_class_hierarchy(path: str, class_splits: ClassSplits) -> dict[str, dict[str, list[int]]]:
    """split -> node -> class indices, the ``class_hierarchy`` metadata of the format."""
    edges = read_hierarchy_edges(path)
    return {
        s: class_hierarchy_from_edges(edges, class_splits.classes[s])
        for s in class_splits.splits_with_classes()
    }


# ----------------------------------------------------------------------------------------
# Catalogue iteration (TensorFlow) and original archive directories (PIL)
# ----------------------------------------------------------------------------------------


def _require_tensorflow(what: str) -> None:
    try:
        import tensorflow  # noqa: F401  (TFDS catalogue builders and tf.data need it)
    except ImportError as e:
        raise ImportError(
            f"{what} needs TensorFlow, the optional [prepare] extra: {TF_INSTALL_HINT}. "
            "Reading prepared sources does not need it."
        ) from e


def _lazy(data: Any) -> Callable[[], np.ndarray]:
    return lambda: decode_image(data)


def _name_by_number(class_names: Iterable[str], digits: int) -> dict[int, str]:
    """``"014.Indigo_Bunting"`` -> {14: "014.Indigo_Bunting"} for every shipped name."""
    return {int(name[:digits]): name for name in class_names}


def _all_names(class_splits: ClassSplits) -> list[str]:
    return [n for s in SPLITS for n in class_splits.classes[s]]


def catalogue_extractor(
    source: str,
    *,
    label_names: Sequence[str] = (),
    alphabet_names: Sequence[str] = (),
    class_splits: ClassSplits | None = None,
) -> Callable[[Mapping[str, Any]], list[Example]]:
    """The function that turns one catalogue record (numpy) into examples of ``source``.

    Images stay encoded (``SkipDecoding``) and are decoded only for kept examples.
    ``label_names`` are the catalogue's ClassLabel names (VDD: the devkit categories).
    """
    class_splits = class_splits or load_class_splits(source)
    if source == "omniglot":

        def extract(r):
            alphabet = alphabet_names[int(r["alphabet"])]
            name = f"{alphabet}-character{int(r['alphabet_char_id']) + 1:02d}"
            return [(_lazy(r["image"]), name, alphabet)]

    elif source in ("cu_birds", "vgg_flower"):  # catalogue names lose case/number prefix
        by_number = _name_by_number(_all_names(class_splits), 3)

        def extract(r):
            return [(_lazy(r["image"]), by_number[int(r["label"]) + 1])]

    elif source == "traffic_sign":
        ordered = class_splits.classes["test"]

        def extract(r):
            return [(_lazy(r["image"]), ordered[int(r["label"])])]

    elif source == "ilsvrc_2012":

        def extract(r):
            file_name = r["file_name"]
            file_name = file_name.decode() if isinstance(file_name, bytes) else str(file_name)
            if os.path.basename(file_name) in class_splits.skip_files:
                return []
            return [(_lazy(r["image"]), label_names[int(r["label"])])]

    elif source == "mscoco":

        def extract(r):
            objects = r["objects"]
            boxes, labels = np.asarray(objects["bbox"]), np.asarray(objects["label"])
            if not len(labels):
                return []
            decoded = functools.cache(lambda: to_rgb(decode_image(r["image"])))
            out = []
            # TFDS stores COCO's pixel boxes (x, y, w, h) normalised as float32
            # (ymin, xmin, ymax, xmax); undo that in float64.
            for box_normalised, label in zip(boxes.astype(np.float64), labels, strict=True):

                def crop_object(box_normalised=box_normalised):
                    image = decoded()
                    height, width = image.shape[:2]
                    ymin, xmin, ymax, xmax = box_normalised
                    xywh = (
                        xmin * width,
                        ymin * height,
                        (xmax - xmin) * width,
                        (ymax - ymin) * height,
                    )
                    box = coco_crop_box(xywh, width, height)
                    return crop(image, box) if box is not None else None

                out.append((crop_object, label_names[int(label)]))
            return out

    else:

        def extract(r):
            return [(_lazy(r["image"]), label_names[int(r["label"])])]

    return extract


def _vdd_category_names(config: str, data_dir: str, annotations_dir: str | None) -> list[str]:
    """Category names of a VDD config, in label order, from the devkit annotations."""
    if annotations_dir:
        candidates = [os.path.join(os.path.expanduser(annotations_dir), f"{config}_train.json")]
    else:
        pattern = os.path.join(
            os.path.expanduser(data_dir),
            "downloads",
            "extracted",
            "*",
            "decathlon-1.0",
            "annotations",
            f"{config}_train.json",
        )
        candidates = sorted(glob.glob(pattern))
    candidates = [c for c in candidates if os.path.exists(c)]
    if not candidates:
        raise FileNotFoundError(
            f"cannot find the Visual Domain Decathlon annotations ({config}_train.json) that "
            f"name its classes; pass --vdd_annotations_dir=<decathlon-1.0/annotations> "
            f"(from {VDD_DEVKIT_URL}) or prepare from the original archive with --source_dirs"
        )
    with open(candidates[0], encoding="utf-8") as f:
        return [c["name"] for c in json.load(f)["categories"]]


def catalogue_examples(
    source: str,
    *,
    data_dir: str,
    manual_dir: str | None = None,
    vdd_annotations_dir: str | None = None,
    class_splits: ClassSplits | None = None,
) -> Iterator[Example]:
    """Prepares ``source``'s TFDS catalogue dataset (once) and iterates its examples.

    The only part of this module that needs TensorFlow.
    """
    source = check_source(source)
    spec = SOURCES[source]
    if spec.catalogue is None:
        raise FileNotFoundError(_no_catalogue_message(source))
    _require_tensorflow(f"Preparing meta_dataset/{source} from the TFDS catalogue")
    cat = spec.catalogue
    builder = tfds.builder(cat.name, data_dir=data_dir)
    try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
        )
    except Exception as e:
        hint = f" ({cat.manual_download})" if cat.manual_download else ""
        raise RuntimeError(
            f"preparing the TFDS catalogue dataset {cat.name!r} for meta_dataset/{source} "
            f"failed: {type(e).__name__}: {e}{hint}"
        ) from e
    features = builder.info.features
    label_names: Sequence[str] = ()
    if source == "aircraft":  # traffic_sign maps VDD labels to GTSRB class ids directly
        label_names = _vdd_category_names("aircraft", data_dir, vdd_annotations_dir)
    elif source == "mscoco":
        label_names = features["objects"]["label"].names
    elif "label" in features:
        label_names = features["label"].names
    alphabet_names = features["alphabet"].names if source == "omniglot" else ()
    extract = catalogue_extractor(
        source, label_names=label_names, alphabet_names=alphabet_names, class_splits=class_splits
    )
    for split in cat.splits:
        dataset = builder.as_dataset(
            split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()}
        )
        for record in tfds.as_numpy(dataset):
            yield from extract(record)


def _image_files(directory: str) -> list[str]:
    extensions = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".gif", ".tif", ".tiff", ".webp")
    return sorted(
        os.path.join(directory, f)
        for f in os.listdir(directory)
        if f.lower().endswith(extensions) and not f.startswith(".")
    )


def class_folder_examples(root: str) -> Iterator[Example]:
    """``<root>/<class name>/<image files>``: the class name is the folder name."""
    for class_name in sorted(os.listdir(root)):
        folder = os.path.join(root, class_name)
        if os.path.isdir(folder) and not class_name.startswith("."):
            for path in _image_files(folder):
                yield _lazy(path), class_name


def fungi_examples(root: str) -> Iterator[Example]:
    """The FGVCx 2018 fungi archive: train.json + val.json (COCO-style) and images.

    Class name ``"<category id:04d>.<category name>"`` as in Meta-Dataset (some categories
    share a name); the competition's unlabeled test set is not used.
    """
    categories, image_files, image_class = {}, {}, {}
    for part in ("train.json", "val.json"):
        with open(os.path.join(root, part), encoding="utf-8") as f:
            data = json.load(f)
        categories.update({c["id"]: f"{c['id']:04d}.{c['name']}" for c in data["categories"]})
        image_files.update({im["id"]: im["file_name"] for im in data["images"]})
        image_class.update({a["image_id"]: a["category_id"] for a in data["annotations"]})
    for image_id in sorted(image_class):
        yield _lazy(os.path.join(root, image_files[image_id])), categories[image_class[image_id]]


def fgvc_aircraft_examples(root: str) -> Iterator[Example]:
    """The FGVC-Aircraft archive, cropped to the annotated boxes as Meta-Dataset does
    (the box also removes the 20-pixel copyright banner)."""
    data = (
        root if os.path.exists(os.path.join(root, "images_box.txt")) else os.path.join(root, "data")
    )
    boxes = {}
    with open(os.path.join(data, "images_box.txt"), encoding="utf-8") as f:
        for line in f:
            if line.strip():
                name, *box = line.split()
                boxes[name] = tuple(int(v) for v in box)
    variants = {}
    for part in ("images_variant_trainval.txt", "images_variant_test.txt"):
        with open(os.path.join(data, part), encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    name, variant = line.rstrip("\n").split(" ", 1)
                    variants[name] = variant
    for name in sorted(variants):
        path = os.path.join(data, "images", f"{name}.jpg")
        box = boxes[name]
        yield (lambda path=path, box=box: crop(to_rgb(decode_image(path)), box)), variants[name]


def gtsrb_examples(root: str, class_splits: ClassSplits) -> Iterator[Example]:
    """GTSRB's training images (the 39,209 Meta-Dataset uses), folder 000NN = class NN."""
    images = os.path.join(root, "Final_Training", "Images")
    if not os.path.isdir(images):
        images = os.path.join(root, "GTSRB", "Final_Training", "Images")
    ordered = class_splits.classes["test"]
    for folder in sorted(os.listdir(images)):
        if folder.isdigit():
            for path in _image_files(os.path.join(images, folder)):
                yield _lazy(path), ordered[int(folder)]


def local_examples(
    source: str, root: str, class_splits: ClassSplits | None = None
) -> Iterator[Example]:
    """Examples of ``source`` from an original archive directory (no TensorFlow).

    The layout is detected: FGVCx fungi (train.json), FGVC-Aircraft (images_box.txt),
    GTSRB (Final_Training/Images); anything else is read as class folders whose names
    are the shipped class names.
    """
    source = check_source(source)
    class_splits = class_splits or load_class_splits(source)
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"source directory for {source} does not exist: {root!r}")
    if source == "fungi" and os.path.exists(os.path.join(root, "train.json")):
        return fungi_examples(root)
    if source == "aircraft" and any(
        os.path.exists(os.path.join(root, *p, "images_box.txt")) for p in ((), ("data",))
    ):
        return fgvc_aircraft_examples(root)
    if source == "traffic_sign" and any(
        os.path.isdir(os.path.join(root, *p, "Final_Training")) for p in ((), ("GTSRB",))
    ):
        return gtsrb_examples(root, class_splits)
    return class_folder_examples(root)


def _no_catalogue_message(source: str) -> str:
    return (
        f"meta_dataset/{source} is not in the TFDS catalogue; download it yourself and pass "
        f"--source_dirs={source}=<dir> to {PREPARE_MODULE}, where <dir> is the "
        f"{SOURCES[source].local_layout}"
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
            raise FileNotFoundError(_no_catalogue_message(source))
        else:
            _require_tensorflow(f"Preparing meta_dataset/{source} from the TFDS catalogue")
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
        load_split(source, split, data_dir, class_splits=class_splits)
    return str(builder.data_path)


# ----------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------


class _LazyImages:
    """Random access to the stored images; read errors name the directory to rebuild.

    Pickles as (path, split) and reopens the files on first access, so grain worker
    processes get their own readers.
    """

    def __init__(self, path: str, split: str, source: str, num_examples: int, data_source=None):
        self._path, self._split, self._source = path, split, source
        self._num_examples = num_examples
        self._ds = data_source

    def __len__(self) -> int:
        return self._num_examples

    def __getitem__(self, index) -> np.ndarray:
        try:
            if self._ds is None:
                self._ds = tfds.builder_from_directory(self._path).as_data_source(self._split)
            return self._ds[int(index)]["image"]
        except Exception as e:
            raise MissingDataError(_corrupt_message(self._source, self._path, e)) from e

    def __getstate__(self):
        return {**self.__dict__, "_ds": None}


def _corrupt_message(source: str, path, error: Exception) -> str:
    data_dir = os.path.dirname(os.path.dirname(os.path.dirname(str(path))))
    return (
        f"meta_dataset/{source} in {str(path)!r} is corrupted ({type(error).__name__}: "
        f"{error}); delete that directory and prepare it again: "
        f"{_prepare_command([source], data_dir)}"
    )


def _labels(builder, split: str, source: str, path, num_examples: int) -> np.ndarray:
    """Labels of a split, cached in ``<version dir>/labels/<split>.npy``.

    Reading them means parsing every record (images are not decoded), so the first read
    of a large source takes a while; the cache makes later reads instant.
    """
    cache = os.path.join(str(path), "labels", f"{split}.npy")
    if os.path.exists(cache):
        try:
            labels = np.load(cache)
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
        raise MissingDataError(_corrupt_message(source, path, e)) from e
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        np.save(cache, labels)
    except OSError:
        pass  # read-only data directory: no cache, still correct
    return labels


def _check_shards(data_source, split_info, source: str, path) -> None:
    """Reads the first and last record of every shard: a truncated file fails here."""
    offsets = np.cumsum([0] + list(split_info.shard_lengths))
    try:
        for start, stop in zip(offsets[:-1], offsets[1:], strict=True):
            if stop > start:
                data_source.__getitems__([int(start), int(stop) - 1])
    except Exception as e:
        raise MissingDataError(_corrupt_message(source, path, e)) from e


def load_split(
    source: str,
    split: str,
    data_dir,
    *,
    in_memory: bool = False,
    class_splits: ClassSplits | None = None,
) -> SplitData:
    """One prepared class split of a Meta-Dataset source.

    Args:
      source: a name of ``ALL_SOURCES`` (or ``"meta_dataset/<name>"``).
      split: ``"train"``, ``"valid"`` or ``"test"``.
      data_dir: the TFDS data directory it was prepared into.
      in_memory: load all images into one array (small sources); default: images are
        read lazily by index, labels are read once and cached on disk.
      class_splits: the class splits it was prepared with (default: shipped lists).

    Raises:
      ValueError: unknown source or split, or a split without classes (test-only source).
      MissingDataError: not prepared, or the prepared files are corrupted.
    """
    source = check_source(source)
    _check_split(split)
    class_splits = class_splits or load_class_splits(source)
    if not class_splits.classes[split]:
        raise ValueError(
            f"meta_dataset/{source} has no {split!r} classes; its class splits are "
            f"{list(class_splits.splits_with_classes())} (test-only sources are unseen domains)"
        )
    path = sources.prepared_dir(data_dir, BUILDER_NAME, source)
    if path is None:
        raise MissingDataError(_missing_message([source], data_dir))
    try:
        builder = tfds.builder_from_directory(str(path))
        split_info = builder.info.splits[split]
    except Exception as e:  # corrupted dataset_info/features, or a split missing
        raise MissingDataError(_corrupt_message(source, path, e)) from e
    metadata = builder.info.metadata or {}
    class_names = list(metadata.get("class_names", {}).get(split, []))
    if class_names != list(class_splits.classes[split]):
        raise ValueError(
            f"meta_dataset/{source} in {str(path)!r} was prepared with other {split} classes "
            f"than the class splits in use ({len(class_names)} vs "
            f"{class_splits.num_classes(split)}); prepare it again with --overwrite"
        )
    num_examples = split_info.num_examples
    if num_examples == 0:
        raise MissingDataError(_corrupt_message(source, path, ValueError("empty split")))
    images = builder.as_data_source(split)
    _check_shards(images, split_info, source, path)
    labels = _labels(builder, split, source, path, num_examples)
    lazy = _LazyImages(str(path), split, source, num_examples, images)
    if in_memory:
        stored = np.empty((num_examples, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
        try:
            for start in range(0, num_examples, 4096):
                stop = min(num_examples, start + 4096)
                records = images.__getitems__(list(range(start, stop)))
                stored[start:stop] = [r["image"] for r in records]
        except Exception as e:
            raise MissingDataError(_corrupt_message(source, path, e)) from e
    groups = metadata.get("class_groups", {}).get(split)
    hierarchy = metadata.get("class_hierarchy", {}).get(split)
    return SplitData(
        source=f"{BENCHMARK}/{source}",
        split=split,
        images=stored if in_memory else lazy,
        labels=labels,
        class_names=class_names,
        class_groups=None if groups is None else np.asarray(groups, np.int32),
        class_hierarchy=None
        if hierarchy is None
        else {node: np.asarray(idx, np.int32) for node, idx in hierarchy.items()},
    )


# ----------------------------------------------------------------------------------------
# Availability
# ----------------------------------------------------------------------------------------


def missing_sources(sources_: Iterable[str], data_dir) -> list[str]:
    """The sources (names, in the given order) not prepared in ``data_dir``."""
    names = list(dict.fromkeys(check_source(s) for s in sources_))
    return [s for s in names if sources.prepared_dir(data_dir, BUILDER_NAME, s) is None]


def _prepare_command(names: Sequence[str], data_dir) -> str:
    command = f"{PREPARE_MODULE} --sources={','.join(names)} --data_dir={data_dir}"
    if any(SOURCES[s].catalogue and SOURCES[s].catalogue.manual_download for s in names):
        command += " --manual_dir=<dir with the manual downloads>"
    local = [s for s in names if SOURCES[s].catalogue is None]
    if local:
        command += " --source_dirs=" + ",".join(f"{s}=<{s} dir>" for s in local)
    return command


def _missing_message(names: Sequence[str], data_dir) -> str:
    lines = [
        f"Meta-Dataset sources not prepared in data_dir={str(data_dir)!r}: {', '.join(names)}.",
        f"Prepare them with (TensorFlow needed for catalogue sources: {TF_INSTALL_HINT}):",
        f"  {_prepare_command(names, data_dir)}",
    ]
    for s in names:
        cat = SOURCES[s].catalogue
        if cat is None:
            lines.append(f"  {s}: {_no_catalogue_message(s)}")
        elif cat.manual_download:
            lines.append(f"  {s}: {cat.manual_download}")
    return "\n".join(lines)


def require_sources(sources_: Iterable[str], data_dir) -> None:
    """Raises ``MissingDataError`` naming every missing source and the prepare command."""
    missing = missing_sources(sources_, data_dir)
    if missing:
        raise MissingDataError(_missing_message(missing, data_dir))


def source_status(source: str, data_dir) -> dict[str, Any]:
    """Whether ``source`` is prepared and its classes / images per split (no data read)."""
    source = check_source(source)
    class_splits = load_class_splits(source)
    path = sources.prepared_dir(data_dir, BUILDER_NAME, source)
    status: dict[str, Any] = {
        "source": source,
        "seen": SOURCES[source].seen,
        "prepared": False,
        "path": None if path is None else str(path),
        "splits": {s: {"classes": class_splits.num_classes(s), "images": None} for s in SPLITS},
    }
    if path is None:
        return status
    try:
        info = tfds.builder_from_directory(str(path)).info
    except Exception as e:
        status["error"] = f"{type(e).__name__}: {e}"
        return status
    status["prepared"] = True
    for s in class_splits.splits_with_classes():
        if s in info.splits:
            status["splits"][s]["images"] = info.splits[s].num_examples
    return status
