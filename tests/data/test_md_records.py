"""Meta-Dataset's converted records: reader, ``prepare --from_records``, miniature, builder name.

A miniature Meta-Dataset in MD's records format (all 13 sources, tiny JPEG/PNG images) is
written into tmp_path, prepared with the real builder and read back through
``benchmarks.load_split``; pixels are checked against PIL + scipy (an independent
decode-and-resize), the specs against MD's schema, the framing against the CRC32C
check value. No TensorFlow.
"""

import io
import json
import os
import shutil
import struct

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from flatfsc_jax.cli import prepare as prepare_cli
from flatfsc_jax.data import benchmarks, sources
from flatfsc_jax.data import meta_dataset as md
from flatfsc_jax.data.meta_dataset import availability, builder, miniature, records
from flatfsc_jax.data.sources import SPLITS, MissingDataError

# Field names (and order) of MD's three dataset_spec.json kinds, as in MD's shipped specs.
MD_FLAT_KEYS = [
    "name",
    "classes_per_split",
    "images_per_class",
    "class_names",
    "path",
    "file_pattern",
    "__class__",
]
MD_BILEVEL_KEYS = [
    "name",
    "superclasses_per_split",
    "classes_per_superclass",
    "images_per_class",
    "superclass_names",
    "class_names",
    "path",
    "file_pattern",
    "__class__",
]
MD_HIERARCHICAL_KEYS = [
    "name",
    "split_subgraphs",
    "images_per_class",
    "class_names",
    "path",
    "file_pattern",
    "__class__",
]
MD_NODE_KEYS = ["wn_id", "words", "children_ids", "parents_ids"]


def _reference_pixels(encoded: bytes, size: int = 84) -> np.ndarray:
    """PIL decode to RGB, then scipy's linear interpolation on aligned-corner coordinates."""
    image = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"), np.float64)
    h, w = image.shape[:2]
    ys = np.linspace(0, h - 1, size) if h > 1 else np.zeros(size)
    xs = np.linspace(0, w - 1, size) if w > 1 else np.zeros(size)
    grid = np.meshgrid(ys, xs, indexing="ij")
    channels = [ndimage.map_coordinates(image[..., c], grid, order=1) for c in range(3)]
    return np.stack(channels, axis=-1)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return miniature.prepare_miniature(str(tmp_path_factory.mktemp("md")))


def _splits(mini, source):
    return records.class_splits_from_spec(
        source, records.read_dataset_spec(os.path.join(mini.root, source))
    )


# ----------------------------------------------------------------------------------------
# Framing, Example, spec schema
# ----------------------------------------------------------------------------------------


def test_masked_crc_matches_the_crc32c_check_value():
    crc = 0xE3069283  # CRC-32C of b"123456789" (RFC 3720's check value)
    masked = (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    assert records.masked_crc32c(b"123456789") == masked


def test_tfrecord_framing_round_trip(tmp_path):
    path = str(tmp_path / "0.tfrecords")
    payloads = [b"", b"x" * 300, records.serialize_example(b"\x00\xff", 7)]
    records.write_tfrecords(path, payloads)
    raw = open(path, "rb").read()
    assert struct.unpack("<Q", raw[:8])[0] == 0 and len(raw) == sum(16 + len(p) for p in payloads)
    assert list(records.iter_tfrecords(path, check_data_crc=True)) == payloads
    assert records.parse_example(payloads[2]) == (b"\x00\xff", 7)


@pytest.mark.parametrize("source", md.ALL_SOURCES)
def test_miniature_specs_follow_md_schema(prepared, source):
    mini = prepared[0]
    with open(os.path.join(mini.root, source, "dataset_spec.json")) as f:
        spec = json.load(f)
    kind = {"omniglot": MD_BILEVEL_KEYS, "ilsvrc_2012": MD_HIERARCHICAL_KEYS}.get(
        source, MD_FLAT_KEYS
    )
    assert list(spec) == kind and spec["name"] == source
    assert spec["file_pattern"] == "{}.tfrecords"
    files = sorted(
        f for f in os.listdir(os.path.join(mini.root, source)) if f != "dataset_spec.json"
    )
    assert files == sorted(f"{i}.tfrecords" for i in range(len(spec["class_names"])))
    if source == "ilsvrc_2012":
        roots = {
            s: [n["wn_id"] for n in nodes if not n["parents_ids"]]
            for s, nodes in spec["split_subgraphs"].items()
        }
        assert roots == {"TRAIN": ["n00001740"], "VALID": ["n02075296"], "TEST": ["n03183080"]}
        for nodes in spec["split_subgraphs"].values():
            assert all(list(n) == MD_NODE_KEYS for n in nodes)
            assert not [n for n in nodes if len(n["children_ids"]) == 1]  # MD collapses chains
        assert set(spec["images_per_class"]) == {"TRAIN", "VALID", "TEST"}
    if source == "omniglot":
        assert sum(spec["classes_per_superclass"].values()) == len(spec["class_names"])
        assert spec["superclasses_per_split"] == {"TRAIN": 2, "VALID": 2, "TEST": 2}


# ----------------------------------------------------------------------------------------
# Round trip: records -> prepared -> load_split
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", md.ALL_SOURCES)
def test_round_trip_counts_names_and_pixels(prepared, source):
    mini, data_dir, reports = prepared
    class_splits = _splits(mini, source)
    spec = records.read_dataset_spec(os.path.join(mini.root, source))
    assert (
        reports[source].images
        == spec.num_images
        == sum(len(v) for v in mini.encoded[source].values())
    )
    for split in SPLITS:
        if not mini.class_names[source][split]:
            continue
        data = benchmarks.load_split(
            "meta_dataset", source, split, data_dir, in_memory=True, class_splits=class_splits
        )
        assert list(data.class_names) == list(mini.class_names[source][split])
        ids = spec.split_classes[split]
        expected_counts = [len(mini.encoded[source][i]) for i in ids]
        assert data.class_counts().tolist() == expected_counts
        for label, class_id in enumerate(ids):
            got = data.get_images(np.flatnonzero(data.labels == label))
            want = np.stack([_reference_pixels(e) for e in mini.encoded[source][class_id]])
            assert got.shape == want.shape and got.dtype == np.uint8
            assert np.abs(got - want).max() <= 0.5 + 1e-6  # rounding only
        if source == "omniglot":  # alphabets survive: the alphabet-first sampler needs them
            alphabets = list(mini.groups[split])
            assert [class_splits.group_names[g] for g in data.class_groups] == alphabets
            assert len(set(alphabets)) == 2
        stored = availability.prepared_class_splits(source, data_dir)
        assert stored.classes == class_splits.classes and stored.groups == class_splits.groups
        lazy = benchmarks.load_split(
            "meta_dataset", source, split, data_dir, class_splits="prepared"
        )
        assert lazy.labels.tolist() == data.labels.tolist()
        if source == "ilsvrc_2012":
            assert {k: v.tolist() for k, v in data.class_hierarchy.items()} == {
                k: list(v) for k, v in mini.hierarchy[split].items()
            }


def test_report_sizes_are_measured(prepared):
    mini, data_dir, reports = prepared
    for source, r in reports.items():
        path = sources.prepared_dir(data_dir, md.BUILDER_NAME, source)
        assert r.output_bytes == builder.tree_bytes(os.fspath(path)) > 0
        directory = os.path.join(mini.root, source)
        assert r.input_bytes == builder.tree_bytes(directory)
        assert r.peak_bytes > r.output_bytes  # staging and output coexist at the end
        assert not os.path.exists(builder.staging_dir(data_dir, source))
    table = builder.format_records_table(list(reports.values()))
    assert "peak disk" in table and len(table.splitlines()) == 2 + len(reports)


# ----------------------------------------------------------------------------------------
# Resume, errors
# ----------------------------------------------------------------------------------------


def test_resume_after_a_kill_converts_only_unfinished_classes(tmp_path, monkeypatch):
    mini = miniature.write_miniature(str(tmp_path / "records"), sources=["dtd"])
    data_dir = str(tmp_path / "data")
    spec = records.read_dataset_spec(os.path.join(mini.root, "dtd"))
    staging = builder.staging_dir(data_dir, "dtd")
    os.makedirs(staging)
    for class_id in (0, 4, 7):  # finished before the kill
        records.stage_class(spec, class_id, staging)
    partial = records.staged_class_path(staging, 1) + ".tmp999"  # killed mid-write
    with open(partial, "wb") as f:
        f.write(b"PK\x03\x04 half a file")
    os.makedirs(os.path.join(data_dir, md.BUILDER_NAME, "dtd", "incomplete.XYZ_1.0.0"))
    read = []
    real_read_class = records.read_class
    monkeypatch.setattr(
        records, "read_class", lambda s, i, **kw: read.append(i) or real_read_class(s, i, **kw)
    )
    logs = []
    report = builder.prepare_from_records("dtd", mini.root, data_dir, log=logs.append)
    assert sorted(read) == sorted(set(range(18)) - {0, 4, 7})
    assert report.converted == report.images - sum(len(mini.encoded["dtd"][i]) for i in (0, 4, 7))
    assert any("resuming, 3 of 18 classes done" in line for line in logs)
    assert not os.path.exists(
        os.path.join(data_dir, md.BUILDER_NAME, "dtd", "incomplete.XYZ_1.0.0")
    )
    with pytest.raises(ValueError, match="prepared with other train classes"):
        benchmarks.load_split("meta_dataset", "dtd", "train", data_dir)  # shipped: 33 classes
    data = benchmarks.load_split(
        "meta_dataset", "dtd", "train", data_dir, in_memory=True, class_splits="prepared"
    )
    assert len(data) == report.images - sum(
        len(mini.encoded["dtd"][i]) for s in ("valid", "test") for i in spec.split_classes[s]
    )
    # A second run finds the source prepared and converts nothing.
    read.clear()
    again = builder.prepare_from_records("dtd", mini.root, data_dir)
    assert again.reused and read == []


def _broken_records(tmp_path):
    mini = miniature.write_miniature(str(tmp_path / "records"), sources=["dtd"])
    return mini, os.path.join(mini.root, "dtd")


def test_errors_name_the_file(tmp_path):
    mini, directory = _broken_records(tmp_path)
    data_dir = str(tmp_path / "data")
    with pytest.raises(records.RecordsError, match=r"cu_birds/dataset_spec\.json does not exist"):
        builder.prepare_from_records("cu_birds", mini.root, data_dir)
    spec = records.read_dataset_spec(directory)
    target = spec.class_file(2)
    content = open(target, "rb").read()
    with open(target, "wb") as f:  # truncated copy
        f.write(content[:-7])
    with pytest.raises(records.RecordsError, match=r"2\.tfrecords: record \d+ .*truncated"):
        records.read_class(spec, 2)
    flipped = bytearray(content)
    flipped[40] ^= 0xFF  # inside the first payload
    with open(target, "wb") as f:
        f.write(bytes(flipped))
    with pytest.raises(records.RecordsError, match=r"2\.tfrecords: record 0 .*data checksum"):
        records.read_class(spec, 2, check_data_crc=True)
    with open(target, "wb") as f:  # another class's records under this name
        f.write(open(spec.class_file(3), "rb").read())
    with pytest.raises(records.RecordsError, match=r"2\.tfrecords: record 0 .*class id 2"):
        records.read_class(spec, 2)
    os.remove(target)
    with pytest.raises(records.RecordsError, match=r"1 of 18 class files .* missing.*2\.tfrecords"):
        builder.prepare_from_records("dtd", mini.root, data_dir)
    assert not os.path.exists(os.path.join(data_dir, md.BUILDER_NAME, "dtd"))


def test_spec_errors(tmp_path):
    mini, directory = _broken_records(tmp_path)
    path = os.path.join(directory, "dataset_spec.json")
    spec = json.load(open(path))
    full = records.read_class(records.read_dataset_spec(directory), 0)
    capped = records.read_class(records.read_dataset_spec(directory), 0, max_images=2)
    assert len(full) == spec["images_per_class"]["0"] and np.array_equal(capped, full[:2])
    spec["images_per_class"]["0"] += 1
    json.dump(spec, open(path, "w"))
    with pytest.raises(records.RecordsError, match=r"0\.tfrecords holds \d+ records, .* says"):
        records.read_class(records.read_dataset_spec(directory), 0)
    spec["images_per_class"]["0"] -= 2
    json.dump(spec, open(path, "w"))
    with pytest.raises(records.RecordsError, match=r"0\.tfrecords holds more than \d+ records"):
        records.read_class(records.read_dataset_spec(directory), 0)
    names = spec["class_names"]
    names["0"], names["6"] = names["6"], names["0"]  # a train class listed as valid
    json.dump(spec, open(path, "w"))
    with pytest.raises(records.RecordsError, match="train class .* is a valid class"):
        records.class_splits_from_spec("dtd", records.read_dataset_spec(directory))
    spec["__class__"] = "Something"
    json.dump(spec, open(path, "w"))
    with pytest.raises(records.RecordsError, match="__class__"):
        records.read_dataset_spec(directory)


# ----------------------------------------------------------------------------------------
# The builder's own name; MD's TFDS build and our old directories
# ----------------------------------------------------------------------------------------


def test_builder_name_is_never_mds():
    assert md.BUILDER_NAME == md.MetaDatasetSource.name == "flatfsc_meta_dataset"
    assert md.BUILDER_NAME != "meta_dataset"


def _fake_build(data_dir, source, module):
    version = os.path.join(data_dir, "meta_dataset", source, "1.0.0")
    os.makedirs(version)
    info = {"name": "meta_dataset", "moduleName": module, "splits": [{"name": "all_classes"}]}
    with open(os.path.join(version, "dataset_info.json"), "w") as f:
        json.dump(info, f)


def test_mds_own_tfds_build_is_named_and_never_deleted(tmp_path):
    data_dir = str(tmp_path)
    _fake_build(data_dir, "omniglot", "meta_dataset.data.tfds.md_tfds")
    with pytest.raises(MissingDataError) as error:
        md.require_sources(["omniglot"], data_dir)
    message = str(error.value)
    assert "md_tfds" in message and "left untouched" in message and "delete" not in message
    assert "python -m flatfsc_jax.cli.prepare --from_records=$RECORDS --sources=omniglot" in message
    assert f"--from_md_tfds={data_dir} --sources=omniglot" in message
    assert os.path.isdir(os.path.join(data_dir, "meta_dataset", "omniglot", "1.0.0"))
    assert "md_tfds" in md.source_status("omniglot", data_dir)["other_build"]


def test_our_old_directories_migrate_with_the_printed_mv(prepared, tmp_path):
    mini, prepared_dir_, _ = prepared
    new = os.fspath(sources.prepared_dir(prepared_dir_, md.BUILDER_NAME, "mnist"))
    data_dir = str(tmp_path)
    old = os.path.join(data_dir, "meta_dataset", "mnist", "1.0.0")
    shutil.copytree(new, old)  # what an earlier flatfsc_jax wrote: same format, old name
    for name in os.listdir(old):
        if name.startswith(md.BUILDER_NAME + "-"):
            os.rename(
                os.path.join(old, name),
                os.path.join(old, name.replace(md.BUILDER_NAME, "meta_dataset", 1)),
            )
    info_path = os.path.join(old, "dataset_info.json")
    info = json.load(open(info_path))
    info["name"], info["moduleName"] = "meta_dataset", "flatfsc_jax.data.meta_dataset"
    json.dump(info, open(info_path, "w"))
    note = availability.other_build("mnist", data_dir)
    assert note is not None and "mv " in note
    command = note.split(": ", 1)[1]
    os.system(command)  # mkdir -p ... && mv ...
    data = benchmarks.load_split(
        "meta_dataset",
        "mnist",
        "test",
        data_dir,
        in_memory=True,
        class_splits=_splits(mini, "mnist"),
    )
    assert data.class_counts().tolist() == [len(v) for v in mini.encoded["mnist"].values()]


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------


def test_cli_from_records_prints_the_table_and_fails_clearly(tmp_path, capsys):
    mini = miniature.write_miniature(str(tmp_path / "records"), sources=["traffic_sign", "mnist"])
    data_dir = str(tmp_path / "data")
    code = prepare_cli.run(
        [
            f"--from_records={mini.root}",
            "--sources=traffic_sign,mnist,cifar10",
            f"--data_dir={data_dir}",
            "--workers=2",
        ]
    )
    captured = capsys.readouterr()
    assert code == 1  # cifar10 has no records here
    assert "cifar10/dataset_spec.json does not exist" in captured.err
    rows = [line.split()[0] for line in captured.out.splitlines() if line[:1].isalpha()]
    assert "traffic_sign" in rows and "mnist" in rows
    assert "peak disk" in captured.out
    assert md.missing_sources(["traffic_sign", "mnist"], data_dir) == []
    assert prepare_cli.run(["--list", f"--data_dir={data_dir}"]) == 0
    listing = capsys.readouterr().out.splitlines()
    [line] = [x for x in listing if x.strip().startswith("traffic_sign ")]
    assert " yes " in line and "6/24" in line  # the prepared subset, not MD's 43 classes


# ----------------------------------------------------------------------------------------
# Meta-Dataset's own TFDS build (md_tfds)
# ----------------------------------------------------------------------------------------


def _write_md_tfds_build(mini, source, data_dir, cuts):
    """What md_tfds writes: class-ordered 'all_classes' TFRecord shards of TFDS Examples
    (image, label, class_name, filename, format) and MD's v1 spec in metadata.json."""
    from tensorflow_datasets.proto import tf_example_pb2

    with open(os.path.join(mini.root, source, "dataset_spec.json")) as f:
        spec = json.load(f)
    payloads = []
    for class_id, images in sorted(mini.encoded[source].items()):
        for j, image in enumerate(images):
            example = tf_example_pb2.Example()
            feature = example.features.feature
            feature["image"].bytes_list.value.append(image)
            feature["label"].int64_list.value.append(class_id)
            feature["class_name"].bytes_list.value.append(
                spec["class_names"][str(class_id)].encode()
            )
            feature["filename"].bytes_list.value.append(f"{class_id}_{j}.jpg".encode())
            feature["format"].bytes_list.value.append(b"JPEG")
            payloads.append(example.SerializeToString())
    bounds = [0, *cuts, len(payloads)]
    version = os.path.join(data_dir, "meta_dataset", source, "1.0.0")
    os.makedirs(version)
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        name = f"meta_dataset-all_classes.tfrecord-{i:05d}-of-{len(bounds) - 1:05d}"
        records.write_tfrecords(os.path.join(version, name), payloads[lo:hi])
    info = {
        "name": "meta_dataset",
        "moduleName": "meta_dataset.data.tfds.md_tfds",
        "splits": [{"name": "all_classes", "shardLengths": list(np.diff(bounds).tolist())}],
    }
    with open(os.path.join(version, "dataset_info.json"), "w") as f:
        json.dump(info, f)
    with open(os.path.join(version, "metadata.json"), "w") as f:
        json.dump({"dataset_specs": {"v1": spec}, "total_num_examples": len(payloads)}, f)


def test_from_md_tfds_equals_from_records(prepared, tmp_path):
    mini, records_data_dir, _ = prepared
    data_dir = str(tmp_path)  # md_tfds's data dir is also ours: no collision
    _write_md_tfds_build(mini, "ilsvrc_2012", data_dir, cuts=[7, 50])  # cuts inside classes
    note = availability.other_build("ilsvrc_2012", data_dir)
    assert f"--from_md_tfds={data_dir} --sources=ilsvrc_2012" in note
    report = builder.prepare_from_records("ilsvrc_2012", data_dir, data_dir, md_tfds=True)
    assert report.images == 108
    for split in SPLITS:
        got = benchmarks.load_split(
            "meta_dataset", "ilsvrc_2012", split, data_dir, in_memory=True, class_splits="prepared"
        )
        want = benchmarks.load_split(
            "meta_dataset",
            "ilsvrc_2012",
            split,
            records_data_dir,
            in_memory=True,
            class_splits="prepared",
        )
        assert np.array_equal(got.images, want.images) and np.array_equal(got.labels, want.labels)
        assert list(got.class_names) == list(want.class_names)
        assert {k: v.tolist() for k, v in got.class_hierarchy.items()} == {
            k: v.tolist() for k, v in want.class_hierarchy.items()
        }
    assert os.path.isdir(
        os.path.join(data_dir, "meta_dataset", "ilsvrc_2012", "1.0.0")
    )  # untouched
    shard = os.path.join(
        data_dir,
        "meta_dataset",
        "ilsvrc_2012",
        "1.0.0",
        "meta_dataset-all_classes.tfrecord-00002-of-00003",
    )
    os.remove(shard)
    with pytest.raises(
        records.RecordsError, match=r"1 of 3 shard files .* missing.*00002-of-00003"
    ):
        builder.prepare_from_records("ilsvrc_2012", data_dir, str(tmp_path / "other"), md_tfds=True)


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_miniature_episodes_follow_mds_rules(prepared, split):
    """The miniature supports MD's samplers as they are: Omniglot draws within one
    alphabet; ImageNet draws the leaves of a node spanning 5..392 of them (all of them:
    no node here spans more than 50)."""
    from flatfsc_jax.data.episodes import EpisodeSampler, EpisodeSpec

    mini, data_dir, _ = prepared
    omniglot = benchmarks.load_split(
        "meta_dataset", "omniglot", split, data_dir, class_splits="prepared"
    )
    sampler = EpisodeSampler(omniglot, EpisodeSpec(), seed=0)
    assert sampler.kind == "groups"
    for episode in sampler.sample(20):
        assert len({int(omniglot.class_groups[c]) for c in episode.classes}) == 1
    imagenet = benchmarks.load_split(
        "meta_dataset", "ilsvrc_2012", split, data_dir, class_splits="prepared"
    )
    sampler = EpisodeSampler(imagenet, EpisodeSpec(), seed=0)
    assert sampler.kind == "hierarchy"
    eligible = {
        frozenset(leaves) for leaves in mini.hierarchy[split].values() if 5 <= len(leaves) <= 392
    }
    drawn = {frozenset(int(c) for c in e.classes) for e in sampler.sample(40)}
    assert drawn == eligible  # every eligible node is drawn, nothing else


def test_cli_md_duplicates_dir_applies_to_imagenet_outside_records(tmp_path, capsys):
    from absl import app

    # Records were de-duplicated by MD's converter: the flag is refused, saying so.
    with pytest.raises(app.UsageError, match="converter dropped ImageNet's duplicates"):
        prepare_cli.run(
            [f"--from_records={tmp_path}", "--sources=ilsvrc_2012", "--md_duplicates_dir=/x"]
        )
    # From MD's $DATASRC, ImageNet without the lists stops naming the flag and their home.
    code = prepare_cli.run(
        [f"--md_datasrc={tmp_path}", "--sources=ilsvrc_2012", f"--data_dir={tmp_path / 'd'}"]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "--md_duplicates_dir=<dir>" in err and "meta_dataset/dataset_conversion/" in err


def test_records_provenance_is_stored_with_the_split(tmp_path):
    mini = miniature.write_miniature(str(tmp_path / "records"), sources=["ilsvrc_2012"])
    data_dir = str(tmp_path / "data")
    builder.prepare_from_records("ilsvrc_2012", mini.root, data_dir)
    split = benchmarks.load_split(
        "meta_dataset", "ilsvrc_2012", "test", data_dir, class_splits="prepared"
    )
    record = split.provenance
    assert record["origin"] == "records" and record["dedup"] == "by MD's converter (records)"
    assert record["location"].endswith(os.path.join("ilsvrc_2012", "dataset_spec.json"))
    assert record["md_jpeg"] and record["deviations"] == []
    assert md.format_provenance(record).startswith("ilsvrc_2012: records (")
