"""Glyphs: the embedded multi-domain few-shot benchmark, as TFDS sources.

How it is made and what it holds: docs/data.md#glyphs-the-embedded-benchmark.

A class is a Unicode character, an instance is that character rendered by one font face, a
domain is a script. The rendered benchmark ships with the package
(``assets/glyphs/glyphs-v1.npz`` + data card ``glyphs-v1.json``, made by the repository's
``tools/glyphs_render.py``, the source of truth), so nobody needs fonts. This module turns it
into the *episodic split format* of ``flatfsc_jax.data.sources`` (one TFDS config per domain,
array_record files, class splits train/valid/test, labels local to the split) and reads it back
as ``SplitData``.

Protocol (mirrors Meta-Dataset): seen domains (``SEEN_DOMAINS``; cjk is the large, general,
"ImageNet-like" one) split their classes 70/15/15 into train/valid/test; unseen domains
(``UNSEEN_DOMAINS``) are test-only.

    python -m flatfsc_jax.cli.glyphs --describe          # the data card
    python -m flatfsc_jax.cli.glyphs --prepare --data_dir=DIR [--domains=latin,thai]

    from flatfsc_jax.data import glyphs
    split = glyphs.load_split("latin", "train", data_dir)   # prepares on first use

The shipped npz is verified against the checksums of its data card before anything is built;
``FLATFSC_GLYPHS_ASSETS`` (or ``assets_dir=``) points at another rendered copy.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import shutil
import time
from collections.abc import Iterable

import importlib_resources
import numpy as np
import tensorflow_datasets as tfds

from flatfsc_jax.data import sources
from flatfsc_jax.data.glyphs_spec import (
    CARD_NAME,
    DOMAINS,
    SEEN_DOMAINS,
    SPLITS,
    UNSEEN_DOMAINS,
    content_sha256,
    file_sha256,
)

__all__ = [
    "ASSETS_ENV",
    "DOMAINS",
    "IMAGE_SHAPE",
    "SEEN_DOMAINS",
    "UNSEEN_DOMAINS",
    "AssetChecksumError",
    "Glyphs",
    "data_card",
    "describe",
    "load_arrays",
    "load_split",
    "prepare",
    "resolve_assets_dir",
]

IMAGE_SHAPE = (28, 28, 1)
BUILDER_NAME = "glyphs"
ASSETS_ENV = "FLATFSC_GLYPHS_ASSETS"  # directory holding another glyphs-v1.npz + data card
_SHA_KEY = "glyphs_sha256"  # metadata entry: which render a prepared directory was built from


class AssetChecksumError(ValueError):
    """The benchmark's npz does not match the checksum recorded in its data card."""


def resolve_assets_dir(assets_dir=None) -> str:
    """The directory with the npz and data card: ``assets_dir``, else ``$FLATFSC_GLYPHS_ASSETS``,
    else the copy shipped inside the package."""
    if assets_dir is None:
        assets_dir = os.environ.get(ASSETS_ENV)
    if assets_dir is None:
        assets_dir = importlib_resources.files("flatfsc_jax.data") / "assets" / "glyphs"
    return os.fspath(assets_dir)


def data_card(assets_dir=None) -> dict:
    """The data card (``glyphs-v1.json``): counts, classes per split, faces, licences, sha256."""
    path = os.path.join(resolve_assets_dir(assets_dir), CARD_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"Glyphs data card {path!r} is missing: re-clone the repository (the benchmark is "
            "shipped in flatfsc_jax/data/assets/glyphs) or re-render it with "
            "`python -m tools.glyphs_render --out <dir>` in the repository"
        )
    with open(path, encoding="utf-8") as f:
        return json.load(f)


_ARRAYS_CACHE: dict[tuple[str, str], dict[str, np.ndarray]] = {}


def load_arrays(assets_dir=None) -> dict[str, np.ndarray]:
    """The verified benchmark arrays (read-only): images uint8 [N, 28, 28], domain, codepoint,
    face. Raises ``AssetChecksumError`` when the npz does not match its data card."""
    directory = resolve_assets_dir(assets_dir)
    card = data_card(directory)
    key = (os.path.realpath(directory), card["npz_sha256"])
    if key in _ARRAYS_CACHE:
        return _ARRAYS_CACHE[key]
    path = os.path.join(directory, card["file"])
    hint = (
        "re-clone the repository (or `git checkout -- flatfsc_jax/data/assets/glyphs`; with "
        "Git LFS, `git lfs pull`) or re-render it with "
        "`python -m tools.glyphs_render --out <dir>` in the repository"
    )
    if not os.path.exists(path):
        raise FileNotFoundError(f"Glyphs data {path!r} is missing: {hint}")
    actual = file_sha256(path)
    if actual != card["npz_sha256"]:
        raise AssetChecksumError(
            f"Glyphs data {path!r} is corrupted: sha256 {actual} != {card['npz_sha256']} "
            f"recorded in {CARD_NAME}; {hint}"
        )
    with np.load(path, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    if content_sha256(arrays) != card["sha256"]:
        raise AssetChecksumError(
            f"Glyphs data {path!r} does not hold the arrays its data card describes "
            f"(content sha256 != {card['sha256']}); {hint}"
        )
    for array in arrays.values():
        array.flags.writeable = False
    _ARRAYS_CACHE[key] = arrays
    return arrays


def _check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"domain={domain!r} is unknown; Glyphs domains are {DOMAINS}")


def _codepoint(class_name: str) -> int:
    """``"U+0041 A"`` -> 0x41."""
    return int(class_name.split(" ", 1)[0][2:], 16)


class Glyphs(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """One Glyphs domain (config) in the episodic split format.

    Not registered in the TFDS catalogue (construct it directly, or read prepared data with
    ``tfds.builder_from_directory``); ``assets_dir`` selects the rendered npz + data card.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "glyphs-v1: 12 scripts rendered from Debian font packages."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(
            name=domain,
            description=f"{domain} ({'seen' if domain in SEEN_DOMAINS else 'unseen'} domain)",
        )
        for domain in DOMAINS
    ]

    def __init__(self, *, assets_dir=None, **kwargs):
        self._assets_dir = assets_dir  # _info (run by the base constructor) reads it
        super().__init__(**kwargs)

    def _domain_card(self) -> dict:
        card = data_card(self._assets_dir)
        domain = self.builder_config.name
        if domain not in card["domains"]:
            raise ValueError(
                f"Glyphs domain {domain!r} is not in this render (dropped: "
                f"{card['protocol'].get('dropped_domains', {})}); it has {sorted(card['domains'])}"
            )
        return card["domains"][domain]

    def _info(self) -> tfds.core.DatasetInfo:
        card = data_card(self._assets_dir)
        domain = self._domain_card()
        return self.dataset_info_from_configs(
            description=card["description"],
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8),
                    "label": tfds.features.Scalar(dtype=np.int64),
                }
            ),
            metadata=tfds.core.MetadataDict(
                {
                    "class_names": {
                        s: domain["classes"][s] for s in SPLITS if domain["classes"][s]
                    },
                    "role": domain["role"],
                    _SHA_KEY: card["sha256"],
                }
            ),
            disable_shuffling=True,  # class-sorted order; episodes index by class anyway
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the data ships with the package
        arrays = load_arrays(self._assets_dir)
        order = data_card(self._assets_dir)["domain_order"]
        in_domain = arrays["domain"] == order.index(self.builder_config.name)
        images, codepoints = arrays["images"][in_domain], arrays["codepoint"][in_domain]
        classes = self._domain_card()["classes"]
        return {
            split: self._generate_examples(images, codepoints, classes[split])
            for split in SPLITS
            if classes[split]
        }

    def _generate_examples(self, images, codepoints, class_names):
        label_of = {_codepoint(name): label for label, name in enumerate(class_names)}
        for index in np.flatnonzero(np.isin(codepoints, list(label_of))):
            yield (
                int(index),
                {
                    "image": images[index][..., None],
                    "label": label_of[int(codepoints[index])],
                },
            )


@contextlib.contextmanager
def _quiet_tfds():
    """Silences TFDS's progress bars and its "prepared to ..." print while building."""
    from tensorflow_datasets.core.utils import tqdm_utils

    previous = tqdm_utils._active  # no public getter; restored below
    tqdm_utils.display_progress_bar(False)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        tqdm_utils.display_progress_bar(previous)


def _prepared_sha(data_dir, domain: str) -> str | None:
    """The render a prepared domain was built from (``None`` if not prepared)."""
    path = sources.prepared_dir(data_dir, BUILDER_NAME, domain)
    if path is None:
        return None
    try:
        with open(os.path.join(os.fspath(path), "metadata.json"), encoding="utf-8") as f:
            return json.load(f).get(_SHA_KEY)
    except (OSError, ValueError):
        return ""  # unreadable: treat as stale


def _normalise_domains(domains: str | Iterable[str] | None) -> list[str]:
    if domains is None:
        return list(DOMAINS)
    if isinstance(domains, str):
        domains = [domains]
    domains = list(domains)
    for domain in domains:
        _check_domain(domain)
    return domains


def prepare(
    data_dir, domains: str | Iterable[str] | None = None, *, assets_dir=None, verbose: bool = True
) -> None:
    """Writes Glyphs domains into ``data_dir`` (``<data_dir>/glyphs/<domain>/1.0.0``).

    Idempotent: a domain already prepared from the same render (same sha256) is skipped; one
    prepared from a different render is rebuilt. Prints one line per domain when ``verbose``.
    """
    names = _normalise_domains(domains)
    card = data_card(assets_dir)
    available = [d for d in names if d in card["domains"]]
    for domain in names:
        if domain not in card["domains"]:
            raise ValueError(
                f"Glyphs domain {domain!r} was dropped from this render "
                f"({card['protocol']['dropped_domains'].get(domain)}); available: {available}"
            )
    data_dir = os.fspath(data_dir)
    for domain in names:
        recorded = _prepared_sha(data_dir, domain)
        if recorded == card["sha256"]:
            if verbose:
                print(f"glyphs/{domain}: already prepared in {data_dir}")
            continue
        if recorded is not None:  # built from another render: rebuild it
            shutil.rmtree(os.fspath(sources.prepared_dir(data_dir, BUILDER_NAME, domain)))
        else:
            # Not prepared, but leftovers (e.g. a version directory that lost its
            # dataset_info.json) would make TFDS skip the build: start from nothing.
            leftover = os.path.join(data_dir, BUILDER_NAME, domain)
            if os.path.isdir(leftover):
                shutil.rmtree(leftover)
        start = time.perf_counter()
        builder = Glyphs(
            config=domain, data_dir=data_dir, file_format="array_record", assets_dir=assets_dir
        )
        with _quiet_tfds():
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(
                    compute_stats=tfds.download.ComputeStatsMode.SKIP
                )
            )
        if verbose:
            counts = card["domains"][domain]["num_images"]
            splits = ", ".join(f"{s} {counts[s]}" for s in SPLITS if counts[s])
            print(
                f"glyphs/{domain}: prepared {splits} images in "
                f"{time.perf_counter() - start:.1f} s -> {builder.data_dir}"
            )


def load_split(
    domain: str,
    split: str,
    data_dir,
    *,
    prepare_if_missing: bool = True,
    assets_dir=None,
) -> sources.SplitData:
    """One class split of one domain as ``SplitData`` (images uint8 [N, 28, 28, 1] in memory).

    Prepares the domain first when it is missing or was built from another render, unless
    ``prepare_if_missing=False`` (then ``sources.MissingDataError``).
    """
    _check_domain(domain)
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is unknown; choose one of {SPLITS}")
    card = data_card(assets_dir)
    if domain in card["domains"] and not card["domains"][domain]["classes"][split]:
        with_classes = [s for s in SPLITS if card["domains"][domain]["classes"][s]]
        raise ValueError(
            f"glyphs/{domain} has no {split!r} classes: it is an "
            f"{card['domains'][domain]['role']} domain with splits {with_classes}"
        )
    recorded = _prepared_sha(data_dir, domain)
    if recorded != card["sha256"]:
        if not prepare_if_missing:
            state = "not prepared" if recorded is None else "prepared from another render"
            raise sources.MissingDataError(
                f"glyphs/{domain} is {state} in data_dir={os.fspath(data_dir)!r}: run "
                f"`python -m flatfsc_jax.cli.glyphs --prepare --data_dir={os.fspath(data_dir)}`"
                " or pass prepare_if_missing=True"
            )
        prepare(data_dir, [domain], assets_dir=assets_dir)
    return sources.read_prepared_split(
        data_dir, BUILDER_NAME, domain, split, source=f"{BUILDER_NAME}/{domain}"
    )


def describe(card: dict, *, faces: bool = False) -> str:
    """A readable data card."""
    table = card["faces"]
    lines = [
        f"Glyphs v{card['version']}: {card['num_images']} images "
        f"{'x'.join(map(str, card['image_shape']))} uint8 ({card['file']}, "
        f"{card['npz_bytes'] / 2**20:.1f} MiB)",
        f"  content sha256 {card['sha256']}",
        f"  file sha256    {card['npz_sha256']}",
        f"  {card['description']}",
        "",
        f"{'domain':<11} {'role':<7} {'classes tr/va/te':>17} {'images tr/va/te':>19} "
        f"{'per class':>9} {'faces':>6} {'families':>8}",
    ]
    for domain, entry in card["domains"].items():
        n_c, n_i = entry["num_classes"], entry["num_images"]
        per_class = entry["instances_per_class"]
        families = {table[f]["family"] for f in entry["faces"]}
        lines.append(
            f"{domain:<11} {entry['role']:<7} "
            f"{'/'.join(str(n_c[s]) for s in SPLITS):>17} "
            f"{'/'.join(str(n_i[s]) for s in SPLITS):>19} "
            f"{per_class['min']:>4}-{per_class['max']:<4} {len(entry['faces']):>6} "
            f"{len(families):>8}"
        )
    dropped = card["protocol"].get("dropped_domains") or {}
    if dropped:
        lines.append(f"dropped domains: {dropped}")
    render = card["render"]
    lines += [
        "",
        f"Rendered with Pillow {render['pillow']} (FreeType {render['freetype']}), fontTools "
        f"{render['fonttools']}, seed {render['seed']}; <= {render['max_per_class']} faces per "
        f"class, >= {render['min_faces']} distinct faces per class.",
    ]
    packages = collections.defaultdict(set)
    for face in table:
        packages[(face["package"], face["package_version"])].add(face["license"])
    licences = collections.Counter(face["license"] for face in table)
    lines += [
        f"{len(table)} faces from {len(packages)} Debian packages; licences (faces): "
        + ", ".join(f"{name} ({n})" for name, n in licences.most_common()),
        "",
        "Packages: "
        + "; ".join(
            f"{name} {version} [{', '.join(sorted(lic))}]"
            for (name, version), lic in sorted(packages.items())
        ),
    ]
    for domain, entry in card["domains"].items():
        lines.append(f"\n{domain}:")
        lines += [f"  {note}" for note in entry["notes"]]
        lines += [
            f"  {split}: " + " ".join(name.split(" ", 1)[1] for name in entry["classes"][split])
            for split in SPLITS
            if entry["classes"][split] and len(entry["classes"][split]) <= 80
        ]
        if faces:
            lines += [
                f"  face {f}: {table[f]['family']} {table[f]['style']} ({table[f]['file']}, "
                f"{table[f]['package']}, {table[f]['license']})"
                for f in entry["faces"]
            ]
    return "\n".join(lines)
