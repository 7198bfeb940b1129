"""Examples of a Meta-Dataset source, from the TFDS catalogue or an original archive.

An example is ``(image, class name[, group])`` (see ``convert.Example``); images stay
encoded and are decoded only for the examples a split keeps.
``catalogue_examples`` iterates a TFDS catalogue dataset (the only place TensorFlow is
needed, the optional ``[prepare]`` extra) through ``catalogue_extractor``, the per-source
class-name rule; ``local_examples`` reads an original archive directory with PIL only
(fungi, or any source prepared with ``--source_dirs``).
"""

from __future__ import annotations

import functools
import glob
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from flatfsc_jax.data.meta_dataset.convert import Example, coco_crop_box, crop, decode_image, to_rgb
from flatfsc_jax.data.meta_dataset.specs import (
    SOURCES,
    SPLITS,
    TF_INSTALL_HINT,
    VDD_DEVKIT_URL,
    ClassSplits,
    check_source,
    load_class_splits,
    no_catalogue_message,
)


def require_tensorflow(what: str) -> None:
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
        raise FileNotFoundError(no_catalogue_message(source))
    require_tensorflow(f"Preparing meta_dataset/{source} from the TFDS catalogue")
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
