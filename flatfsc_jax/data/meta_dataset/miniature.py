"""A miniature Meta-Dataset in Meta-Dataset's official records format, for tests and benches.

``write_miniature(root)`` writes ``root/<source>/{dataset_spec.json, <class_id>.tfrecords}``
for all 13 sources, as MD's converter (and CNAPs' script for MNIST / CIFAR) lays them
out: the three kinds of ``dataset_spec.json`` in MD's schema (field names and order), one
TFRecord of ``tf.train.Example`` (``image`` bytes, ``label`` int64) per class, tiny images
encoded as MD stores them (JPEG; PNG for MNIST / CIFAR, as CNAPs writes them).

The classes are real class names of the shipped class splits (a handful per split, in
their split), so ``prepare --from_records`` accepts them. Omniglot has a two-level spec
(alphabets with characters). ImageNet has a hierarchical spec whose per-split graphs
have MD's roots (entity; carnivore for valid; device for test), a node with two parents,
and nodes spanning fewer and more leaves than the 5 an episode needs, like MD's graph.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from flatfsc_jax.data.meta_dataset.records import (
    SPEC_FILE,
    serialize_example,
    write_tfrecords,
)
from flatfsc_jax.data.meta_dataset.specs import ALL_SOURCES, SPLITS, load_class_splits

MD_SPLIT = {"train": "TRAIN", "valid": "VALID", "test": "TEST"}
PNG_SOURCES = ("mnist", "cifar10", "cifar100")  # CNAPs saves these as .png files
GRAY_SOURCES = ("omniglot", "quickdraw", "mnist")

# ImageNet's miniature sampling graph per split: node -> children (leaves are "L<i>",
# the i-th class of the split). Roots are MD's split roots.
IMAGENET_GRAPH = {
    "train": {
        "n00001740": ["n90000001", "n90000002"],  # entity
        "n90000001": ["L0", "L1", "L2", "L3", "L4", "n90000003"],
        "n90000002": ["n90000003", "L8", "L9", "L10", "L11"],
        "n90000003": ["L5", "L6", "L7"],  # two parents: a DAG, as WordNet's
    },
    "valid": {
        "n02075296": ["n90000011", "n90000012"],  # carnivore
        "n90000011": ["L0", "L1", "L2", "L3", "L4"],
        "n90000012": ["L5", "L6"],
    },
    "test": {
        "n03183080": ["n90000021", "n90000022", "L7"],  # device
        "n90000021": ["L0", "L1", "L2", "L3", "L4"],
        "n90000022": ["L5", "L6"],
    },
}
ROOT_WORDS = {"n00001740": "entity", "n02075296": "carnivore", "n03183080": "device"}


@dataclasses.dataclass(frozen=True)
class Miniature:
    """What ``write_miniature`` wrote.

    Attributes:
      root: the records root (``--from_records``).
      class_names: source -> split -> class names (records order = class-id order; MNIST
        as our shipped splits name it, the records say ``class_<digit>`` as CNAPs does).
      encoded: source -> class id -> the encoded images of that class file, in order.
      groups: Omniglot: split -> alphabet of each class.
      hierarchy: ImageNet: split -> node -> class indices (local to the split) below it.
    """

    root: str
    class_names: Mapping[str, Mapping[str, tuple[str, ...]]]
    encoded: Mapping[str, Mapping[int, tuple[bytes, ...]]]
    groups: Mapping[str, tuple[str, ...]]
    hierarchy: Mapping[str, Mapping[str, tuple[int, ...]]]


def _encode(image: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    mode = "L" if image.ndim == 2 else "RGB"
    Image.fromarray(image, mode).save(
        buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {})
    )
    return buffer.getvalue()


def _image(rng: np.random.Generator, gray: bool, min_size: int, max_size: int) -> np.ndarray:
    """A smooth random image (JPEG keeps it recognisable) of a random small size."""
    h, w = rng.integers(min_size, max_size + 1, size=2)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    channels = 1 if gray else 3
    a, b, c = rng.uniform(0, 255, size=(3, channels))
    image = a + b * x[..., None] + c * y[..., None] * (1 - x[..., None])
    image = np.clip(image % 256 + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    return image[..., 0] if gray else image


def _pick(split_classes: Sequence[str], count: int) -> list[str]:
    return list(split_classes[:count])


def _omniglot_classes(count_alphabets: int, per_alphabet: int):
    splits = load_class_splits("omniglot")
    classes, groups = {}, {}
    for split in SPLITS:
        names, alphabets = [], []
        for alphabet in list(dict.fromkeys(splits.groups[split]))[:count_alphabets]:
            members = [
                n
                for n, g in zip(splits.classes[split], splits.groups[split], strict=True)
                if g == alphabet
            ]
            names += members[:per_alphabet]
            alphabets += [alphabet] * len(members[:per_alphabet])
        classes[split], groups[split] = tuple(names), tuple(alphabets)
    return classes, groups


def _imagenet_subgraphs(leaves: Mapping[str, Sequence[str]], counts: Mapping[str, int]):
    """MD's ``split_subgraphs`` and node image counts for the miniature graph."""
    subgraphs, images = {}, {}
    hierarchy = {}
    for split, graph in IMAGENET_GRAPH.items():

        def name(node, split=split):
            return leaves[split][int(node[1:])] if node.startswith("L") else node

        parents: dict[str, list[str]] = {}
        for parent, children in graph.items():
            for child in children:
                parents.setdefault(name(child), []).append(parent)
        below: dict[str, set[int]] = {}

        def span(node, graph=graph, split=split, below=below):
            if node.startswith("L"):
                return {int(node[1:])}
            if node not in below:
                below[node] = set().union(*(span(c) for c in graph[node]))
            return below[node]

        nodes = []
        for node in graph:
            nodes.append(
                {
                    "wn_id": node,
                    "words": ROOT_WORDS.get(node, f"miniature node {node}"),
                    "children_ids": [name(c) for c in graph[node]],
                    "parents_ids": parents.get(node, []),
                }
            )
        for leaf in leaves[split]:
            nodes.append(
                {
                    "wn_id": leaf,
                    "words": f"miniature class {leaf}",
                    "children_ids": [],
                    "parents_ids": parents[leaf],
                }
            )
        subgraphs[MD_SPLIT[split]] = nodes
        split_images = {leaf: counts[leaf] for leaf in leaves[split]}
        for node in graph:
            split_images[node] = int(sum(counts[leaves[split][i]] for i in span(node)))
        images[MD_SPLIT[split]] = split_images
        hierarchy[split] = {node: tuple(sorted(span(node))) for node in sorted(graph)}
    return subgraphs, images, hierarchy


def write_miniature(
    root: str,
    *,
    sources: Sequence[str] = ALL_SOURCES,
    classes_per_split: int = 6,
    images_per_class: tuple[int, int] = (3, 5),
    image_size: tuple[int, int] = (8, 16),
    seed: int = 0,
) -> Miniature:
    """Writes the miniature records of ``sources`` under ``root``; see the module doc.

    Args:
      classes_per_split: classes of each split a source has (ImageNet's graph fixes 12 /
        7 / 8; Omniglot has two alphabets of ``classes_per_split`` characters per split).
      images_per_class: inclusive range of images per class (class ``i`` gets
        ``lo + i % (hi - lo + 1)``).
      image_size: inclusive range of image heights and widths, in pixels.
    """
    rng = np.random.default_rng(seed)
    lo, hi = images_per_class
    all_names, all_encoded, groups, hierarchy = {}, {}, {}, {}
    for source in sources:
        shipped = load_class_splits(source)
        omniglot_groups = None
        if source == "omniglot":
            names, omniglot_groups = _omniglot_classes(2, classes_per_split)
            groups = dict(omniglot_groups)
        elif source == "ilsvrc_2012":
            sizes = {
                s: len({c for g in IMAGENET_GRAPH[s].values() for c in g if c.startswith("L")})
                for s in SPLITS
            }
            names = {s: tuple(_pick(shipped.classes[s], sizes[s])) for s in SPLITS}
        else:
            names = {s: tuple(_pick(shipped.classes[s], classes_per_split)) for s in SPLITS}
        ordered = [n for s in SPLITS for n in names[s]]
        counts = [lo + i % (hi - lo + 1) for i in range(len(ordered))]
        directory = os.path.join(root, source)
        os.makedirs(directory, exist_ok=True)
        fmt = "PNG" if source in PNG_SOURCES else "JPEG"
        encoded: dict[int, tuple[bytes, ...]] = {}
        for class_id, count in enumerate(counts):
            images = tuple(
                _encode(_image(rng, source in GRAY_SOURCES, *image_size), fmt) for _ in range(count)
            )
            write_tfrecords(
                os.path.join(directory, f"{class_id}.tfrecords"),
                [serialize_example(image, class_id) for image in images],
            )
            encoded[class_id] = images
        md_names = [f"class_{n}" if source == "mnist" else n for n in ordered]
        spec: dict = {"name": source}
        if source == "ilsvrc_2012":
            subgraphs, node_images, hierarchy = _imagenet_subgraphs(
                names, dict(zip(ordered, counts, strict=True))
            )
            spec["split_subgraphs"] = subgraphs
            spec["images_per_class"] = node_images
            kind = "HierarchicalDatasetSpecification"
        elif source == "omniglot":
            alphabets = [a for s in SPLITS for a in dict.fromkeys(omniglot_groups[s])]
            spec["superclasses_per_split"] = {
                MD_SPLIT[s]: len(dict.fromkeys(omniglot_groups[s])) for s in SPLITS
            }
            spec["classes_per_superclass"] = {
                str(i): sum(1 for s in SPLITS for g in omniglot_groups[s] if g == a)
                for i, a in enumerate(alphabets)
            }
            spec["images_per_class"] = {str(i): c for i, c in enumerate(counts)}
            spec["superclass_names"] = {str(i): a for i, a in enumerate(alphabets)}
            kind = "BiLevelDatasetSpecification"
        else:
            spec["classes_per_split"] = {MD_SPLIT[s]: len(names[s]) for s in SPLITS}
            spec["images_per_class"] = {str(i): c for i, c in enumerate(counts)}
            kind = "DatasetSpecification"
        spec["class_names"] = {str(i): n for i, n in enumerate(md_names)}
        spec["path"] = os.path.abspath(directory)
        spec["file_pattern"] = "{}.tfrecords"
        spec["__class__"] = kind
        with open(os.path.join(directory, SPEC_FILE), "w", encoding="utf-8") as f:
            json.dump(spec, f, indent=2)
        all_names[source] = names
        all_encoded[source] = encoded
    return Miniature(
        root=root,
        class_names=all_names,
        encoded=all_encoded,
        groups=groups,
        hierarchy=hierarchy,
    )


def prepare_miniature(
    root: str,
    *,
    sources: Sequence[str] = ALL_SOURCES,
    workers: int = 1,
    **miniature_options,
) -> tuple[Miniature, str, dict]:
    """Writes the miniature records under ``root/records`` and prepares every source from
    them into ``root/data`` (``prepare --from_records``); returns ``(miniature, data_dir,
    {source: builder.RecordsReport})``.

    The prepared sources hold the miniature's classes, not the shipped splits: read them
    with ``class_splits=availability.prepared_class_splits(source, data_dir)``.
    """
    from flatfsc_jax.data.meta_dataset import builder

    mini = write_miniature(os.path.join(root, "records"), sources=sources, **miniature_options)
    data_dir = os.path.join(root, "data")
    reports = {
        source: builder.prepare_from_records(source, mini.root, data_dir, workers=workers)
        for source in sources
    }
    return mini, data_dir, reports
