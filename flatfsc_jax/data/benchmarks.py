"""The benchmarks a run can use, and the one place that dispatches on which one it is.

A benchmark ("meta_dataset", "glyphs") has domains; each domain's classes are split into
train / valid / test, prepared into a TFDS data directory in the episodic split format
and read by ``sources.read_prepared_split``. Training, evaluation and the command lines
ask this module for a split (``load_split``), for a data directory
(``resolve_data_dir``), to make sure what a run will read is there (``ensure_prepared``)
or to prepare a domain (``prepare``); only here does code branch on the benchmark.

The benchmark modules import TFDS, so each is imported on first use: importing this
module (and ``train``, ``protocol``) stays cheap, and a Glyphs run never loads the
Meta-Dataset code.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from flatfsc_jax.data import sources

BENCHMARKS = ("meta_dataset", "glyphs")


def check_benchmark(benchmark: str) -> str:
    if benchmark not in BENCHMARKS:
        raise ValueError(f"benchmark={benchmark!r} is unknown; choose one of {BENCHMARKS}")
    return benchmark


def resolve_data_dir(data_dir=None) -> str:
    """``data_dir``, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets`` (TFDS's own)."""
    return data_dir or os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def load_split(benchmark: str, domain: str, split: str, data_dir, **kwargs) -> sources.SplitData:
    """The class split ``split`` of ``domain`` of ``benchmark`` as ``SplitData``.

    ``data_dir`` goes through ``resolve_data_dir`` ("" or None: the TFDS default).
    Keyword arguments: Glyphs ``prepare_if_missing``, ``assets_dir`` (see
    ``glyphs.load_split``, which prepares a missing domain); Meta-Dataset ``in_memory``
    (default False: images read lazily) and ``class_splits`` (default: the shipped ones;
    ``"prepared"``: the classes the prepared source holds, e.g. a miniature's subset).
    """
    data_dir = resolve_data_dir(data_dir)
    if check_benchmark(benchmark) == "glyphs":
        from flatfsc_jax.data import glyphs

        return glyphs.load_split(domain, split, data_dir, **kwargs)
    return _meta_dataset_split(domain, split, data_dir, **kwargs)


CLASS_SPLITS = ("shipped", "prepared")


def split_options(benchmark: str, class_splits: str = "shipped") -> dict:
    """``load_split`` keywords for ``config.data.class_splits``: "shipped" reads MD's class
    splits as shipped; "prepared" (Meta-Dataset only) the classes each prepared source
    holds, e.g. a miniature's subset, so the same run reads both."""
    if class_splits not in CLASS_SPLITS:
        raise ValueError(f"class_splits={class_splits!r} is unknown; choose one of {CLASS_SPLITS}")
    if class_splits == "prepared" and check_benchmark(benchmark) == "meta_dataset":
        return {"class_splits": "prepared"}
    return {}


def _meta_dataset_split(
    domain: str, split: str, data_dir, *, in_memory: bool = False, class_splits=None
) -> sources.SplitData:
    """Meta-Dataset's checks before the reader: known source and split, classes in the
    split, prepared (else the prepare command); the stored classes must be the ones in use.

    Raises:
      ValueError: unknown source or split, or a split without classes (test-only source).
      MissingDataError: not prepared, or the prepared files are corrupted.
    """
    from flatfsc_jax.data import meta_dataset

    name = meta_dataset.check_source(domain)
    meta_dataset.check_split(split)
    if class_splits == "prepared":
        meta_dataset.require_sources([name], data_dir)
        class_splits = meta_dataset.prepared_class_splits(name, data_dir)
    class_splits = class_splits or meta_dataset.load_class_splits(name)
    if not class_splits.classes[split]:
        raise ValueError(
            f"meta_dataset/{name} has no {split!r} classes; its class splits are "
            f"{list(class_splits.splits_with_classes())} (test-only sources are unseen domains)"
        )
    meta_dataset.require_sources([name], data_dir)
    return sources.read_prepared_split(
        data_dir,
        meta_dataset.BUILDER_NAME,
        name,
        split,
        source=f"{meta_dataset.BENCHMARK}/{name}",
        in_memory=in_memory,
        class_names=class_splits.classes[split],
        prepare_command=meta_dataset.prepare_command([name], data_dir),
    )


def prepare(benchmark: str, domain: str | None, data_dir, **options) -> str | None:
    """Prepares ``domain`` of ``benchmark`` into ``data_dir``.

    Glyphs: ``domain=None`` prepares every domain (nothing to download, idempotent),
    returns None. Meta-Dataset: ``options`` go to ``meta_dataset.prepare``; returns the
    prepared version directory.
    """
    if check_benchmark(benchmark) == "glyphs":
        from flatfsc_jax.data import glyphs

        glyphs.prepare(data_dir, domains=domain)
        return None
    from flatfsc_jax.data import meta_dataset

    return meta_dataset.prepare(domain, data_dir, **options)


def ensure_prepared(benchmark: str, splits: Mapping[str, Iterable[str]], data_dir) -> None:
    """Makes sure every split a run will read is prepared and intact, before any work.

    ``splits`` maps each domain to the splits that will be read. Glyphs prepares missing
    domains; Meta-Dataset fails fast listing every missing source and its prepare
    command. Then the files of each split are checked (``sources.verify_prepared``:
    JSON files, feature classes, shard files), so damaged data is found before training
    rather than when a split is first read, possibly hours later.
    """
    needed = sorted(splits)
    if check_benchmark(benchmark) == "glyphs":
        from flatfsc_jax.data import glyphs

        glyphs.prepare(data_dir, domains=needed)
        builder = glyphs.BUILDER_NAME
    else:
        from flatfsc_jax.data import meta_dataset

        meta_dataset.require_sources(needed, data_dir)
        builder = meta_dataset.BUILDER_NAME
    for domain in needed:
        path = sources.prepared_dir(data_dir, builder, domain)
        sources.verify_prepared(path, sorted(splits[domain]), source=f"{benchmark}/{domain}")
