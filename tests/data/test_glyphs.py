"""Tests of the Glyphs benchmark: shipped data, TFDS preparation and reading, the renderer."""

import collections
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from flatfsc_jax.data import glyphs, sources

# The renderer is an offline tool, not in the installed package: tools/ is a package at the
# repository root, imported like configs/ (pytest runs from the root, which is on sys.path).
from tools import glyphs_render

DEJAVU_SANS = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
PREPARED = ("latin", "thai")  # one seen, one unseen domain


@pytest.fixture(scope="module")
def card():
    return glyphs.data_card()


@pytest.fixture(scope="module")
def arrays():
    return glyphs.load_arrays()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tfds")
    glyphs.prepare(directory, PREPARED, verbose=False)
    return directory


def _codepoints(class_names):
    return [int(name.split(" ")[0][2:], 16) for name in class_names]


def _domain_rows(arrays, card, domain):
    return arrays["domain"] == card["domain_order"].index(domain)


# ----------------------------------------------------------------------------------------
# The shipped data and its data card
# ----------------------------------------------------------------------------------------


def test_constants_match_the_data_card(card):
    assert glyphs.DOMAINS == glyphs.SEEN_DOMAINS + glyphs.UNSEEN_DOMAINS
    assert not set(glyphs.SEEN_DOMAINS) & set(glyphs.UNSEEN_DOMAINS)
    assert tuple(card["domain_order"]) == glyphs.DOMAINS
    assert tuple(card["image_shape"]) == glyphs.IMAGE_SHAPE
    assert set(card["domains"]) <= set(glyphs.DOMAINS)
    for domain, entry in card["domains"].items():
        assert entry["role"] == ("seen" if domain in glyphs.SEEN_DOMAINS else "unseen")


def test_shipped_file_is_small_and_matches_its_checksums(card):
    path = os.path.join(glyphs.resolve_assets_dir(), card["file"])
    assert os.path.getsize(path) == card["npz_bytes"] <= 15 * 2**20
    assert glyphs_render.file_sha256(path) == card["npz_sha256"]


def test_counts_and_classes_equal_the_data_card(card, arrays):
    assert len(arrays["images"]) == card["num_images"]
    for domain, entry in card["domains"].items():
        rows = _domain_rows(arrays, card, domain)
        per_class = collections.Counter(arrays["codepoint"][rows].tolist())
        for split in glyphs_render.SPLITS:
            codepoints = _codepoints(entry["classes"][split])
            assert len(codepoints) == entry["num_classes"][split]
            assert sum(per_class[cp] for cp in codepoints) == entry["num_images"][split]
        counts = list(per_class.values())
        assert min(counts) == entry["instances_per_class"]["min"] >= glyphs_render.MIN_FACES
        assert max(counts) == entry["instances_per_class"]["max"] <= glyphs_render.MAX_PER_CLASS
        # every instance of a class is a different face
        pairs = arrays["codepoint"][rows].astype(np.int64) * 2**16 + arrays["face"][rows]
        assert len(np.unique(pairs)) == len(pairs)
        assert set(arrays["face"][rows].tolist()) == set(entry["faces"])
        assert len(entry["faces"]) >= glyphs_render.MIN_FACES


def test_class_splits_follow_the_protocol(card, arrays):
    for domain, entry in card["domains"].items():
        splits = {s: set(_codepoints(entry["classes"][s])) for s in glyphs_render.SPLITS}
        all_classes = set(arrays["codepoint"][_domain_rows(arrays, card, domain)].tolist())
        assert set.union(*splits.values()) == all_classes
        assert sum(len(s) for s in splits.values()) == len(all_classes)  # disjoint
        if domain in glyphs.UNSEEN_DOMAINS:
            assert splits["test"] == all_classes
        else:
            assert len(splits["train"]) == round(0.7 * len(all_classes))
            assert len(splits["valid"]) == round(0.15 * len(all_classes))
            assert len(splits["test"]) > 0
        # the split is the renderer's seeded split of those classes
        recomputed = glyphs_render.split_classes(domain, sorted(all_classes))
        assert {s: set(v) for s, v in recomputed.items()} == splits


def test_images_have_ink_inside_the_margin(arrays):
    images = arrays["images"]
    assert images.dtype == np.uint8 and images.shape[1:] == (28, 28)
    assert images.max(axis=(1, 2)).min() >= 64
    margin = glyphs_render.MARGIN
    frame = np.ones((28, 28), bool)
    frame[margin:-margin, margin:-margin] = False
    assert images[:, frame].max() == 0  # ink 255 on a 0 background, inside the margin


def test_sampled_domains_draw_from_their_common_pools(card):
    for domain, target in glyphs_render.SAMPLED_CLASSES.items():
        pool = set(glyphs_render.sampling_pool(domain))
        classes = [
            cp
            for s in glyphs_render.SPLITS
            for cp in _codepoints(card["domains"][domain]["classes"][s])
        ]
        assert len(classes) == target
        assert set(classes) <= pool
    assert len(glyphs_render.sampling_pool("cjk")) == 1583
    assert len(glyphs_render.sampling_pool("hangul")) == 2350


# ----------------------------------------------------------------------------------------
# TFDS preparation and reading
# ----------------------------------------------------------------------------------------


def test_prepared_splits_read_back_exactly(data_dir, card, arrays):
    latin_rows = _domain_rows(arrays, card, "latin")
    for split in glyphs_render.SPLITS:
        data = glyphs.load_split("latin", split, data_dir, prepare_if_missing=False)
        entry = card["domains"]["latin"]
        assert isinstance(data, sources.SplitData)
        assert data.source == "glyphs/latin" and data.split == split
        assert data.images.shape == (entry["num_images"][split], *glyphs.IMAGE_SHAPE)
        assert data.images.dtype == np.uint8
        assert list(data.class_names) == entry["classes"][split]
        assert data.class_counts().sum() == entry["num_images"][split]
        assert (data.class_counts() > 0).all()
        # label k holds exactly the shipped images of class_names[k]
        for label, codepoint in enumerate(_codepoints(data.class_names)):
            expected = arrays["images"][latin_rows & (arrays["codepoint"] == codepoint)]
            got = data.images[data.labels == label][..., 0]
            np.testing.assert_array_equal(
                got[np.lexsort(got.reshape(len(got), -1).T)],
                expected[np.lexsort(expected.reshape(len(expected), -1).T)],
            )


def test_unseen_domain_is_test_only(data_dir, card):
    data = glyphs.load_split("thai", "test", data_dir, prepare_if_missing=False)
    assert data.num_classes == card["domains"]["thai"]["num_classes"]["test"] == 46
    assert len(data) == card["domains"]["thai"]["num_images"]["test"]
    with pytest.raises(ValueError, match="unseen domain with splits \\['test'\\]"):
        glyphs.load_split("thai", "train", data_dir)
    with pytest.raises(sources.MissingDataError, match="has no 'valid' split"):
        sources.read_prepared_split(data_dir, "glyphs", "thai", "valid")


def test_prepare_is_idempotent_and_rebuilds_stale_domains(data_dir, capsys):
    version_dir = sources.prepared_dir(data_dir, "glyphs", "latin")
    info = os.path.join(os.fspath(version_dir), "dataset_info.json")
    before = os.stat(info).st_mtime_ns
    glyphs.prepare(data_dir, ["latin"])
    assert "already prepared" in capsys.readouterr().out
    assert os.stat(info).st_mtime_ns == before

    # a domain prepared from another render is rebuilt, not silently reused
    metadata_path = os.path.join(os.fspath(version_dir), "metadata.json")
    with open(metadata_path) as f:
        metadata = json.load(f)
    metadata["glyphs_sha256"] = "an older render"
    with open(metadata_path, "w") as f:
        json.dump(metadata, f)
    with pytest.raises(sources.MissingDataError, match="prepared from another render"):
        glyphs.load_split("latin", "train", data_dir, prepare_if_missing=False)
    glyphs.prepare(data_dir, ["latin"])
    assert "prepared train 1080" in capsys.readouterr().out
    with open(metadata_path) as f:
        assert json.load(f)["glyphs_sha256"] == glyphs.data_card()["sha256"]


def test_load_split_prepares_on_first_use(tmp_path, card):
    data = glyphs.load_split("digits", "test", tmp_path)
    assert data.num_classes == 10 and len(data) == card["domains"]["digits"]["num_images"]["test"]
    assert sources.prepared_dir(tmp_path, "glyphs", "digits") is not None


def test_missing_domain_without_prepare_is_a_clear_error(tmp_path):
    with pytest.raises(sources.MissingDataError, match="--prepare --data_dir="):
        glyphs.load_split("greek", "train", tmp_path, prepare_if_missing=False)


def test_unknown_domain_or_split_lists_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="domain='klingon' is unknown.*'latin'"):
        glyphs.load_split("klingon", "train", tmp_path)
    with pytest.raises(ValueError, match="split='training' is unknown.*'valid'"):
        glyphs.load_split("latin", "training", tmp_path)
    with pytest.raises(ValueError, match="domain='klingon' is unknown"):
        glyphs.prepare(tmp_path, ["latin", "klingon"])
    assert not os.path.exists(tmp_path / "glyphs")  # rejected before building anything


def _copy_assets(tmp_path):
    copy = tmp_path / "assets"
    shutil.copytree(glyphs.resolve_assets_dir(), copy)
    return copy


def test_corrupted_npz_gives_a_clear_error(tmp_path, monkeypatch):
    assets = _copy_assets(tmp_path)
    npz = assets / glyphs_render.NPZ_NAME
    raw = bytearray(npz.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    npz.write_bytes(bytes(raw))
    with pytest.raises(glyphs.AssetChecksumError, match="corrupted.*re-clone.*re-render"):
        glyphs.prepare(tmp_path / "data", ["latin"], assets_dir=assets, verbose=False)
    assert sources.prepared_dir(tmp_path / "data", "glyphs", "latin") is None
    # the environment variable points the builder at the same copy
    monkeypatch.setenv(glyphs.ASSETS_ENV, os.fspath(assets))
    with pytest.raises(glyphs.AssetChecksumError, match="corrupted"):
        glyphs.load_split("latin", "train", tmp_path / "data")


def test_npz_with_other_arrays_than_its_card_is_rejected(tmp_path, arrays):
    assets = _copy_assets(tmp_path)
    changed = {name: array[:100].copy() for name, array in arrays.items()}  # small: fast to zip
    changed["images"][0, 14, 14] ^= 0xFF
    card = glyphs.data_card(assets)
    glyphs_render.write(assets, changed, card)  # new file checksum, old content checksum
    with pytest.raises(glyphs.AssetChecksumError, match="does not hold the arrays"):
        glyphs.load_arrays(assets)


def test_describe_prints_the_data_card(card):
    out = subprocess.run(
        [sys.executable, "-m", "flatfsc_jax.cli.glyphs", "--describe"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert card["sha256"] in out
    for domain in card["domains"]:
        assert f"\n{domain}" in out
    assert "OFL-1.1" in out and "fonts-dejavu-core" in out


# ----------------------------------------------------------------------------------------
# The renderer (needs the `render` extra and DejaVu, which every Debian/matplotlib host has)
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dejavu():
    pytest.importorskip("PIL", reason="rendering needs the [render] extra (pillow)")
    pytest.importorskip("fontTools", reason="rendering needs the [render] extra (fonttools)")
    if not os.path.exists(DEJAVU_SANS):
        pytest.skip(f"{DEJAVU_SANS} is not installed")
    return DEJAVU_SANS


def test_render_is_deterministic(dejavu):
    latin = glyphs_render.DOMAIN_CHARACTERS["latin"]
    first, drawn = glyphs_render.render_characters(dejavu, latin)
    second, drawn_again = glyphs_render.render_characters(dejavu, latin)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(drawn, drawn_again)
    assert drawn.all() and first.dtype == np.uint8 and first.shape == (52, 28, 28)
    assert first.max() == 255 and first[:, 0].max() == 0


def test_render_keeps_size_and_baseline(dejavu):
    def ink_rows(image):
        rows = np.flatnonzero(image.max(axis=1) > 64)
        return rows[0], rows[-1]

    chars = [ord(c) for c in "oOpPxX"]
    images, _ = glyphs_render.render_characters(dejavu, glyphs_render.DOMAIN_CHARACTERS["latin"])
    by_char = dict(zip(glyphs_render.DOMAIN_CHARACTERS["latin"], images, strict=True))
    o, big_o, p, big_p, x, big_x = (ink_rows(by_char[c]) for c in chars)
    assert o[1] - o[0] < big_o[1] - big_o[0]  # lowercase is smaller than its capital
    assert p[1] > big_p[1]  # p descends below the baseline, P sits on it
    assert x[1] == big_x[1]  # both sit on the baseline


def test_render_flags_missing_and_tofu_glyphs(dejavu):
    thai_ko = 0x0E01  # DejaVu Sans has no Thai
    images, drawn = glyphs_render.render_characters(dejavu, [0x41, 0x61, thai_ko])
    assert drawn.tolist() == [True, True, False] and images[2].max() == 0
    # A cmap claiming the glyph makes FreeType draw .notdef: recognised as tofu.
    cmap = {0x41: "A", 0x61: "a", thai_ko: "fake"}
    _, drawn = glyphs_render.render_characters(dejavu, [0x41, 0x61, thai_ko], cmap=cmap)
    assert drawn.tolist() == [True, True, False]


# ----------------------------------------------------------------------------------------
# Renderer helpers
# ----------------------------------------------------------------------------------------


def test_split_classes_is_seeded_and_unseen_domains_are_test_only():
    classes = list(range(100, 152))
    first = glyphs_render.split_classes("latin", classes)
    assert first == glyphs_render.split_classes("latin", classes[::-1])
    assert [len(first[s]) for s in glyphs_render.SPLITS] == [36, 8, 8]
    assert sorted(sum(first.values(), [])) == classes
    assert glyphs_render.split_classes("thai", classes) == {
        "train": [],
        "valid": [],
        "test": classes,
    }


def test_dedup_keeps_one_of_near_identical_faces():
    rng = np.random.default_rng(0)
    base = (rng.random((20, 28, 28)) > 0.8).astype(np.uint8) * 255
    other = (rng.random((20, 28, 28)) > 0.8).astype(np.uint8) * 255
    near = base.copy()
    near[:, 0, :3] ^= 255  # 3 pixels of 784 differ: MAD ~1
    images = {0: base, 1: near, 2: other}
    valid = {f: np.ones(20, bool) for f in images}
    kept, dropped = glyphs_render._dedup_faces([0, 1, 2], images, valid)
    assert kept == [0, 2] and dropped[1][0] == 0 and dropped[1][1] < glyphs_render.DEDUP_MAD


def test_debian_licence_reads_dep5_and_free_form_files(tmp_path):
    (tmp_path / "fonts-x").mkdir()
    (tmp_path / "fonts-x" / "copyright").write_text(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n"
        "Files: *\nCopyright: someone\nLicense: GPL-2+\n\n"
        "Files: fonts/*.ttf\n other/*.ttc\nCopyright: someone\nLicense: OFL-1.1\n\n"
        "Files: debian/*\nCopyright: packager\nLicense: MIT\n"
    )
    (tmp_path / "fonts-y").mkdir()
    (tmp_path / "fonts-y" / "copyright").write_text("Licensed under the SIL Open Font License.\n")
    assert glyphs_render.debian_licence("fonts-x", "Foo.ttf", tmp_path) == "OFL-1.1"
    assert glyphs_render.debian_licence("fonts-x", "Foo.ttc", tmp_path) == "OFL-1.1"
    assert glyphs_render.debian_licence("fonts-x", "Foo.otf", tmp_path) == "GPL-2+"
    assert glyphs_render.debian_licence("fonts-y", "Bar.ttf", tmp_path) == "OFL-1.1"
    assert glyphs_render.debian_licence("fonts-z", "Baz.ttf", tmp_path) == "unknown"
