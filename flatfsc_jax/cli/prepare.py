"""Command line: prepare benchmark sources into a data directory, or list their status.

  python -m flatfsc_jax.cli.prepare --from_records=$RECORDS --sources=all --data_dir=~/data
  python -m flatfsc_jax.cli.prepare --from_md_tfds=~/tensorflow_datasets --sources=all
  python -m flatfsc_jax.cli.prepare --md_datasrc=$DATASRC --sources=all \\
      --md_duplicates_dir=<meta-dataset checkout>/meta_dataset/dataset_conversion
  python -m flatfsc_jax.cli.prepare --sources=omniglot,dtd --data_dir=~/tensorflow_datasets
  python -m flatfsc_jax.cli.prepare --sources=seen --manual_dir=~/imagenet \\
      --source_dirs=fungi=~/fungi                  # all 8 seen Meta-Dataset sources
  python -m flatfsc_jax.cli.prepare --sources=glyphs  # the embedded Glyphs benchmark
  python -m flatfsc_jax.cli.prepare --list         # prepared or not, classes/images

``--from_records`` reads Meta-Dataset's converted records (``$RECORDS/<source>/`` with
``dataset_spec.json`` and ``<class_id>.tfrecords``, as MD's converter, URL's instructions
and CNAPs' script write them) without TensorFlow: classes are converted in parallel
(``--workers``), a killed run resumes where it stopped, and a table gives each source's
input size, peak disk, time and output size. ImageNet's sampling graph comes from its
``dataset_spec.json``. ``--from_md_tfds=<dir>`` does the same from Meta-Dataset's own TFDS
build (``tfds build`` of MD's md_tfds, which wrote ``<dir>/meta_dataset/<source>/``); our
sources go to ``<data_dir>/flatfsc_meta_dataset/``, so ``<dir>`` may be the same directory.

``--md_datasrc=$DATASRC`` reads the raw downloads laid out as MD's conversion guide says
(``meta_dataset.md_datasrc_examples``), without TensorFlow. ImageNet from anything but
records needs ``--md_duplicates_dir`` (MD's three duplicate lists, read from the user's
Meta-Dataset checkout; records were de-duplicated by MD's converter). Each source's
provenance goes into its metadata and into the report (docs/meta-dataset.md).

Otherwise Meta-Dataset sources come from the TFDS catalogue (downloaded and prepared by
TFDS, then converted: needs TensorFlow, ``pip install -e .[prepare]``), or, with
``--source_dirs=<source>=<dir>``, from an original archive directory without TensorFlow
(fungi is not in the catalogue and always needs one; see ``meta_dataset.local_examples``).
``--sources`` accepts names, ``all``, ``seen``, ``unseen`` and ``glyphs``.

Storage: images are kept as zlib-compressed 84x84x3 uint8, about 3.7 KB for a QuickDraw
drawing (measured on synthetic strokes), so all ~50M QuickDraw drawings take ~185 GB;
``--max_images_per_class=N`` keeps the first N images of each class (Meta-Dataset itself
uses all of them).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

_SOURCES = flags.DEFINE_string("sources", None, "Comma list: names, all, seen, unseen, glyphs.")
_DATA_DIR = flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "Output data directory.")
_FROM_RECORDS = flags.DEFINE_string(
    "from_records", None, "Meta-Dataset's records root ($RECORDS): <dir>/<source>/*.tfrecords."
)
_FROM_MD_TFDS = flags.DEFINE_string(
    "from_md_tfds",
    None,
    "TFDS data dir of Meta-Dataset's own TFDS build (md_tfds): <dir>/meta_dataset/<source>/.",
)
_WORKERS = flags.DEFINE_integer(
    "workers", 0, "--from_records: classes converted in parallel (0: one per CPU)."
)
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "TFDS manual download dir (imagenet2012).")
_SOURCE_DIRS = flags.DEFINE_string(
    "source_dirs", None, "Comma list <source>=<original archive dir> (fungi needs one)."
)
_VDD_DIR = flags.DEFINE_string(
    "vdd_annotations_dir",
    None,
    "decathlon-1.0/annotations (class names of aircraft), if not in data_dir/downloads.",
)
_HIERARCHY = flags.DEFINE_string(
    "hierarchy_file",
    None,
    "ilsvrc_2012 without --from_records: MD's ilsvrc_2012_dataset_spec.json or a WordNet "
    "is_a file (default: MD's spec, shipped).",
)
_MD_DATASRC = flags.DEFINE_string(
    "md_datasrc",
    None,
    "$DATASRC laid out as Meta-Dataset's conversion guide says (no TensorFlow).",
)
_MD_DUPLICATES = flags.DEFINE_string(
    "md_duplicates_dir",
    None,
    "ilsvrc_2012 without --from_records: Meta-Dataset's meta_dataset/dataset_conversion "
    "folder, which holds its three ImageNet duplicate lists.",
)
_MD_JPEG = flags.DEFINE_bool(
    "md_jpeg", False, "Re-encode as JPEG the sources MD stores as JPEG (as its records hold)."
)
_ALLOW_VDD = flags.DEFINE_bool(
    "allow_vdd",
    False,
    "Accept the 72-px Visual Domain Decathlon catalogue copies of aircraft and traffic_sign.",
)
_MAX_IMAGES = flags.DEFINE_integer(
    "max_images_per_class", None, "Keep the first N images of each class."
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Rebuild sources that are prepared.")
_LIST = flags.DEFINE_bool("list", False, "Show each source's status and exit.")

GLYPHS = "glyphs"


def parse_sources(text: str) -> list[str]:
    """``"seen,mscoco"`` -> Meta-Dataset names (+ "glyphs"), in order, without repeats."""
    from flatfsc_jax.data import meta_dataset

    groups = {
        "all": meta_dataset.ALL_SOURCES,
        "seen": meta_dataset.SEEN_SOURCES,
        "unseen": meta_dataset.UNSEEN_SOURCES,
    }
    names: list[str] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if item in groups:
            names.extend(groups[item])
        elif item == GLYPHS or item in meta_dataset.SOURCES:
            names.append(item)
        else:
            raise ValueError(
                f"--sources has unknown source {item!r}; choose from "
                f"{list(meta_dataset.ALL_SOURCES)}, {sorted(groups)} or {GLYPHS!r}"
            )
    if not names:
        raise ValueError("--sources is empty; name at least one source (or use --list)")
    return list(dict.fromkeys(names))


def parse_source_dirs(text: str | None) -> dict[str, str]:
    """``"fungi=/d/fungi,aircraft=/d/fgvc"`` -> {source: directory}."""
    from flatfsc_jax.data import meta_dataset

    dirs: dict[str, str] = {}
    for item in (t.strip() for t in (text or "").split(",")):
        if not item:
            continue
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise ValueError(f"--source_dirs entry {item!r} is not '<source>=<directory>'")
        dirs[meta_dataset.check_source(name.strip())] = os.path.expanduser(path.strip())
    return dirs


def format_status(data_dir: str) -> str:
    """One line per Meta-Dataset source: prepared or not, classes/images per split."""
    from flatfsc_jax.data import meta_dataset

    lines = [f"Meta-Dataset sources in {data_dir}:"]
    lines.append(
        f"  {'source':<13} {'domain':<7} {'prepared':<9} "
        + " ".join(f"{s + ' cls/img':<16}" for s in meta_dataset.SPLITS)
    )
    for name in meta_dataset.ALL_SOURCES:
        status = meta_dataset.source_status(name, data_dir)
        cells = []
        for split in meta_dataset.SPLITS:
            info = status["splits"][split]
            images = "-" if info["images"] is None else str(info["images"])
            cells.append(f"{info['classes']}/{images}" if info["classes"] else "-")
        spec = meta_dataset.SOURCES[name]
        if status["prepared"]:
            how = status["path"]
        elif "error" in status:
            how = f"unreadable ({status['error']})"
        elif "other_build" in status:
            how = status["other_build"]
        elif spec.catalogue is None:
            how = "needs --from_records or --source_dirs (not in the TFDS catalogue)"
        elif spec.catalogue.manual_download:
            how = f"--from_records, or from {spec.catalogue.name} with --manual_dir"
        else:
            how = f"--from_records, or from {spec.catalogue.name}"
        lines.append(
            f"  {name:<13} {'seen' if spec.seen else 'unseen':<7} "
            f"{'yes' if status['prepared'] else 'no':<9} "
            + " ".join(f"{c:<16}" for c in cells)
            + how
        )
    return "\n".join(lines)


def prepare_from_records(
    names, records_dir: str, data_dir: str, workers: int, md_tfds: bool = False
) -> int:
    """``--from_records`` / ``--from_md_tfds``: every source, then the per-source table;
    returns the exit code."""
    from flatfsc_jax.data.meta_dataset import builder

    reports, failed = [], []
    pool = builder.worker_pool(workers) if workers > 1 else None
    try:
        _prepare_each(names, records_dir, data_dir, pool, md_tfds, reports, failed)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if reports:
        print(builder.format_records_table(reports), flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _prepare_each(names, records_dir, data_dir, pool, md_tfds, reports, failed) -> None:
    from flatfsc_jax.data import benchmarks
    from flatfsc_jax.data.meta_dataset import builder, records

    for name in names:
        print(f"== {name}", flush=True)
        try:
            if name == GLYPHS:
                benchmarks.prepare(GLYPHS, None, data_dir)
                continue
            report = builder.prepare_from_records(
                name,
                records_dir,
                data_dir,
                executor=pool,
                md_tfds=md_tfds,
                overwrite=_OVERWRITE.value,
                max_images_per_class=_MAX_IMAGES.value,
                log=lambda message: print(message, flush=True),
            )
            reports.append(report)
            print(f"   prepared in {report.path}", flush=True)
        except (records.RecordsError, OSError, ValueError) as e:
            failed.append(name)
            print(f"   FAILED: {e}", file=sys.stderr, flush=True)


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; flags take the form --name=value")
    from flatfsc_jax.data import benchmarks

    data_dir = os.path.abspath(os.path.expanduser(_DATA_DIR.value))
    if _LIST.value:
        print(format_status(data_dir))
        return 0
    if not _SOURCES.value:
        raise app.UsageError("give --sources=... (or --list)")
    try:
        names = parse_sources(_SOURCES.value)
        source_dirs = parse_source_dirs(_SOURCE_DIRS.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    if _FROM_RECORDS.value and _FROM_MD_TFDS.value:
        raise app.UsageError("give one of --from_records and --from_md_tfds")
    origin = _FROM_RECORDS.value or _FROM_MD_TFDS.value
    if origin:
        if _MD_DUPLICATES.value:
            raise app.UsageError(
                "--md_duplicates_dir does not apply to --from_records / --from_md_tfds: MD's "
                "converter dropped ImageNet's duplicates when it wrote the records"
            )
        if (
            source_dirs
            or _MANUAL_DIR.value
            or _HIERARCHY.value
            or _MD_DATASRC.value
            or _MD_JPEG.value
            or _ALLOW_VDD.value
        ):
            raise app.UsageError(
                "--from_records / --from_md_tfds read everything from Meta-Dataset's files "
                "(ImageNet's graph from its dataset spec, its JPEGs as stored): drop "
                "--source_dirs, --manual_dir, --hierarchy_file, --md_datasrc, --md_jpeg "
                "and --allow_vdd"
            )
        if _WORKERS.value < 0:
            raise app.UsageError(f"--workers must be >= 0, got {_WORKERS.value}")
        workers = _WORKERS.value or os.cpu_count() or 1
        records_dir = os.path.abspath(os.path.expanduser(origin))
        return prepare_from_records(
            names, records_dir, data_dir, workers, md_tfds=bool(_FROM_MD_TFDS.value)
        )
    if _HIERARCHY.value and "ilsvrc_2012" not in names:
        raise app.UsageError("--hierarchy_file applies to ilsvrc_2012 only; add it to --sources")
    failed = []
    for name in names:
        print(f"== {name}", flush=True)
        try:
            if name == GLYPHS:
                benchmarks.prepare(GLYPHS, None, data_dir)  # every domain, prints its own
                continue
            path = benchmarks.prepare(
                "meta_dataset",
                name,
                data_dir,
                source_dir=source_dirs.get(name),
                md_datasrc=None if name in source_dirs else _MD_DATASRC.value,
                md_duplicates_dir=_MD_DUPLICATES.value,
                md_jpeg=_MD_JPEG.value,
                allow_vdd=_ALLOW_VDD.value,
                manual_dir=_MANUAL_DIR.value,
                vdd_annotations_dir=_VDD_DIR.value,
                hierarchy_file=_HIERARCHY.value if name == "ilsvrc_2012" else None,
                max_images_per_class=_MAX_IMAGES.value,
                overwrite=_OVERWRITE.value,
            )
            print(f"   prepared in {path}", flush=True)
        except (ImportError, OSError, ValueError, RuntimeError) as e:
            failed.append(name)
            print(f"   FAILED: {e}", file=sys.stderr, flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def run(argv) -> int:
    """Parses ``argv`` (flags, without the program name) and runs ``main``: for tests."""
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["prepare", *argv])
    return main(["prepare"])


if __name__ == "__main__":
    app.run(main)
