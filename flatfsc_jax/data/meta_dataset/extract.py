"""Examples of a Meta-Dataset source, from the TFDS catalogue or an original archive.

An example is ``(image, class name[, group])`` (see ``convert.Example``); images stay
encoded and are decoded only for the examples a split keeps.
``catalogue_examples`` iterates a TFDS catalogue dataset (the only place TensorFlow is
needed, the optional ``[prepare]`` extra) through ``catalogue_extractor``, the per-source
class-name rule; ``local_examples`` reads an original archive directory with PIL only
(fungi, or any source prepared with ``--source_dirs``); ``md_datasrc_examples`` reads
the directory tree of Meta-Dataset's conversion guide (``$DATASRC``) for all 13 sources.
"""

from __future__ import annotations

import functools
import glob
import gzip
import json
import os
import pickle
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from flatfsc_jax.data.meta_dataset.convert import Example, coco_crop_box, crop, decode_image, to_rgb
from flatfsc_jax.data.meta_dataset.specs import (
    MD_DATASRC_DIRS,
    SOURCES,
    SPLITS,
    TF_INSTALL_HINT,
    VDD_DEVKIT_URL,
    ClassSplits,
    check_source,
    deviating_catalogue_message,
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
    allow_deviating_catalogue: bool = False,
) -> Iterator[Example]:
    """Prepares ``source``'s TFDS catalogue dataset (once) and iterates its examples.

    The only part of this module that needs TensorFlow. A catalogue copy that differs
    from MD's source (``CatalogueSpec.deviation``: the 72-px Visual Domain Decathlon
    Aircraft and GTSRB) is refused unless ``allow_deviating_catalogue``.
    """
    source = check_source(source)
    spec = SOURCES[source]
    if spec.catalogue is None:
        raise FileNotFoundError(no_catalogue_message(source))
    if spec.catalogue.deviation and not allow_deviating_catalogue:
        raise ValueError(deviating_catalogue_message(source))
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


def class_folder_examples(root: str, skip_files: Iterable[str] = ()) -> Iterator[Example]:
    """``<root>/<class name>/<image files>``: the class name is the folder name.

    Files whose base name is in ``skip_files`` are left out (ImageNet's duplicates of
    other sources' images, matched by file name as MD does).
    """
    skip = frozenset(skip_files)
    for class_name in sorted(os.listdir(root)):
        folder = os.path.join(root, class_name)
        if os.path.isdir(folder) and not class_name.startswith("."):
            for path in _image_files(folder):
                if os.path.basename(path) not in skip:
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
    return class_folder_examples(root, class_splits.skip_files)


# ----------------------------------------------------------------------------------------
# Meta-Dataset's conversion guide ($DATASRC, doc/dataset_conversion.md)
# ----------------------------------------------------------------------------------------


def omniglot_examples(root: str) -> Iterator[Example]:
    """``images_background/`` and ``images_evaluation/``, each ``<alphabet>/<character>/``:
    class ``"<alphabet>-<character>"``, group = alphabet (MD's ``OmniglotConverter``)."""
    found = False
    for part in ("images_background", "images_evaluation"):
        base = os.path.join(root, part)
        if not os.path.isdir(base):
            continue
        found = True
        for alphabet in sorted(os.listdir(base)):
            alphabet_dir = os.path.join(base, alphabet)
            if not os.path.isdir(alphabet_dir) or alphabet.startswith("."):
                continue
            for character in sorted(os.listdir(alphabet_dir)):
                folder = os.path.join(alphabet_dir, character)
                if os.path.isdir(folder):
                    for path in _image_files(folder):
                        yield _lazy(path), f"{alphabet}-{character}", alphabet
    if not found:
        raise FileNotFoundError(
            f"{root!r} has neither images_background/ nor images_evaluation/: extract "
            "Omniglot's images_background.zip and images_evaluation.zip into it"
        )


def vgg_flower_examples(root: str, class_splits: ClassSplits) -> Iterator[Example]:
    """``jpg/image_NNNNN.jpg`` with ``imagelabels.mat`` (1-based labels, image order)."""
    from scipy.io import loadmat  # a dependency of the package

    labels = np.asarray(loadmat(os.path.join(root, "imagelabels.mat"))["labels"]).reshape(-1)
    by_number = _name_by_number(_all_names(class_splits), 3)
    for i, label in enumerate(labels.tolist()):
        path = os.path.join(root, "jpg", f"image_{i + 1:05d}.jpg")
        yield _lazy(path), by_number[int(label)]


def quickdraw_examples(root: str) -> Iterator[Example]:
    """One ``<class>.npy`` per class, rows of 28*28 uint8 bitmaps (memory-mapped, so a
    class file is never read whole)."""
    files = sorted(f for f in os.listdir(root) if f.endswith(".npy"))
    if not files:
        raise FileNotFoundError(f"{root!r} has no QuickDraw <class>.npy files")
    for name in files:
        rows = np.load(os.path.join(root, name), mmap_mode="r")
        if rows.ndim != 2:
            raise ValueError(f"{name}: expected [N, side*side] bitmaps, got shape {rows.shape}")
        side = int(round(np.sqrt(rows.shape[1])))
        class_name = name[: name.find(".")]
        for i in range(rows.shape[0]):
            yield (lambda r=rows, i=i, s=side: np.array(r[i]).reshape(s, s)), class_name


def mscoco_examples(root: str) -> Iterator[Example]:
    """``train2017/`` and ``instances_train2017.json`` (directly in ``root`` as MD expects,
    or in ``annotations/`` where the zip puts it): one example per object, the box grown
    by 1.2 about its centre (``coco_crop_box``); empty crops are dropped as in MD."""
    candidates = [
        os.path.join(root, "instances_train2017.json"),
        os.path.join(root, "annotations", "instances_train2017.json"),
    ]
    path = next((c for c in candidates if os.path.exists(c)), None)
    if path is None:
        raise FileNotFoundError(f"no instances_train2017.json in {candidates}")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    names = {c["id"]: c["name"] for c in data["categories"]}
    by_image: dict[int, list[dict]] = {}
    for annotation in data["annotations"]:
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    for image_id in sorted(by_image):
        file = os.path.join(root, "train2017", f"{image_id:012d}.jpg")
        # One decode per image, shared by its objects' crops.
        decoded = functools.cache(lambda file=file: to_rgb(decode_image(file)))
        for annotation in by_image[image_id]:

            def crop_object(bbox=annotation["bbox"], decoded=decoded):
                image = decoded()
                box = coco_crop_box(bbox, image.shape[1], image.shape[0])
                return crop(image, box) if box is not None else None

            yield crop_object, names[annotation["category_id"]]


def mnist_examples(root: str) -> Iterator[Example]:
    """MNIST's test set as CNAPs' script reads it: ``t10k-{images-idx3,labels-idx1}-ubyte.gz``."""
    with gzip.open(os.path.join(root, "t10k-images-idx3-ubyte.gz")) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(os.path.join(root, "t10k-labels-idx1-ubyte.gz")) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} MNIST images but {len(labels)} labels")
    for image, label in zip(images, labels.tolist(), strict=True):
        yield image, str(label)


def cifar_examples(root: str, fine: bool) -> Iterator[Example]:
    """CIFAR's python test batch (``test_batch`` + ``batches.meta``, or CIFAR-100's
    ``test`` + ``meta`` with fine labels), as CNAPs' script reads it."""
    batch, meta, key, names_key = (
        ("test", "meta", b"fine_labels", b"fine_label_names")
        if fine
        else ("test_batch", "batches.meta", b"labels", b"label_names")
    )
    with open(os.path.join(root, meta), "rb") as f:
        names = [n.decode() for n in pickle.load(f, encoding="bytes")[names_key]]
    with open(os.path.join(root, batch), "rb") as f:
        data = pickle.load(f, encoding="bytes")
    images = np.asarray(data[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    for image, label in zip(images, data[key], strict=True):
        yield image, names[int(label)]


def md_datasrc_examples(
    source: str, datasrc: str, class_splits: ClassSplits | None = None
) -> Iterator[Example]:
    """Examples of ``source`` from ``$DATASRC`` laid out as MD's conversion guide says
    (``MD_DATASRC_DIRS``; MNIST and CIFAR as CNAPs' ``prepare_extra_datasets.py``).

    Reads with PIL, numpy and scipy only. ImageNet skips MD's duplicate lists.
    """
    source = check_source(source)
    class_splits = class_splits or load_class_splits(source)
    root = os.path.join(os.path.expanduser(datasrc), MD_DATASRC_DIRS[source])
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"--md_datasrc: {source} is expected in {root!r} (Meta-Dataset's "
            f"doc/dataset_conversion.md, section {source}), which does not exist"
        )
    if source == "omniglot":
        return omniglot_examples(root)
    if source == "vgg_flower":
        return vgg_flower_examples(root, class_splits)
    if source == "quickdraw":
        return quickdraw_examples(root)
    if source == "mscoco":
        return mscoco_examples(root)
    if source == "mnist":
        return mnist_examples(root)
    if source in ("cifar10", "cifar100"):
        return cifar_examples(root, fine=source == "cifar100")
    if source in ("cu_birds", "dtd"):  # class folders under images/
        return class_folder_examples(os.path.join(root, "images"))
    return local_examples(source, root, class_splits)  # ImageNet, Aircraft, GTSRB, fungi
