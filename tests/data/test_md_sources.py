"""Meta-Dataset fidelity of the sources: ImageNet's sampling graph, resize rules, MD's JPEG
re-encoding, ImageNet de-duplication, and the raw layouts of MD's conversion guide.

References are independent of the code under test: the ImageNet graph is re-read from the
shipped JSON with plain reachability, the small DAG's graphs are written out by hand,
Lanczos is a numpy transcription of PIL's resampling, JPEG goes through PIL directly.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from flatfsc_jax.data import meta_dataset as md
from flatfsc_jax.data.episodes import EpisodeSampler, EpisodeSpec
from flatfsc_jax.data.meta_dataset import hierarchy
from flatfsc_jax.data.sources import SPLITS, SplitData

ASSETS = os.path.join(os.path.dirname(md.__file__), "..", "assets", "meta_dataset_md")


def _spec():
    with open(os.path.join(ASSETS, "ilsvrc_2012_dataset_spec.json"), encoding="utf-8") as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------
# ImageNet's sampling graph
# ----------------------------------------------------------------------------------------


def _eligible_by_hand(spec, split_key, lo=5, hi=392):
    """Plain reading of the JSON: for each internal node, the leaves reachable from it."""
    nodes = {n["wn_id"]: n["children_ids"] for n in spec["split_subgraphs"][split_key]}
    leaves = {c for kids in nodes.values() for c in kids if not nodes.get(c)}

    def below(node):
        seen, stack = set(), [node]
        while stack:
            for child in nodes.get(stack.pop(), []):
                if child not in seen:
                    seen.add(child)
                    stack.append(child)
        return seen & leaves

    return {n: below(n) for n, kids in nodes.items() if kids and lo <= len(below(n)) <= hi}


def test_shipped_spec_gives_md_eligible_nodes_113_18_15():
    splits = md.load_class_splits("ilsvrc_2012")
    tree = md.class_hierarchy_for("ilsvrc_2012", splits)
    counts = {s: len(md.eligible_nodes(tree[s])) for s in SPLITS}
    assert counts == {"train": 113, "valid": 18, "test": 15}
    spec = _spec()
    for split, key in (("train", "TRAIN"), ("valid", "VALID"), ("test", "TEST")):
        by_hand = _eligible_by_hand(spec, key)
        names = splits.classes[split]
        ours = {n: {names[i] for i in tree[split][n]} for n in md.eligible_nodes(tree[split])}
        assert ours == by_hand
        # one node spans the whole split (the root), as in MD
        assert sum(len(v) == len(names) for v in tree[split].values()) == 1
    assert tree["valid"]["n02075296"] == list(range(158))  # carnivore: all valid classes
    assert tree["test"]["n03183080"] == list(range(130))  # device: all test classes


def _expanded_is_a(spec):
    """A WordNet-like relation whose MD trimming must give back MD's graphs: the union of
    the split graphs, with single-child chains inserted and ancestors above the roots."""
    edges = set()
    for nodes in spec["split_subgraphs"].values():
        for n in nodes:
            edges |= {(n["wn_id"], c) for c in n["children_ids"]}
    expanded = set()
    for k, (parent, child) in enumerate(sorted(edges)):
        if k % 3 == 0:  # parent -> chain -> child: chain has one child, MD removes it
            expanded |= {(parent, f"chain{k}"), (f"chain{k}", child)}
        else:
            expanded.add((parent, child))
    train_roots = sorted(
        n["wn_id"] for n in spec["split_subgraphs"]["TRAIN"] if not n["parents_ids"]
    )
    expanded |= {("placental", "n02075296"), ("placental", "n03183080")}
    expanded |= {("entity", "placental"), ("top", "entity")}  # top: a one-child chain
    expanded |= {("entity", r) for r in train_roots}
    return sorted(expanded)


def test_is_a_relation_trimmed_by_md_rules_gives_md_graphs(tmp_path):
    spec = _spec()
    splits = md.load_class_splits("ilsvrc_2012")
    edges = _expanded_is_a(spec)
    graphs = md.md_split_graphs(edges, splits.classes, md.MD_SPLIT_ROOTS)
    stored = md.spec_split_graphs(spec)
    for split in SPLITS:
        assert {n: sorted(set(k)) for n, k in graphs[split].items()} == {
            n: sorted(k) for n, k in stored[split].items()
        }
    # Through a file, as prepare reads it.
    tree = md.class_hierarchy_for("ilsvrc_2012", splits)
    is_a = tmp_path / "wordnet.is_a.txt"
    is_a.write_text("".join(f"{p} {c}\n" for p, c in edges))
    assert md.load_class_hierarchy(str(is_a), splits) == tree
    # Keeping every ancestor (the raw relation) adds nodes spanning the whole split.
    raw = md.class_hierarchy_from_edges(edges, splits.classes["test"])
    whole = [n for n, v in raw.items() if len(v) == 130]
    assert len(md.eligible_nodes(raw)) > 15 and {"placental", "entity", "top"} <= set(whole)


SMALL_DAG = [
    ("entity", "animal"),
    ("entity", "artifact"),
    ("animal", "carnivore"),
    ("animal", "bird"),
    ("bird", "sparrow"),
    ("bird", "robin"),
    ("carnivore", "dog"),
    ("carnivore", "feline_chain"),
    ("carnivore", "wild"),
    ("feline_chain", "felid"),
    ("felid", "lion"),
    ("felid", "tiger"),
    ("dog", "husky"),
    ("dog", "poodle"),
    ("dog", "wolfdog"),
    ("wild", "wolfdog"),
    ("artifact", "device"),
    ("artifact", "toy"),
    ("device", "phone"),
    ("device", "radio"),
    ("toy", "robot"),
    ("toy", "ball"),
]
SMALL_CLASSES = {
    "train": ["sparrow", "robin", "robot", "ball"],
    "valid": ["husky", "poodle", "wolfdog", "lion", "tiger"],
    "test": ["phone", "radio"],
}


def test_md_rules_on_a_small_dag():
    graphs = md.md_split_graphs(SMALL_DAG, SMALL_CLASSES, {"valid": "carnivore", "test": "device"})
    leaves = lambda names: {n: [] for n in names}  # noqa: E731
    # Worked by hand: train drops the one-child animal/artifact; valid keeps only the
    # carnivore subtree, with feline_chain and wild collapsed; test is device alone.
    assert {n: sorted(k) for n, k in graphs["train"].items()} == {
        "entity": ["bird", "toy"],
        "bird": ["robin", "sparrow"],
        "toy": ["ball", "robot"],
        **leaves(SMALL_CLASSES["train"]),
    }
    assert {n: sorted(k) for n, k in graphs["valid"].items()} == {
        "carnivore": ["dog", "felid", "wolfdog"],
        "dog": ["husky", "poodle", "wolfdog"],
        "felid": ["lion", "tiger"],
        **leaves(SMALL_CLASSES["valid"]),
    }
    assert {n: sorted(k) for n, k in graphs["test"].items()} == {
        "device": ["phone", "radio"],
        **leaves(SMALL_CLASSES["test"]),
    }
    valid = md.class_hierarchy_from_graph(graphs["valid"], SMALL_CLASSES["valid"])
    assert valid == {"carnivore": [0, 1, 2, 3, 4], "dog": [0, 1, 2], "felid": [3, 4]}
    raw = md.class_hierarchy_from_edges(SMALL_DAG, SMALL_CLASSES["valid"])
    assert raw["wild"] == [2] and raw["entity"] == [0, 1, 2, 3, 4]  # what MD removes
    # MD counts a child attached twice (p -> n -> c and p -> c) as two children.
    assert hierarchy.collapse({"p": ["c", "n"], "n": ["c"], "c": []}) == {
        "p": ["c", "c"],
        "c": [],
    }
    with pytest.raises(ValueError, match="split root 'nowhere'"):
        md.md_split_graphs(SMALL_DAG, SMALL_CLASSES, {"valid": "nowhere"})
    with pytest.raises(ValueError, match="not leaves"):
        md.class_hierarchy_from_graph(graphs["valid"], ["husky", "dog"])


def _imagenet_split(split, tree=None, per_class=4):
    classes = md.load_class_splits("ilsvrc_2012").classes[split]
    labels = np.repeat(np.arange(len(classes)), per_class)
    return SplitData(
        source="meta_dataset/ilsvrc_2012",
        split=split,
        images=np.zeros((len(labels), 1, 1, 3), np.uint8),
        labels=labels,
        class_names=list(classes),
        class_hierarchy=None if tree is None else {k: np.asarray(v) for k, v in tree.items()},
    )


def test_imagenet_episodes_follow_the_graph_and_refuse_to_run_without_it():
    splits = md.load_class_splits("ilsvrc_2012")
    tree = md.class_hierarchy_for("ilsvrc_2012", splits)["test"]
    sampler = EpisodeSampler(_imagenet_split("test", tree), EpisodeSpec(), seed=0)
    assert sampler.kind == "hierarchy"
    pools = [set(tree[n]) for n in md.eligible_nodes(tree)]
    for episode in sampler.sample(20):
        classes = set(episode.classes.tolist())
        assert any(classes <= p and len(classes) == min(len(p), 50) for p in pools)

    for split in ("valid", "test"):
        with pytest.raises(md.MissingHierarchyError, match="ilsvrc_2012_dataset_spec.json"):
            EpisodeSampler(_imagenet_split(split), EpisodeSpec(), seed=0)
    # Allowed: knowingly uniform, fixed-way episodes (MD draws those uniformly), train.
    EpisodeSampler(_imagenet_split("test"), EpisodeSpec(use_hierarchy=False), seed=0)
    EpisodeSampler(_imagenet_split("test"), EpisodeSpec.fixed(5, 1, 2), seed=0)
    EpisodeSampler(_imagenet_split("train"), EpisodeSpec(), seed=0)


# ----------------------------------------------------------------------------------------
# Resize rules and MD's JPEG
# ----------------------------------------------------------------------------------------


def _lanczos_reference(image, size):
    """PIL's Lanczos resampling in float64: horizontal pass, uint8, vertical pass."""

    def kernel(x):
        x = np.asarray(x, np.float64)
        out = np.sinc(x) * np.sinc(x / 3.0)
        return np.where(np.abs(x) < 3.0, out, 0.0)

    def weights(n_in, n_out):
        scale = n_in / n_out
        filterscale = max(scale, 1.0)
        support = 3.0 * filterscale
        rows = np.zeros((n_out, n_in))
        for i in range(n_out):
            center = (i + 0.5) * scale
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), n_in)
            w = kernel((np.arange(lo, hi) - center + 0.5) / filterscale)
            rows[i, lo:hi] = w / w.sum()
        return rows

    x = image.astype(np.float64)
    horizontal = np.clip(np.rint(np.einsum("ow,hwc->hoc", weights(x.shape[1], size), x)), 0, 255)
    out = np.einsum("oh,hwc->owc", weights(x.shape[0], size), horizontal)
    return np.clip(np.rint(out), 0, 255)


def test_resize_rule_per_source_and_lanczos_matches_a_transcription():
    assert {s: md.resize_rule(s) for s in ("mnist", "cifar10", "cifar100")} == dict.fromkeys(
        ("mnist", "cifar10", "cifar100"), md.LANCZOS
    )
    assert all(md.resize_rule(s) == md.BILINEAR for s in md.SEEN_SOURCES + ("mscoco",))
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    ours = md.resize_lanczos(image, 84).astype(np.int64)
    diff = np.abs(ours - _lanczos_reference(image, 84))
    assert diff.max() <= 1 and diff.mean() < 0.05  # PIL computes in fixed point
    assert not np.array_equal(ours, md.resize_bilinear(image, 84))
    # convert_split picks the source's rule: MNIST digits (28x28 gray) -> Lanczos.
    digit = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    splits = md.ClassSplits("mnist", {"train": (), "valid": (), "test": ("0",)})
    (_, record), *_ = md.convert_split([(digit, "0")], splits, "test")
    np.testing.assert_array_equal(record["image"], md.resize_lanczos(np.dstack([digit] * 3), 84))


def _pil_jpeg(rgb, **kwargs):
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", **kwargs)
    return buffer.getvalue()


def test_md_jpeg_option_round_trip():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    # MD calls img.save(buf, format='JPEG'): PIL's defaults, quality 75.
    assert _pil_jpeg(image) == _pil_jpeg(image, quality=75)
    decoded = np.asarray(Image.open(io.BytesIO(_pil_jpeg(image, quality=75))))
    np.testing.assert_array_equal(md.jpeg_round_trip(image), decoded)
    # MD order: JPEG in the records, then the decoder's bilinear resize.
    with_jpeg = md.standardize_image(image, jpeg=True)
    np.testing.assert_array_equal(with_jpeg, md.resize_bilinear(decoded, 84))
    assert np.abs(with_jpeg.astype(int) - md.standardize_image(image).astype(int)).max() > 5
    # CNAPs order for MNIST/CIFAR: Lanczos to 84, then JPEG.
    lanczos = np.asarray(Image.fromarray(image).resize((84, 84), Image.LANCZOS))
    expected = np.asarray(Image.open(io.BytesIO(_pil_jpeg(lanczos, quality=75))))
    np.testing.assert_array_equal(
        md.standardize_image(image, resize=md.LANCZOS, jpeg=True), expected
    )
    # convert_split applies it to the sources MD re-encodes, and only when asked.
    for source, changed in (("quickdraw", True), ("dtd", False)):
        name = md.load_class_splits(source).classes["test"][0]
        splits = md.ClassSplits(source, {"train": (), "valid": (), "test": (name,)})
        (_, plain), *_ = md.convert_split([(image, name)], splits, "test")
        (_, md_like), *_ = md.convert_split([(image, name)], splits, "test", md_jpeg=True)
        assert (not np.array_equal(plain["image"], md_like["image"])) == changed
    with pytest.raises(ValueError, match="resize='bicubic'"):
        md.standardize_image(image, resize="bicubic")


# ----------------------------------------------------------------------------------------
# ImageNet de-duplication, on both paths
# ----------------------------------------------------------------------------------------


def _write_duplicate_lists(directory, lists):
    """MD-format duplicate lists (``synset/file.JPEG  # other file``, comments) in a
    stand-in for MD's meta_dataset/dataset_conversion folder."""
    os.makedirs(directory, exist_ok=True)
    for name, files in lists.items():
        lines = ["# synthetic list in Meta-Dataset's format"]
        lines += [f"{f.split('_')[0]}/{f}  # other/{i}.jpg" for i, f in enumerate(files)]
        with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return str(directory)


def _write_jpeg(path, value=128, size=(6, 5)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full(size + (3,), value, np.uint8)).save(path, format="JPEG")


def test_imagenet_duplicates_read_from_md_checkout_on_catalogue_and_archive_paths(tmp_path):
    wnids = sorted(md.load_class_splits("ilsvrc_2012").classes["train"][:3])
    picks = [f"{w}_{100 + i}.JPEG" for i, w in enumerate(wnids)]  # one per list
    kept = [f"{w}_999999.JPEG" for w in wnids]
    lists = dict(zip(md.IMAGENET_DUPLICATE_LISTS, ([p] for p in picks), strict=True))
    lists[md.IMAGENET_DUPLICATE_LISTS[1]] = [picks[1], picks[0]]  # listed twice
    dup_dir = _write_duplicate_lists(tmp_path / "dataset_conversion", lists)
    assert {n: len(v) for n, v in md.imagenet_duplicates(dup_dir).items()} == {
        "ImageNet_Caltech101_duplicates.txt": 1,
        "ImageNet_Caltech256_duplicates.txt": 2,
        "ImageNet_CUBirds_duplicates.txt": 1,
    }
    shipped = md.load_class_splits("ilsvrc_2012")
    splits = md.with_imagenet_duplicates(shipped, dup_dir)
    assert splits.skip_files == shipped.skip_files | set(picks)

    # Catalogue path: TFDS imagenet2012 records carry the file name.
    extract = md.catalogue_extractor("ilsvrc_2012", label_names=wnids, class_splits=splits)
    records = [
        {"file_name": f.encode(), "image": b"", "label": wnids.index(f.split("_")[0])}
        for f in picks + kept
    ]
    assert [r["file_name"].decode() for r in records if extract(r)] == kept

    # Archive paths: class folders (--source_dirs) and MD's $DATASRC tree.
    datasrc = tmp_path / "datasrc"
    for f in picks + kept:
        _write_jpeg(str(datasrc / "ILSVRC2012_img_train" / f.split("_")[0] / f))
    (datasrc / "ILSVRC2012_img_train" / "n01440764.tar").write_bytes(b"")  # MD's leftovers
    for examples in (
        md.local_examples("ilsvrc_2012", str(datasrc / "ILSVRC2012_img_train"), splits),
        md.md_datasrc_examples("ilsvrc_2012", str(datasrc), splits),
    ):
        assert sorted(n for _, n in examples) == wnids  # one kept image per class


def test_imagenet_without_md_duplicates_dir_stops_naming_the_flag(tmp_path):
    from flatfsc_jax.data.meta_dataset import builder

    message = r"--md_duplicates_dir=.*meta_dataset/dataset_conversion/"
    with pytest.raises(ValueError, match=message):
        builder.prepare("ilsvrc_2012", str(tmp_path), md_datasrc=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="has no ImageNet_Caltech101"):
        md.imagenet_duplicates(str(tmp_path))
    with pytest.raises(ValueError, match=message):
        md.provenance("ilsvrc_2012", "md_datasrc", location="/d")


# ----------------------------------------------------------------------------------------
# MD's raw layouts ($DATASRC)
# ----------------------------------------------------------------------------------------


def _one_class_per_split(source, names_by_split):
    return md.ClassSplits(source, {s: tuple(names_by_split.get(s, ())) for s in SPLITS})


def test_md_datasrc_omniglot_vgg_flower_quickdraw(tmp_path):
    from scipy.io import savemat

    root = tmp_path / "omniglot"
    layout = {
        ("images_background", "Arcadian", "character01"): 2,
        ("images_background", "Tagalog", "character02"): 1,
        ("images_evaluation", "ULOG", "character01"): 1,
    }
    for (part, alphabet, character), n in layout.items():
        folder = root / part / alphabet / character
        folder.mkdir(parents=True)
        for i in range(n):
            strokes = np.ones((105, 105), bool)
            strokes[10:20, 10 + i : 30] = False
            Image.fromarray(strokes).save(folder / f"{i:04d}.png")  # mode "1", as Omniglot
    examples = list(md.md_datasrc_examples("omniglot", str(tmp_path)))
    assert [(n, g) for _, n, g in examples] == [
        ("Arcadian-character01", "Arcadian"),
        ("Arcadian-character01", "Arcadian"),
        ("Tagalog-character02", "Tagalog"),
        ("ULOG-character01", "ULOG"),
    ]
    first = examples[0][0]()
    assert first.shape == (105, 105, 3) and first[15, 15, 0] == 0 and first[0, 0, 0] == 255
    shipped = md.load_class_splits("omniglot")
    assert {n for _, n, _ in examples} <= set(shipped.assignment)

    flowers = tmp_path / "vgg_flower"
    labels = [90, 10, 90]  # 1-based class numbers, one per image_NNNNN.jpg
    for i, label in enumerate(labels):
        _write_jpeg(str(flowers / "jpg" / f"image_{i + 1:05d}.jpg"), value=label)
    savemat(str(flowers / "imagelabels.mat"), {"labels": np.asarray([labels], np.uint8)})
    got = [(n, int(img()[0, 0, 0])) for img, n in md.md_datasrc_examples("vgg_flower", tmp_path)]
    assert [n for n, _ in got] == ["090.canna lily", "010.globe thistle", "090.canna lily"]
    assert [abs(v - label) <= 2 for (_, v), label in zip(got, labels, strict=True)] == [True] * 3

    draw = tmp_path / "quickdraw"
    draw.mkdir()
    bitmaps = {
        c: np.random.default_rng(i).integers(0, 256, (3, 784), np.uint8)
        for i, c in enumerate(["angel", "animal migration"])
    }
    for name, rows in bitmaps.items():
        np.save(draw / f"{name}.npy", rows)
    out = list(md.md_datasrc_examples("quickdraw", str(tmp_path)))
    assert [n for _, n in out] == ["angel"] * 3 + ["animal migration"] * 3
    np.testing.assert_array_equal(out[4][0](), bitmaps["animal migration"][1].reshape(28, 28))
    splits = _one_class_per_split("quickdraw", {"test": ["angel", "animal migration"]})
    records = list(md.convert_split(out, splits, "test"))
    assert [r["label"] for _, r in records] == [0, 0, 0, 1, 1, 1]


def test_md_datasrc_mscoco_crops_objects(tmp_path):
    coco = tmp_path / "mscoco"
    (coco / "train2017").mkdir(parents=True)
    (coco / "annotations").mkdir()
    image = np.arange(40 * 50 * 3, dtype=np.uint32).reshape(40, 50, 3) % 251
    Image.fromarray(image.astype(np.uint8)).save(coco / "train2017" / "000000000007.png")
    os.rename(coco / "train2017" / "000000000007.png", coco / "train2017" / "000000000007.jpg")
    annotations = {
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
        "annotations": [
            {"image_id": 7, "category_id": 18, "bbox": [10.0, 5.0, 20.0, 10.0]},
            {"image_id": 7, "category_id": 1, "bbox": [45.0, 30.0, 10.0, 20.0]},
        ],
    }
    (coco / "annotations" / "instances_train2017.json").write_text(json.dumps(annotations))
    out = list(md.md_datasrc_examples("mscoco", str(tmp_path)))
    assert [n for _, n in out] == ["dog", "person"]
    # By hand, MD's rule: box grown 1.2x about its centre, half-integer -> integer corners.
    # dog: x 8..32, y 4..16 -> (8, 4, 33, 17); person: x 44..56 -> clamped to 50, y 28..50 -> 40.
    np.testing.assert_array_equal(out[0][0](), image[4:17, 8:33].astype(np.uint8))
    np.testing.assert_array_equal(out[1][0](), image[28:40, 44:50].astype(np.uint8))


def test_md_datasrc_mnist_cifar_and_errors(tmp_path):
    rng = np.random.default_rng(2)
    digits = rng.integers(0, 256, (3, 28, 28), np.uint8)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\0" * 16 + digits.tobytes())
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\0" * 8 + bytes([7, 0, 7]))
    out = list(md.md_datasrc_examples("mnist", str(tmp_path)))
    assert [n for _, n in out] == ["7", "0", "7"]
    np.testing.assert_array_equal(out[2][0], digits[2])

    cifar = tmp_path / "cifar-100-python"
    cifar.mkdir()
    pixels = rng.integers(0, 256, (2, 3 * 32 * 32), np.uint8)
    with open(cifar / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [b"apple", b"aquarium_fish"]}, f)
    with open(cifar / "test", "wb") as f:
        pickle.dump({b"data": pixels, b"fine_labels": [1, 0]}, f)
    out = list(md.md_datasrc_examples("cifar100", str(tmp_path)))
    assert [n for _, n in out] == ["aquarium_fish", "apple"]
    np.testing.assert_array_equal(out[0][0][:, :, 2], pixels[0, 2048:].reshape(32, 32))

    with pytest.raises(FileNotFoundError, match="fgvc-aircraft-2013b"):
        md.md_datasrc_examples("aircraft", str(tmp_path))
    (tmp_path / "omniglot").mkdir()
    with pytest.raises(FileNotFoundError, match="images_background"):
        list(md.md_datasrc_examples("omniglot", str(tmp_path)))


def test_vdd_catalogue_copies_need_an_explicit_opt_in(tmp_path):
    for source in ("aircraft", "traffic_sign"):
        with pytest.raises(ValueError, match="72 px.*--md_datasrc.*--allow_vdd"):
            next(md.catalogue_examples(source, data_dir=str(tmp_path)))


def test_provenance_records_origin_resize_jpeg_and_dedup(tmp_path):
    dup_dir = _write_duplicate_lists(
        tmp_path / "dc",
        dict(
            zip(
                md.IMAGENET_DUPLICATE_LISTS,
                (["n1_1.JPEG"], ["n1_1.JPEG", "n2_2.JPEG"], []),
                strict=True,
            )
        ),
    )
    record = md.provenance(
        "ilsvrc_2012",
        "md_datasrc",
        location="/d/ILSVRC2012_img_train",
        hierarchy=md.hierarchy_origin("ilsvrc_2012"),
        md_duplicates_dir=dup_dir,
    )
    assert record["hierarchy"] == "ilsvrc_2012_dataset_spec.json (shipped)"
    assert md.hierarchy_origin("dtd") is None
    assert record["dedup_lists"] == {
        "ImageNet_Caltech101_duplicates.txt": 1,
        "ImageNet_Caltech256_duplicates.txt": 2,
        "ImageNet_CUBirds_duplicates.txt": 0,
    }
    assert record["dedup_files"] == 2 and record["deviations"] == []
    assert md.provenance("ilsvrc_2012", "records", location="/r")["dedup"].startswith("by MD")
    assert json.loads(json.dumps(record)) == record  # storable as TFDS metadata
    vdd = md.provenance("aircraft", "catalogue")
    assert vdd["location"] == "visual_domain_decathlon/aircraft"
    assert any("72 px" in d for d in vdd["deviations"])
    assert any("JPEG" in d for d in vdd["deviations"])
    line = md.format_provenance(md.provenance("mnist", "md_datasrc", location="/d", md_jpeg=True))
    assert line == "mnist: md_datasrc (/d), lanczos, MD JPEG"
    assert md.provenance("dtd", "records", location="/r")["deviations"] == []
    with pytest.raises(ValueError, match="origin='tfds'"):
        md.provenance("dtd", "tfds")
