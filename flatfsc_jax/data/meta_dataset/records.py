"""Meta-Dataset's converted records, read without TensorFlow: ``$RECORDS/<source>/``.

Meta-Dataset's converter (and URL's instructions, and CNAPs' script for MNIST / CIFAR)
writes one directory per source: ``dataset_spec.json`` (classes per split, images per
class, class names; Omniglot adds alphabets, ImageNet its WordNet sampling graph) and
one ``<class_id>.tfrecords`` file per class, whose records are ``tf.train.Example``
protos with ``image`` (encoded JPEG/PNG bytes) and ``label`` (the class id).

Why no TensorFlow: the TFRecord framing is four fixed fields (length, its CRC, payload,
its CRC), the Example proto ships with TFDS (``tensorflow_datasets.proto``, a core
dependency), CRC32C is google-crc32c's C code (the ``prepare`` extra; else tensorboardX's
pure-Python one, a core dependency, too slow for full sources, so payload checksums are
then skipped) and PIL decodes the images. So CI and users without the ``prepare`` extra
read records exactly as a GPU node does, and TensorFlow, a very large install, is never
needed for this path. The same reader takes Meta-Dataset's own TFDS build (md_tfds:
class-ordered TFRecord shards, its dataset specs in ``metadata.json``), so users who
built that instead of the records can use it as it is.

Pixels follow Meta-Dataset's reader (``data/decoder.py``): decode to 3 channels, then
bilinear resize with aligned corners to the image size (``convert.resize_bilinear``).
We store that result rounded to uint8 (see the package's deviation list).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from flatfsc_jax.data.meta_dataset.convert import decode_image, resize_bilinear, to_rgb
from flatfsc_jax.data.meta_dataset.specs import IMAGE_SIZE, SPLITS, ClassSplits, load_class_splits

SPEC_FILE = "dataset_spec.json"
# Meta-Dataset's split names in dataset_spec.json, in class-id order.
MD_SPLITS = {"TRAIN": "train", "VALID": "valid", "TEST": "test"}
SPEC_CLASSES = {
    "DatasetSpecification",
    "BiLevelDatasetSpecification",
    "HierarchicalDatasetSpecification",
}


class RecordsError(ValueError):
    """A records directory that cannot be read: names the file and what to do."""


# ----------------------------------------------------------------------------------------
# TFRecord framing and tf.train.Example
# ----------------------------------------------------------------------------------------

_MASK_DELTA = 0xA282EAD8


@functools.cache
def _crc32c():
    """CRC32C: google-crc32c's C code (the ``prepare`` extra) or tensorboardX's fallback."""
    try:
        import google_crc32c

        if google_crc32c.implementation == "c":
            return google_crc32c.value, True
    except ImportError:
        pass
    from tensorboardX import crc32c

    return crc32c.crc32c, crc32c._crc32c_native is not None


def masked_crc32c(data: bytes) -> int:
    """TFRecord's checksum: CRC32C rotated right by 15 bits plus a constant."""
    crc = _crc32c()[0](data) & 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def native_crc32c() -> bool:
    """Whether CRC32C runs at hardware speed (google-crc32c's C code is installed)."""
    return _crc32c()[1]


def iter_tfrecords(
    path: str, *, check_data_crc: bool | None = None, skip: int = 0, take: int | None = None
) -> Iterator[bytes]:
    """The payloads of a TFRecord file, in order (records ``skip`` .. ``skip + take``).

    The length checksum is always verified; the payload checksum when CRC32C is native
    (``check_data_crc=None``) or when asked. Skipped records are seeked over, unread. A
    truncated or damaged file raises ``RecordsError`` naming the file, the record and its
    byte offset.
    """
    if check_data_crc is None:
        check_data_crc = native_crc32c()
    with open(path, "rb") as f:
        index = 0
        while take is None or index < skip + take:
            offset = f.tell()
            header = f.read(12)
            if not header:
                if take is not None:
                    raise RecordsError(_corrupt(path, index, offset, "fewer records than listed"))
                return
            if len(header) < 12:
                raise RecordsError(_corrupt(path, index, offset, "truncated record header"))
            length, length_crc = struct.unpack("<QI", header)
            if masked_crc32c(header[:8]) != length_crc:
                raise RecordsError(_corrupt(path, index, offset, "length checksum mismatch"))
            if index < skip:
                f.seek(length + 4, os.SEEK_CUR)
                index += 1
                continue
            payload = f.read(length)
            footer = f.read(4)
            if len(payload) < length or len(footer) < 4:
                raise RecordsError(_corrupt(path, index, offset, "truncated record"))
            if check_data_crc and masked_crc32c(payload) != struct.unpack("<I", footer)[0]:
                raise RecordsError(_corrupt(path, index, offset, "data checksum mismatch"))
            yield payload
            index += 1


def _corrupt(path: str, index: int, offset: int, what: str) -> str:
    return (
        f"{path}: record {index} (byte {offset}) is corrupt ({what}); copy or convert this "
        "class file again"
    )


def parse_example(payload: bytes) -> tuple[bytes, int]:
    """``(image bytes, label)`` of a serialized ``tf.train.Example`` as MD writes it."""
    from tensorflow_datasets.proto import tf_example_pb2

    example = tf_example_pb2.Example.FromString(payload)
    feature = example.features.feature
    if "image" not in feature or "label" not in feature:
        raise ValueError(f"Example has features {sorted(feature)}, expected 'image' and 'label'")
    images = feature["image"].bytes_list.value
    labels = feature["label"].int64_list.value
    if len(images) != 1 or len(labels) != 1:
        raise ValueError("Example must hold exactly one image and one label")
    return images[0], int(labels[0])


def serialize_example(image: bytes, label: int) -> bytes:
    """The ``tf.train.Example`` Meta-Dataset's converter writes (for the miniature)."""
    from tensorflow_datasets.proto import tf_example_pb2

    example = tf_example_pb2.Example()
    example.features.feature["image"].bytes_list.value.append(image)
    example.features.feature["label"].int64_list.value.append(int(label))
    return example.SerializeToString()


def write_tfrecords(path: str, payloads: Sequence[bytes]) -> None:
    """A TFRecord file (uncompressed, as ``tf.io.TFRecordWriter`` writes it)."""
    with open(path, "wb") as f:
        for data in payloads:
            header = struct.pack("<Q", len(data))
            f.write(header + struct.pack("<I", masked_crc32c(header)))
            f.write(data + struct.pack("<I", masked_crc32c(data)))


def decode_md_image(data: bytes, size: int = IMAGE_SIZE) -> np.ndarray:
    """Meta-Dataset's reader: decode with 3 channels, bilinear resize (aligned corners)."""
    return resize_bilinear(to_rgb(decode_image(data)), size)


# ----------------------------------------------------------------------------------------
# dataset_spec.json
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RecordsSpec:
    """A parsed ``dataset_spec.json`` (any of Meta-Dataset's three specification kinds).

    Attributes:
      name: the spec's ``name`` (Meta-Dataset's source name).
      path: the spec file.
      kind: ``"DatasetSpecification"``, ``"BiLevelDatasetSpecification"`` (Omniglot:
        classes grouped in superclasses) or ``"HierarchicalDatasetSpecification"``
        (ImageNet: classes are the leaves of each split's sampling graph).
      class_names: class id -> name (ImageNet: WordNet id).
      images_per_class: class id -> number of records in ``<class_id>.tfrecords``.
      split_classes: split ("train"/"valid"/"test") -> class ids (contiguous, in order).
      superclass_names: Omniglot: superclass (alphabet) id -> name; else empty.
      class_superclass: Omniglot: class id -> superclass id; else empty.
      split_subgraphs: ImageNet: MD split name -> its graph nodes as in the file (``wn_id``,
        ``words``, ``children_ids``, ``parents_ids``); the sampling graph is derived from
        them by ``hierarchy``. Empty for the other kinds.
      file_pattern: class file name pattern, ``"{}.tfrecords"``.
      shards: MD's TFDS build only: its ``all_classes`` shard files and record counts, in
        order (classes are contiguous in class-id order); empty for MD's records.
    """

    name: str
    path: str
    kind: str
    class_names: tuple[str, ...]
    images_per_class: tuple[int, ...]
    split_classes: Mapping[str, tuple[int, ...]]
    superclass_names: tuple[str, ...] = ()
    class_superclass: tuple[int, ...] = ()
    split_subgraphs: Mapping[str, tuple[Mapping[str, Any], ...]] = dataclasses.field(
        default_factory=dict
    )
    file_pattern: str = "{}.tfrecords"
    shards: tuple[tuple[str, int], ...] = ()

    def class_file(self, class_id: int) -> str:
        return os.path.join(os.path.dirname(self.path), self.file_pattern.format(class_id))

    def class_locations(self, class_id: int) -> list[tuple[str, int, int | None]]:
        """Where a class's records are: ``(file, records to skip, records to read)``.

        MD's records: its own file, all of it. MD's TFDS build: the slice of the class-
        ordered ``all_classes`` shards that the spec's image counts give (MD's slicing).
        """
        if not self.shards:
            return [(self.class_file(class_id), 0, None)]
        start = sum(self.images_per_class[:class_id])
        stop = start + self.images_per_class[class_id]
        out, offset = [], 0
        for path, count in self.shards:
            lo, hi = max(start, offset), min(stop, offset + count)
            if lo < hi:
                out.append((path, lo - offset, hi - lo))
            offset += count
        return out

    def input_files(self) -> list[str]:
        """Every file the images come from (for sizes and presence checks)."""
        if self.shards:
            return [path for path, _ in self.shards]
        return [self.class_file(i) for i in range(len(self.class_names))]

    @property
    def num_images(self) -> int:
        return int(sum(self.images_per_class))


def _id_map(doc: Mapping[str, Any], key: str, path: str) -> dict[int, Any]:
    value = doc.get(key)
    if not isinstance(value, dict):
        raise RecordsError(f"{path}: '{key}' is missing or not an object; is it MD's {SPEC_FILE}?")
    try:
        return {int(k): v for k, v in value.items()}
    except ValueError as e:
        raise RecordsError(f"{path}: '{key}' keys must be integer class ids ({e})") from e


def read_dataset_spec(source_dir: str) -> RecordsSpec:
    """Parses ``<source_dir>/dataset_spec.json`` (MD's schema); errors name the file."""
    path = os.path.join(source_dir, SPEC_FILE)
    if not os.path.isfile(path):
        raise RecordsError(
            f"{path} does not exist: --from_records must point at Meta-Dataset's records "
            f"root, which has one directory per source holding {SPEC_FILE} and "
            "<class_id>.tfrecords (written by MD's dataset_conversion)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise RecordsError(f"{path} is unreadable ({type(e).__name__}: {e})") from e
    return parse_dataset_spec(doc, path, default_name=os.path.basename(source_dir))


def parse_dataset_spec(doc: Any, path: str, default_name: str = "") -> RecordsSpec:
    """A ``dataset_spec.json`` document (MD's schema) -> ``RecordsSpec``; ``path`` names it
    in errors and locates the class files."""
    kind = doc.get("__class__") if isinstance(doc, dict) else None
    if kind not in SPEC_CLASSES:
        raise RecordsError(
            f"{path}: '__class__' is {kind!r}, expected one of {sorted(SPEC_CLASSES)}"
        )
    names = _id_map(doc, "class_names", path)
    num_classes = len(names)
    if sorted(names) != list(range(num_classes)):
        raise RecordsError(f"{path}: class ids must be 0..{num_classes - 1}")
    class_names = tuple(str(names[i]) for i in range(num_classes))
    superclass_names: tuple[str, ...] = ()
    class_superclass: tuple[int, ...] = ()
    subgraphs: dict[str, tuple[Mapping[str, Any], ...]] = {}
    if kind == "HierarchicalDatasetSpecification":
        graphs = doc.get("split_subgraphs")
        if not isinstance(graphs, dict) or set(graphs) != set(MD_SPLITS):
            raise RecordsError(f"{path}: 'split_subgraphs' needs the keys {sorted(MD_SPLITS)}")
        subgraphs = {s: tuple(graphs[s]) for s in MD_SPLITS}
        # Class ids: the leaves of the train graph, then valid's, then test's (MD's order).
        counts = [sum(1 for n in subgraphs[s] if not n.get("children_ids")) for s in MD_SPLITS]
        per_split = doc.get("images_per_class")
        if not isinstance(per_split, dict) or set(per_split) != set(MD_SPLITS):
            raise RecordsError(f"{path}: 'images_per_class' needs the keys {sorted(MD_SPLITS)}")
        merged = {k: v for s in MD_SPLITS for k, v in per_split[s].items()}
        missing = [n for n in class_names if n not in merged]
        if missing:
            raise RecordsError(f"{path}: no image count for classes {missing[:5]}")
        images = tuple(int(merged[n]) for n in class_names)
    else:
        counts_by_id = _id_map(doc, "images_per_class", path)
        if sorted(counts_by_id) != list(range(num_classes)):
            raise RecordsError(
                f"{path}: 'images_per_class' must cover class ids 0..{num_classes - 1}"
            )
        images = tuple(int(counts_by_id[i]) for i in range(num_classes))
        if kind == "BiLevelDatasetSpecification":
            sup_counts = doc.get("superclasses_per_split")
            per_super = _id_map(doc, "classes_per_superclass", path)
            sup_names = _id_map(doc, "superclass_names", path)
            if not isinstance(sup_counts, dict) or set(sup_counts) != set(MD_SPLITS):
                raise RecordsError(f"{path}: 'superclasses_per_split' needs {sorted(MD_SPLITS)}")
            superclass_names = tuple(str(sup_names[i]) for i in range(len(sup_names)))
            class_superclass = tuple(
                s for s in range(len(per_super)) for _ in range(int(per_super[s]))
            )
            if len(class_superclass) != num_classes:
                raise RecordsError(
                    f"{path}: 'classes_per_superclass' sums to {len(class_superclass)}, "
                    f"but there are {num_classes} classes"
                )
            counts, start = [], 0
            for s in MD_SPLITS:
                n_sup = int(sup_counts[s])
                counts.append(sum(int(per_super[i]) for i in range(start, start + n_sup)))
                start += n_sup
        else:
            per_split = doc.get("classes_per_split")
            if not isinstance(per_split, dict) or set(per_split) != set(MD_SPLITS):
                raise RecordsError(
                    f"{path}: 'classes_per_split' needs the keys {sorted(MD_SPLITS)}"
                )
            counts = [int(per_split[s]) for s in MD_SPLITS]
    if sum(counts) != num_classes:
        raise RecordsError(
            f"{path}: the splits hold {sum(counts)} classes but 'class_names' has {num_classes}"
        )
    split_classes, start = {}, 0
    for split, count in zip(SPLITS, counts, strict=True):
        split_classes[split] = tuple(range(start, start + count))
        start += count
    return RecordsSpec(
        name=str(doc.get("name", default_name)),
        path=path,
        kind=kind,
        class_names=class_names,
        images_per_class=images,
        split_classes=split_classes,
        superclass_names=superclass_names,
        class_superclass=class_superclass,
        split_subgraphs=subgraphs,
        file_pattern=str(doc.get("file_pattern", "{}.tfrecords")),
    )


MD_TFDS_BUILDER = "meta_dataset"  # Meta-Dataset's TFDS build: <data_dir>/meta_dataset/<source>/


def read_md_tfds_spec(data_dir: str, source: str) -> RecordsSpec:
    """The spec and shards of Meta-Dataset's own TFDS build of ``source`` (md_tfds).

    md_tfds writes ``<data_dir>/meta_dataset/<source>/<version>/`` with one
    ``all_classes`` split whose examples are ordered by class id, and MD's dataset specs
    in ``metadata.json`` (``dataset_specs``; ``v1`` are the class splits we use). Each
    example is a ``tf.train.Example`` with ``image`` (JPEG) and ``label`` (the class id).
    """
    root = os.path.join(data_dir, MD_TFDS_BUILDER, source)
    versions = sorted(
        (d for d in (os.listdir(root) if os.path.isdir(root) else []) if d[:1].isdigit()),
        key=lambda v: tuple(int(x) for x in v.split(".") if x.isdigit()),
    )
    if not versions:
        raise RecordsError(
            f"{root}/<version>/ does not exist: --from_md_tfds must be the TFDS data "
            "directory in which Meta-Dataset's md_tfds build wrote meta_dataset/<source>/"
        )
    version_dir = os.path.join(root, versions[-1])
    docs = {}
    for name in ("dataset_info.json", "metadata.json"):
        try:
            with open(os.path.join(version_dir, name), encoding="utf-8") as f:
                docs[name] = json.load(f)
        except (OSError, ValueError) as e:
            raise RecordsError(
                f"{os.path.join(version_dir, name)} is missing or unreadable ({e}); is "
                f"{version_dir} a complete md_tfds build?"
            ) from e
    info, metadata = docs["dataset_info.json"], docs["metadata.json"]
    specs = metadata.get("dataset_specs", {}) if isinstance(metadata, dict) else {}
    if "v1" not in specs:
        raise RecordsError(
            f"{version_dir}/metadata.json has no dataset_specs['v1']: not an md_tfds build "
            f"of {source} (or a Meta-Dataset v2-only source)"
        )
    splits = {sp.get("name"): sp for sp in info.get("splits", []) if isinstance(sp, dict)}
    if "all_classes" not in splits:
        raise RecordsError(f"{version_dir}/dataset_info.json has no 'all_classes' split")
    lengths = [int(n) for n in splits["all_classes"].get("shardLengths", [])]
    fmt = info.get("fileFormat", "tfrecord")
    if fmt != "tfrecord":
        raise RecordsError(f"{version_dir}: file format {fmt!r}, expected tfrecord")
    shards = tuple(
        (
            os.path.join(
                version_dir,
                f"{info.get('name', MD_TFDS_BUILDER)}-all_classes.tfrecord-"
                f"{i:05d}-of-{len(lengths):05d}",
            ),
            n,
        )
        for i, n in enumerate(lengths)
    )
    spec = parse_dataset_spec(specs["v1"], os.path.join(version_dir, "metadata.json"), source)
    if sum(lengths) != spec.num_images:
        raise RecordsError(
            f"{version_dir}: the shards hold {sum(lengths)} examples, its v1 dataset spec "
            f"{spec.num_images}; the build is incomplete or of another Meta-Dataset version"
        )
    return dataclasses.replace(spec, shards=shards)


def _our_name(source: str, name: str) -> str:
    """A records class name as our shipped splits spell it (CNAPs' MNIST: 'class_3' -> '3')."""
    if source == "mnist" and name.startswith("class_"):
        return name[len("class_") :]
    return name


def class_splits_from_spec(source: str, spec: RecordsSpec) -> ClassSplits:
    """The class split the records hold, checked against the shipped one.

    Every records class must sit in the same split as in the shipped splits; records of
    a subset of the classes (a miniature, a partial copy) are accepted, and are then what
    the prepared source holds (in the records' class-id order).
    """
    shipped = load_class_splits(source)
    where = shipped.assignment
    classes: dict[str, tuple[str, ...]] = {}
    for split in SPLITS:
        names = tuple(_our_name(source, spec.class_names[i]) for i in spec.split_classes[split])
        wrong = [(n, where.get(n, (None,))[0]) for n in names if where.get(n, (None,))[0] != split]
        if wrong:
            name, found = wrong[0]
            raise RecordsError(
                f"{spec.path}: {split} class {name!r} is "
                + ("not a class of " + source if found is None else f"a {found} class")
                + f" in the shipped class splits ({len(wrong)} such classes); these records "
                "do not use Meta-Dataset's class splits"
            )
        classes[split] = names
    groups = None
    if shipped.groups is not None:
        if not spec.class_superclass:
            raise RecordsError(
                f"{spec.path}: {source} needs superclasses (a BiLevelDatasetSpecification)"
            )
        groups = {
            split: tuple(spec.superclass_names[spec.class_superclass[i]] for i in ids)
            for split, ids in spec.split_classes.items()
        }
    return ClassSplits(source=source, classes=classes, groups=groups)


# ----------------------------------------------------------------------------------------
# One class file -> stored images
# ----------------------------------------------------------------------------------------


def read_class(
    spec: RecordsSpec,
    class_id: int,
    *,
    image_size: int = IMAGE_SIZE,
    max_images: int | None = None,
    check_data_crc: bool | None = None,
) -> np.ndarray:
    """uint8 ``[n, image_size, image_size, 3]``: every image of one class file, decoded and
    resized as Meta-Dataset's reader does. Checks the labels and the spec's image count."""
    expected = spec.images_per_class[class_id]
    keep = expected if max_images is None else min(expected, max_images)
    # Filled in place: a QuickDraw class holds ~150k images, so no list-then-stack copy.
    images = np.empty((keep, image_size, image_size, 3), np.uint8)
    count, extra = 0, False
    for path, skip, take in spec.class_locations(class_id):
        if not os.path.isfile(path):
            raise RecordsError(
                f"{path} is missing: {spec.path} lists class {class_id} "
                f"({spec.class_names[class_id]!r}) with {spec.images_per_class[class_id]} images"
            )
        records = iter_tfrecords(path, check_data_crc=check_data_crc, skip=skip, take=take)
        for index, payload in enumerate(records, start=skip):
            if count == expected:  # more records than the spec lists
                extra = True
                break
            try:
                data, label = parse_example(payload)
                if label != class_id:
                    raise ValueError(f"label {label}, expected the class id {class_id}")
                if count < keep:
                    images[count] = decode_md_image(data, image_size)
            except Exception as e:
                raise RecordsError(
                    f"{path}: record {index} is corrupt ({type(e).__name__}: {e}); copy or "
                    "convert this file again"
                ) from e
            count += 1
        if extra:
            break
    if extra or count != expected:
        raise RecordsError(
            f"{path} holds {'more than ' if extra else ''}{count} records, {spec.path} says "
            f"{spec.images_per_class[class_id]}: the file is incomplete or from another conversion"
        )
    return images


# ----------------------------------------------------------------------------------------
# Staging: one finished class = one file, written atomically (resumable after a kill)
# ----------------------------------------------------------------------------------------


def staged_class_path(staging_dir: str, class_id: int) -> str:
    return os.path.join(staging_dir, f"{class_id}.npz")


def stage_class(
    spec: RecordsSpec,
    class_id: int,
    staging_dir: str,
    image_size: int = IMAGE_SIZE,
    max_images: int | None = None,
    check_data_crc: bool | None = None,
) -> tuple[int, int]:
    """Converts one class file into ``<staging_dir>/<class_id>.npz``; ``(class_id, images)``.

    The file appears under its final name only once complete (written to a temporary
    name, then renamed), so its presence is the class's completion marker.
    """
    images = read_class(
        spec,
        class_id,
        image_size=image_size,
        max_images=max_images,
        check_data_crc=check_data_crc,
    )
    final = staged_class_path(staging_dir, class_id)
    tmp = f"{final}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez_compressed(f, images=images)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return class_id, len(images)


def load_staged_class(staging_dir: str, class_id: int) -> np.ndarray:
    with np.load(staged_class_path(staging_dir, class_id)) as data:
        return data["images"]
