"""Tests of the Meta-Dataset sources: shipped splits, conversion, builder round trip, reader.

No Meta-Dataset data exists here (and no TensorFlow): the builder is fed small synthetic
catalogues whose class names come from the shipped split lists, written with the real
TFDS builder into tmp_path and read back through ``benchmarks.load_split`` (the one reader,
``sources.read_prepared_split``).
"""

import glob
import importlib.util
import io
import json
import os
import pickle
import sys
import types

import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import app
from PIL import Image
from scipy import ndimage

from flatfsc_jax.cli import prepare as prepare_cli
from flatfsc_jax.data import benchmarks, sources
from flatfsc_jax.data import meta_dataset as md
from flatfsc_jax.data.sources import SPLITS, MissingDataError

TFDS_DIR = os.path.dirname(tfds.__file__)
HAS_TF = importlib.util.find_spec("tensorflow") is not None


def _load(source, split, data_dir, **kwargs):
    return benchmarks.load_split("meta_dataset", source, split, data_dir, **kwargs)


# Meta-Dataset (+ the test-only v2 sources).
EXPECTED_COUNTS = {
    "ilsvrc_2012": (712, 158, 130),
    "omniglot": (883, 81, 659),
    "aircraft": (70, 15, 15),
    "cu_birds": (140, 30, 30),
    "dtd": (33, 7, 7),
    "quickdraw": (241, 52, 52),
    "fungi": (994, 200, 200),
    "vgg_flower": (71, 15, 16),
    "traffic_sign": (0, 0, 43),
    "mscoco": (0, 40, 40),
    "mnist": (0, 0, 10),
    "cifar10": (0, 0, 10),
    "cifar100": (0, 0, 100),
}


def _png(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------
# Shipped class splits
# ----------------------------------------------------------------------------------------


def test_registry_partitions_sources():
    assert len(md.SEEN_SOURCES) == 8 and len(md.UNSEEN_SOURCES) == 5
    assert set(md.SEEN_SOURCES).isdisjoint(md.UNSEEN_SOURCES)
    assert set(md.SOURCES) == set(md.ALL_SOURCES) == set(EXPECTED_COUNTS)
    assert md.SOURCES["fungi"].catalogue is None
    assert md.SOURCES["ilsvrc_2012"].catalogue.manual_download
    assert md.SOURCES["aircraft"].catalogue.name == "visual_domain_decathlon/aircraft"
    assert md.SOURCES["traffic_sign"].catalogue.name == "visual_domain_decathlon/gtsrb"
    assert md.SOURCES["omniglot"].invert and not md.SOURCES["dtd"].invert


@pytest.mark.parametrize("source", md.ALL_SOURCES)
def test_shipped_split_counts_and_disjointness(source):
    splits = md.load_class_splits(source)
    assert tuple(splits.num_classes(s) for s in SPLITS) == EXPECTED_COUNTS[source]
    names = [n for s in SPLITS for n in splits.classes[s]]
    assert len(names) == len(set(names)), "a class is listed twice"
    assert all(isinstance(n, str) and n for n in names)


@pytest.mark.parametrize("source", ["aircraft", "cu_birds", "dtd", "quickdraw", "fungi"])
def test_random_splits_have_sorted_valid_and_test(source):
    # Meta-Dataset's split generator returns sorted valid/test indices into sorted names.
    splits = md.load_class_splits(source)
    for split in ("valid", "test"):
        assert list(splits.classes[split]) == sorted(splits.classes[split])


@pytest.mark.parametrize(
    ("source", "digits", "ids"),
    [
        ("fungi", 4, range(0, 1394)),
        ("cu_birds", 3, range(1, 201)),
        ("vgg_flower", 3, range(1, 103)),
        ("traffic_sign", 2, range(0, 43)),
    ],
)
def test_numbered_class_names_cover_every_id_once(source, digits, ids):
    splits = md.load_class_splits(source)
    numbers = sorted(int(n[:digits]) for s in SPLITS for n in splits.classes[s])
    assert numbers == list(ids)
    assert all(n[digits] == "." for s in SPLITS for n in splits.classes[s])


def test_fungi_names_keep_trailing_spaces_verbatim():
    names = set(md.load_class_splits("fungi").classes["test"])
    assert "0871.Pluteus umbrosus var. umbrosus " in names
    assert "0871.Pluteus umbrosus var. umbrosus" not in names


def test_shipped_lists_match_the_catalogue_label_files():
    def union(source):
        splits = md.load_class_splits(source)
        return {n for s in SPLITS for n in splits.classes[s]}

    with open(os.path.join(TFDS_DIR, "datasets/imagenet2012/labels.txt")) as f:
        assert union("ilsvrc_2012") == set(f.read().split())
    with open(os.path.join(TFDS_DIR, "datasets/quickdraw_bitmap/labels.txt")) as f:
        assert union("quickdraw") == set(f.read().splitlines())
    with open(os.path.join(TFDS_DIR, "image_classification/dtd_key_attributes.txt")) as f:
        assert union("dtd") == set(f.read().split())
    from tensorflow_datasets.datasets.oxford_flowers102 import (
        oxford_flowers102_dataset_builder as flowers,
    )

    for name in union("vgg_flower"):  # "<label + 1>.<TFDS label name>"
        assert flowers._NAMES[int(name[:3]) - 1] == name[4:]


def test_ilsvrc_splits_and_skip_files():
    splits = md.load_class_splits("ilsvrc_2012")
    assert splits.classes["train"][0] == "n01440764" and splits.classes["train"][-1] == "n15075141"
    assert "n02085620" in splits.classes["valid"]  # Chihuahua: a carnivore
    assert "n03180011" in splits.classes["test"]  # desktop computer: a device
    assert list(splits.classes["train"]) == sorted(splits.classes["train"])
    # The shipped split holds only the 43 CUB duplicates it always had; MD's three lists
    # are read from the user's checkout (--md_duplicates_dir, test_md_sources.py).
    assert len(splits.skip_files) == 43
    classes = {c for s in SPLITS for c in splits.classes[s]}
    assert all(f.split("_")[0] in classes and f.endswith(".JPEG") for f in splits.skip_files)


def test_omniglot_split_rule_and_groups():
    splits = md.load_class_splits("omniglot")
    with md.asset_path("omniglot").open() as f:
        alphabets = json.load(f)["alphabets"]
    sizes = {name: n for s in SPLITS for name, n in alphabets[s]}
    assert [len(alphabets[s]) for s in SPLITS] == [25, 5, 20]
    background = [a for s in ("train", "valid") for a, _ in alphabets[s]]
    smallest5 = sorted(background, key=lambda a: sizes[a])[:5]
    assert {a for a, _ in alphabets["valid"]} == set(smallest5)
    assert sorted(sizes[a] for a in smallest5) == [14, 14, 16, 17, 20]
    for split in SPLITS:
        for name, group in zip(splits.classes[split], splits.groups[split], strict=True):
            assert name.rsplit("-character", 1)[0] == group
    meta = splits.metadata()
    assert len(meta["group_names"]) == 50
    train_groups = np.asarray(meta["class_groups"]["train"])
    assert np.all(np.diff(train_groups) >= 0) and len(set(train_groups)) == 25
    assert set(meta["class_groups"]["test"]).isdisjoint(train_groups)


# ----------------------------------------------------------------------------------------
# Pure image conversion
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(28, 28), (105, 90), (200, 300), (84, 84), (1, 7), (3, 1)])
def test_resize_matches_scipy_bilinear_with_aligned_corners(shape):
    rng = np.random.default_rng(sum(shape))
    image = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
    out = md.resize_bilinear(image, 84)
    assert out.shape == (84, 84, 3) and out.dtype == np.uint8
    rows = np.linspace(0, shape[0] - 1, 84)
    cols = np.linspace(0, shape[1] - 1, 84)
    grid = np.meshgrid(rows, cols, indexing="ij")
    reference = np.stack(
        [
            ndimage.map_coordinates(image[..., c].astype(np.float64), grid, order=1)
            for c in range(3)
        ],
        axis=-1,
    )
    difference = np.abs(out.astype(np.int64) - np.rint(reference).astype(np.int64))
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3  # only x.5 ties
    assert np.array_equal(out[0, 0], image[0, 0])  # corners are aligned
    assert np.array_equal(out[-1, -1], image[-1, -1])


def test_resize_is_not_half_pixel_centred():
    ramp = np.tile(np.arange(0, 256, 85, dtype=np.uint8)[None, :, None], (4, 1, 3))  # 0..255
    out = md.resize_bilinear(ramp, 7)
    # aligned corners: 4 samples -> 7 samples hits the ends exactly and halves in between
    assert out[0, :, 0].tolist() == [0, 42, 85, 128, 170, 212, 255]


def test_to_rgb_handles_gray_alpha_and_bool():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for image in (gray, gray[..., None], np.stack([gray, gray + 1], -1)):
        out = md.to_rgb(image)
        assert out.shape == (3, 4, 3) and np.all(out == gray[..., None])
    rgba = np.random.default_rng(0).integers(0, 256, (2, 3, 4), dtype=np.uint8)
    assert np.array_equal(md.to_rgb(rgba), rgba[..., :3])
    assert md.to_rgb(np.array([[True, False]])).tolist() == [[[255] * 3, [0] * 3]]
    with pytest.raises(ValueError, match="uint8"):
        md.to_rgb(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="shape"):
        md.to_rgb(np.zeros((2, 2, 5), np.uint8))


def test_standardize_inverts_before_resizing():
    image = np.zeros((10, 10), np.uint8)
    image[:5] = 200
    out = md.standardize_image(image, invert=True)
    assert out.shape == (84, 84, 3)
    assert np.all(out[0] == 55) and np.all(out[-1] == 255)


def test_crop_matches_pil():
    image = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    for box in [(2, 3, 10, 17), (0, 0, 30, 20), (25, 15, 40, 26), (-3, -2, 5, 4)]:
        expected = np.asarray(Image.fromarray(image).crop(box))
        assert np.array_equal(md.crop(image, box), expected), box
    with pytest.raises(ValueError, match="empty"):
        md.crop(image, (5, 5, 5, 9))


def test_coco_crop_box_follows_meta_dataset():
    # x = 10.3 - 0.1 * 30.2 = 7.28, w = 36.24; y = 20.7 - 0.1 * 40.1 = 16.69, h = 48.12
    assert md.coco_crop_box((10.3, 20.7, 30.2, 40.1), 100, 80) == (7, 16, 44, 65)
    # Python's round-half-to-even: round(86.5) == 86 (round-half-up would give 87)
    assert md.coco_crop_box((87.0, 10.0, 5.0, 5.0), 200, 200, scale=1.0)[0] == 86
    assert md.coco_crop_box((90.0, 70.0, 20.0, 20.0), 100, 80)[2:] == (100, 80)  # clamped
    assert md.coco_crop_box((150.0, 10.0, 5.0, 5.0), 100, 80) is None  # outside: skipped


# ----------------------------------------------------------------------------------------
# Pure split conversion
# ----------------------------------------------------------------------------------------


def _tiny_splits():
    """A 3/2/1-class split made of real aircraft class names."""
    shipped = md.load_class_splits("aircraft")
    return md.ClassSplits(
        "aircraft",
        {
            "train": shipped.classes["train"][:3],
            "valid": shipped.classes["valid"][:2],
            "test": shipped.classes["test"][:1],
        },
    )


def test_convert_split_assigns_dense_local_labels():
    splits = _tiny_splits()
    rng = np.random.default_rng(0)
    examples = []
    for split in SPLITS:
        for label, name in enumerate(splits.classes[split]):
            for k in range(label + 1):  # class i has i + 1 images; sizes vary
                h, w = rng.integers(5, 120, 2)
                value = 10 * label + k
                image = np.full((h, w, 3) if k % 2 else (h, w), value, np.uint8)
                examples.append((image if k % 2 else (lambda im=image: im), name))
    rng.shuffle(examples)
    for split in SPLITS:
        records = list(md.convert_split(examples, splits, split))
        labels = [r["label"] for _, r in records]
        assert sorted(set(labels)) == list(range(splits.num_classes(split)))
        assert np.bincount(labels).tolist() == [i + 1 for i in range(splits.num_classes(split))]
        assert len({key for key, _ in records}) == len(records)
        for _, r in records:
            assert r["image"].shape == (84, 84, 3) and r["image"].dtype == np.uint8
            assert r["image"][0, 0, 0] // 10 == r["label"]  # image stayed with its label


def test_convert_split_is_strict():
    splits = _tiny_splits()
    image = np.zeros((4, 4, 3), np.uint8)
    complete = [(image, n) for s in SPLITS for n in splits.classes[s]]
    with pytest.raises(ValueError, match="not in the shipped class splits"):
        list(md.convert_split(complete + [(image, "Boeing 999")], splits, "train"))
    with pytest.raises(ValueError, match="got no images"):
        list(md.convert_split(complete[1:], splits, "train"))
    with pytest.raises(ValueError, match="split="):
        list(md.convert_split(complete, splits, "validation"))
    no_test = md.ClassSplits("x", {"train": ("a",), "valid": (), "test": ()})
    with pytest.raises(ValueError, match="no 'test' classes"):
        list(md.convert_split([(image, "a")], no_test, "test"))


def test_convert_split_never_decodes_other_splits_and_caps_classes():
    splits = _tiny_splits()

    def boom():
        raise AssertionError("decoded an example of another split")

    examples = [(boom, n) for n in splits.classes["valid"] + splits.classes["test"]]
    images = [np.full((6, 6, 3), k, np.uint8) for k in range(5)]
    examples += [(im, n) for n in splits.classes["train"] for im in images]
    examples.append((lambda: None, splits.classes["train"][0]))  # a dropped (empty) crop
    records = list(md.convert_split(examples, splits, "train", max_images_per_class=2))
    assert np.bincount([r["label"] for _, r in records]).tolist() == [2, 2, 2]
    assert {int(r["image"][0, 0, 0]) for _, r in records} == {0, 1}  # the first two


def test_convert_split_checks_groups():
    shipped = md.load_class_splits("omniglot")
    name, group = shipped.classes["train"][0], shipped.groups["train"][0]
    image = np.zeros((5, 5), np.uint8)
    with pytest.raises(ValueError, match="has group"):
        list(md.convert_split([(image, name, "Latin")], shipped, "train"))
    assert group != "Latin"


# ----------------------------------------------------------------------------------------
# Catalogue record extraction (the TF-free part) and original archive readers
# ----------------------------------------------------------------------------------------


def test_catalogue_extractors_build_meta_dataset_class_names():
    png = _png(np.full((7, 5), 9))
    omniglot = md.catalogue_extractor("omniglot", alphabet_names=["Arcadian", "Tagalog"])
    [(image, name, group)] = omniglot({"image": png, "alphabet": 1, "alphabet_char_id": 4})
    assert (name, group) == ("Tagalog-character05", "Tagalog")
    assert image().shape == (7, 5) and image().max() == 9

    birds = md.catalogue_extractor("cu_birds")
    assert birds({"image": png, "label": 13})[0][1] == "014.Indigo_Bunting"
    flowers = md.catalogue_extractor("vgg_flower")
    assert flowers({"image": png, "label": 89})[0][1] == "090.canna lily"
    signs = md.catalogue_extractor("traffic_sign")
    assert signs({"image": png, "label": 14})[0][1] == "14.Stop"

    wnids = ["n01440764", "n01531178"]
    imagenet = md.catalogue_extractor("ilsvrc_2012", label_names=wnids)
    assert imagenet({"image": png, "label": 1, "file_name": b"n01531178_12730.JPEG"}) == []
    [(_, wnid)] = imagenet({"image": png, "label": 1, "file_name": b"n01531178_1.JPEG"})
    assert wnid == "n01531178"

    photo = np.random.default_rng(0).integers(0, 256, (80, 100, 3), dtype=np.uint8)
    coco = md.catalogue_extractor("mscoco", label_names=["person", "cat"])
    boxes = np.array([[20.7 / 80, 10.3 / 100, 60.8 / 80, 40.5 / 100], [0.5, 1.5, 0.6, 1.6]])
    record = {"image": _png(photo), "objects": {"bbox": boxes, "label": np.array([1, 0])}}
    (crop_cat, cat), (crop_outside, person) = coco(record)
    assert (cat, person) == ("cat", "person")
    xmin, ymin, xmax, ymax = md.coco_crop_box((10.3, 20.7, 30.2, 40.1), 100, 80)
    assert np.array_equal(crop_cat(), photo[ymin:ymax, xmin:xmax])
    assert crop_outside() is None


@pytest.mark.skipif(HAS_TF, reason="TensorFlow is installed")
def test_catalogue_iteration_explains_missing_tensorflow(tmp_path):
    with pytest.raises(ImportError, match=r"pip install -e \.\[prepare\]"):
        next(md.catalogue_examples("omniglot", data_dir=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="--source_dirs=fungi="):
        next(md.catalogue_examples("fungi", data_dir=str(tmp_path)))


def test_fungi_reader_reads_the_fgvcx_layout(tmp_path):
    os.makedirs(tmp_path / "images")
    categories = [{"id": 0, "name": "Abortiporus biennis"}, {"id": 871, "name": "P. umbrosus "}]
    parts = {
        "train.json": ([(5, "images/a.png", 871)], categories),
        "val.json": ([(9, "images/b.png", 0)], categories),
    }
    for part, (images, cats) in parts.items():
        data = {
            "categories": cats,
            "images": [{"id": i, "file_name": f} for i, f, _ in images],
            "annotations": [{"image_id": i, "category_id": c} for i, _, c in images],
        }
        (tmp_path / part).write_text(json.dumps(data))
    (tmp_path / "images/a.png").write_bytes(_png(np.full((4, 6, 3), 1)))
    (tmp_path / "images/b.png").write_bytes(_png(np.full((3, 3, 3), 2)))
    examples = list(md.local_examples("fungi", str(tmp_path)))
    assert [name for _, name in examples] == ["0871.P. umbrosus ", "0000.Abortiporus biennis"]
    assert examples[0][0]().shape == (4, 6, 3) and examples[1][0]().max() == 2


def test_aircraft_and_gtsrb_readers_follow_the_original_archives(tmp_path):
    data = tmp_path / "fgvc" / "data"
    os.makedirs(data / "images")
    (data / "images_variant_trainval.txt").write_text("0001 F/A-18\n")
    (data / "images_variant_test.txt").write_text("0002 A340-300\n")
    (data / "images_box.txt").write_text("0001 2 3 10 12\n0002 0 0 5 5\n")
    photo = np.random.default_rng(2).integers(0, 256, (20, 16, 3), dtype=np.uint8)
    for name in ("0001", "0002"):
        (data / "images" / f"{name}.jpg").write_bytes(_png(photo))  # PIL reads by content
    aircraft = dict(
        (name, image) for image, name in md.local_examples("aircraft", str(tmp_path / "fgvc"))
    )
    assert np.array_equal(aircraft["F/A-18"](), photo[3:12, 2:10])

    gtsrb = tmp_path / "GTSRB" / "Final_Training" / "Images"
    for folder in ("00000", "00042"):
        os.makedirs(gtsrb / folder)
        (gtsrb / folder / "x.ppm").write_bytes(_png(photo))
        (gtsrb / folder / f"GT-{folder}.csv").write_text("annotations")
    names = [n for _, n in md.local_examples("traffic_sign", str(tmp_path))]
    assert names == [
        "00.Speed limit (20km/h)",
        "42.End of no passing by vehicles over 3.5 metric tons",
    ]


# ----------------------------------------------------------------------------------------
# Hierarchy
# ----------------------------------------------------------------------------------------

EDGES = [
    ("entity", "animal"),
    ("entity", "artifact"),
    ("animal", "dog"),
    ("animal", "felid"),
    ("felid", "cat"),
    ("dog", "husky"),
    ("dog", "poodle"),
    ("artifact", "device"),
    ("device", "phone"),
    ("device", "robot_dog"),
    ("dog", "robot_dog"),
]


def test_class_hierarchy_matches_brute_force_reachability():
    classes = ["husky", "poodle", "cat", "phone", "robot_dog"]
    children = {}
    for parent, child in EDGES:
        children.setdefault(parent, []).append(child)

    def descendants(node):
        out, stack = set(), [node]
        while stack:
            for child in children.get(stack.pop(), []):
                out.add(child)
                stack.append(child)
        return out

    expected = {
        node: sorted(i for i, c in enumerate(classes) if c in descendants(node))
        for node in children
    }
    assert md.class_hierarchy_from_edges(EDGES, classes) == expected
    assert expected["dog"] == [0, 1, 4] and expected["entity"] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="no parent"):
        md.class_hierarchy_from_edges(EDGES, ["husky", "unicorn"])


def test_hierarchy_files_in_both_formats_agree(tmp_path):
    text = tmp_path / "wordnet.is_a.txt"
    text.write_text("# comment\n" + "".join(f"{p} {c}\n" for p, c in EDGES))
    nodes = {}
    for parent, child in EDGES:
        nodes.setdefault(parent, {"wn_id": parent, "children_ids": []})["children_ids"].append(
            child
        )
    spec = tmp_path / "ilsvrc_2012_dataset_spec.json"
    spec.write_text(json.dumps({"split_subgraphs": {"TRAIN": list(nodes.values())}}))
    assert sorted(md.read_hierarchy_edges(str(text))) == sorted(EDGES)
    assert sorted(md.read_hierarchy_edges(str(spec))) == sorted(EDGES)


# ----------------------------------------------------------------------------------------
# Builder round trip and reading
# ----------------------------------------------------------------------------------------


def _dtd_examples():
    """Two images per shipped DTD class; pixel (R, G) = (global class index, 10 or 60)."""
    splits = md.load_class_splits("dtd")
    names = [n for s in SPLITS for n in splits.classes[s]]
    rng = np.random.default_rng(3)
    for index, name in enumerate(names):
        for k in range(2):
            h, w = rng.integers(20, 150, 2)
            image = np.empty((h, w, 3), np.uint8)
            image[...] = (index, 10 + 50 * k, 200)
            yield image, name


@pytest.fixture(scope="module")
def dtd_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    md.prepare("dtd", data_dir, examples_fn=_dtd_examples)
    return data_dir


def test_round_trip_images_labels_and_class_names(dtd_dir):
    shipped = md.load_class_splits("dtd")
    all_names = [n for s in SPLITS for n in shipped.classes[s]]
    seen_names = set()
    for split in SPLITS:
        data = _load("dtd", split, dtd_dir)
        assert data.source == "meta_dataset/dtd" and data.split == split
        assert list(data.class_names) == list(shipped.classes[split])
        assert data.class_counts().tolist() == [2] * shipped.num_classes(split)
        assert data.labels.dtype == np.int32 and len(data) == 2 * shipped.num_classes(split)
        images = data.get_images(np.arange(len(data)))
        assert images.shape == (len(data), 84, 84, 3) and images.dtype == np.uint8
        assert data.image_shape == (84, 84, 3)
        for image, label in zip(images, data.labels, strict=True):
            assert all_names[image[0, 0, 0]] == data.class_names[label]
            assert image[0, 0, 1] in (10, 60) and np.all(image == image[0, 0])
        assert sorted(np.unique(images[:, 0, 0, 1])) == [10, 60]
        assert seen_names.isdisjoint(data.class_names)
        seen_names |= set(data.class_names)
    assert seen_names == set(all_names)


def test_load_in_memory_equals_lazy(dtd_dir):
    lazy = _load("dtd", "valid", dtd_dir)
    eager = _load("dtd", "valid", dtd_dir, in_memory=True)
    assert isinstance(eager.images, np.ndarray) and not isinstance(lazy.images, np.ndarray)
    np.testing.assert_array_equal(eager.labels, lazy.labels)
    np.testing.assert_array_equal(eager.images, lazy.get_images(np.arange(len(lazy))))


def test_lazy_split_pickles_for_worker_processes(dtd_dir):
    lazy = _load("dtd", "train", dtd_dir)
    clone = pickle.loads(pickle.dumps(lazy))
    indices = np.array([5, 0, 17])
    np.testing.assert_array_equal(clone.get_images(indices), lazy.get_images(indices))
    np.testing.assert_array_equal(clone.labels, lazy.labels)


def test_labels_are_cached_and_a_stale_cache_is_ignored(dtd_dir, monkeypatch):
    path = sources.prepared_dir(dtd_dir, md.BUILDER_NAME, "dtd")
    cache = os.path.join(str(path), "labels", "test.npy")
    reference = _load("dtd", "test", dtd_dir).labels
    np.testing.assert_array_equal(np.load(cache), reference)

    builder_cls = tfds.core.read_only_builder.ReadOnlyBuilder
    real = builder_cls.as_data_source

    def images_only(self, split, decoders=None, **kwargs):
        if decoders:  # label reading is the only use of decoders (SkipDecoding)
            raise AssertionError("labels were re-read although cached")
        return real(self, split, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(builder_cls, "as_data_source", images_only)
        np.testing.assert_array_equal(_load("dtd", "test", dtd_dir).labels, reference)
    np.save(cache, np.zeros(3, np.int32))  # wrong length: recomputed and rewritten
    np.testing.assert_array_equal(_load("dtd", "test", dtd_dir).labels, reference)
    np.testing.assert_array_equal(np.load(cache), reference)


def test_omniglot_groups_inversion_and_hierarchy_round_trip(tmp_path):
    shipped = md.load_class_splits("omniglot")
    pick = {"train": ["Anglo-Saxon_Futhorc", "Arcadian"], "valid": ["Tagalog"], "test": ["ULOG"]}
    classes, groups = {}, {}
    for split, alphabets in pick.items():
        chosen = [
            (n, g)
            for n, g in zip(shipped.classes[split], shipped.groups[split], strict=True)
            if g in alphabets and n.endswith(("01", "02"))
        ]
        classes[split] = tuple(n for n, _ in chosen)
        groups[split] = tuple(g for _, g in chosen)
    subset = md.ClassSplits("omniglot", classes, groups)

    def examples():
        for split in SPLITS:
            for name, group in zip(classes[split], groups[split], strict=True):
                strokes = np.ones((105, 105), bool)  # white paper ...
                strokes[40:60, 40:60] = False  # ... with a black stroke
                yield strokes, name, group

    hierarchy = tmp_path / "is_a.txt"
    hierarchy.write_text(
        "".join(
            f"{g} {n}\nscript {g}\n"
            for s in SPLITS
            for n, g in zip(classes[s], groups[s], strict=True)
        )
    )
    data_dir = str(tmp_path / "tfds")
    md.prepare(
        "omniglot",
        data_dir,
        examples_fn=examples,
        class_splits=subset,
        hierarchy_file=str(hierarchy),
    )
    train = _load("omniglot", "train", data_dir, class_splits=subset)
    assert list(train.class_names) == list(classes["train"])
    assert train.class_groups.tolist() == [0, 0, 1, 1]
    valid = _load("omniglot", "valid", data_dir, class_splits=subset)
    assert valid.class_groups.tolist() == [2, 2]
    image = train.get_images([0])[0]
    assert image[0, 0, 0] == 0 and image[40, 40, 0] == 255  # inverted like Meta-Dataset
    assert {k: v.tolist() for k, v in train.class_hierarchy.items()} == {
        "Anglo-Saxon_Futhorc": [0, 1],
        "Arcadian": [2, 3],
        "script": [0, 1, 2, 3],
    }
    with pytest.raises(ValueError, match="prepared with other train classes"):
        _load("omniglot", "train", data_dir)  # the shipped lists differ


# ----------------------------------------------------------------------------------------
# Errors: unknown names, missing data, corruption
# ----------------------------------------------------------------------------------------


def test_unknown_sources_and_splits(dtd_dir):
    with pytest.raises(ValueError, match="unknown.*ilsvrc_2012"):
        _load("imagenet", "train", dtd_dir)
    with pytest.raises(ValueError, match="split='validation'"):
        _load("dtd", "validation", dtd_dir)
    with pytest.raises(ValueError, match="no 'train' classes"):
        _load("traffic_sign", "train", dtd_dir)
    with pytest.raises(ValueError, match="'funghi' is unknown.*'fungi'"):
        _load("funghi", "train", dtd_dir)
    with pytest.raises(ValueError, match="benchmark='imagenet' is unknown"):
        benchmarks.load_split("imagenet", "train", "train", dtd_dir)
    with pytest.raises(ValueError, match="unknown"):
        md.missing_sources(["dtd", "mnist_m"], dtd_dir)


def test_load_split_dispatches_glyphs_lazily(monkeypatch):
    calls = []
    fake = types.ModuleType("flatfsc_jax.data.glyphs")
    fake.load_split = lambda domain, split, data_dir: calls.append((domain, split, data_dir))
    monkeypatch.setitem(sys.modules, "flatfsc_jax.data.glyphs", fake)
    import flatfsc_jax.data as data_pkg

    monkeypatch.setattr(data_pkg, "glyphs", fake, raising=False)
    benchmarks.load_split("glyphs", "latin", "test", "/data")
    assert calls == [("latin", "test", "/data")]


def test_missing_and_require_sources_name_everything(dtd_dir, tmp_path):
    wanted = ["dtd", "omniglot", "meta_dataset/fungi", "ilsvrc_2012", "omniglot"]
    assert md.missing_sources(wanted, dtd_dir) == ["omniglot", "fungi", "ilsvrc_2012"]
    assert md.missing_sources(["dtd"], dtd_dir) == []
    md.require_sources(["dtd"], dtd_dir)
    with pytest.raises(MissingDataError) as error:
        md.require_sources(wanted, dtd_dir)
    message = str(error.value)
    assert "omniglot, fungi, ilsvrc_2012" in message and "dtd," not in message
    command = (
        f"python -m flatfsc_jax.cli.prepare --sources=omniglot,fungi,ilsvrc_2012 "
        f"--data_dir={dtd_dir} --manual_dir="
    )
    assert command in message
    assert "--source_dirs=fungi=" in message and "pip install -e .[prepare]" in message
    with pytest.raises(MissingDataError, match="--sources=mnist"):
        _load("mnist", "test", str(tmp_path))
    assert isinstance(error.value, FileNotFoundError)


def test_corrupted_directory_gives_a_clear_error_never_an_empty_split(tmp_path):
    data_dir = str(tmp_path)
    md.prepare("dtd", data_dir, examples_fn=_dtd_examples)  # caches labels too
    path = str(sources.prepared_dir(data_dir, md.BUILDER_NAME, "dtd"))
    [train_file] = glob.glob(os.path.join(path, "*-train.array_record-*"))
    with open(train_file, "rb") as f:
        content = f.read()
    with open(train_file, "wb") as f:
        f.write(content[: len(content) // 2])
    with pytest.raises(MissingDataError, match="corrupted.*prepare it again"):
        _load("dtd", "train", data_dir)
    os.remove(os.path.join(path, "labels", "train.npy"))
    with pytest.raises(MissingDataError, match="corrupted"):
        _load("dtd", "train", data_dir)
    assert len(_load("dtd", "valid", data_dir)) == 14  # other splits still fine
    [test_file] = glob.glob(os.path.join(path, "*-test.array_record-*"))
    os.remove(test_file)  # metadata says 14 images, the file is gone: an error, not []
    with pytest.raises(MissingDataError, match=r"-test\.array_record-.* is missing in .* again"):
        _load("dtd", "test", data_dir)
    with open(os.path.join(path, "features.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(MissingDataError, match=r"features\.json in .* is missing or unreadable"):
        _load("dtd", "valid", data_dir)


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------


def test_cli_prepares_from_class_folders_and_lists_status(tmp_path, capsys):
    folders = tmp_path / "dtd_original"
    shipped = md.load_class_splits("dtd")
    for i, name in enumerate(n for s in SPLITS for n in shipped.classes[s]):
        os.makedirs(folders / name)
        (folders / name / f"{name}_0001.jpg").write_bytes(_png(np.full((30, 40, 3), i)))
    (folders / "waffled" / ".directory").write_text("not an image")  # as in the DTD archive
    data_dir = str(tmp_path / "tfds")
    args = [f"--data_dir={data_dir}", f"--source_dirs=dtd={folders}"]
    assert prepare_cli.run(["--sources=dtd"] + args) == 0
    assert _load("dtd", "train", data_dir).class_counts().tolist() == [1] * 33
    capsys.readouterr()
    assert prepare_cli.run(["--list", f"--data_dir={data_dir}"]) == 0
    listing = capsys.readouterr().out
    [dtd_line] = [line for line in listing.splitlines() if line.strip().startswith("dtd ")]
    assert " yes " in dtd_line and "33/33" in dtd_line and "7/7" in dtd_line
    [fungi_line] = [line for line in listing.splitlines() if line.strip().startswith("fungi ")]
    assert " no " in fungi_line and "--source_dirs" in fungi_line


def test_cli_rejects_unknown_sources_and_reports_failures(tmp_path, capsys):
    with pytest.raises(app.UsageError, match="unknown source 'imagenet'"):
        prepare_cli.run(["--sources=dtd,imagenet", f"--data_dir={tmp_path}"])
    assert prepare_cli.parse_sources("unseen,mnist") == list(md.UNSEEN_SOURCES)
    assert prepare_cli.parse_source_dirs("fungi=~/f") == {"fungi": os.path.expanduser("~/f")}
    with pytest.raises(ValueError, match="<source>=<directory>"):
        prepare_cli.parse_source_dirs("fungi")
    assert prepare_cli.run(["--sources=fungi", f"--data_dir={tmp_path}"]) == 1
    assert "--source_dirs=fungi=" in capsys.readouterr().err
    if not HAS_TF:
        assert prepare_cli.run(["--sources=mnist", f"--data_dir={tmp_path}"]) == 1
        assert "pip install -e .[prepare]" in capsys.readouterr().err
