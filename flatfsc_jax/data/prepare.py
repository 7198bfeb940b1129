"""Command line: prepare benchmark sources into a TFDS data directory, or list their status.

  python -m flatfsc_jax.data.prepare --sources=omniglot,dtd --data_dir=~/tensorflow_datasets
  python -m flatfsc_jax.data.prepare --sources=seen --manual_dir=~/imagenet \\
      --source_dirs=fungi=~/fungi                  # all 8 seen Meta-Dataset sources
  python -m flatfsc_jax.data.prepare --sources=glyphs  # the embedded Glyphs benchmark
  python -m flatfsc_jax.data.prepare --list         # prepared or not, classes/images

Meta-Dataset sources come from the TFDS catalogue (downloaded and prepared by TFDS, then
converted: needs TensorFlow, ``pip install -e .[prepare]``), or, with
``--source_dirs=<source>=<dir>``, from an original archive directory without TensorFlow
(fungi is not in the catalogue and always needs one; see ``meta_dataset.local_examples``).
``--sources`` accepts names, ``all``, ``seen``, ``unseen`` and ``glyphs``.

Storage: images are kept as zlib-compressed 84x84x3 uint8, about 3.7 KB for a QuickDraw
drawing (measured on synthetic strokes), so all ~50M QuickDraw drawings take ~185 GB;
``--max_images_per_class=N`` keeps the first N images of each class in catalogue order
(Meta-Dataset itself uses all of them). Each split is one pass over the catalogue.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from flatfsc_jax.data import benchmarks, meta_dataset

GROUPS = {
    "all": meta_dataset.ALL_SOURCES,
    "seen": meta_dataset.SEEN_SOURCES,
    "unseen": meta_dataset.UNSEEN_SOURCES,
}
GLYPHS = "glyphs"


def parse_sources(text: str) -> list[str]:
    """``"seen,mscoco"`` -> Meta-Dataset names (+ "glyphs"), in order, without repeats."""
    names: list[str] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if item in GROUPS:
            names.extend(GROUPS[item])
        elif item == GLYPHS or item in meta_dataset.SOURCES:
            names.append(item)
        else:
            raise ValueError(
                f"--sources has unknown source {item!r}; choose from "
                f"{list(meta_dataset.ALL_SOURCES)}, {sorted(GROUPS)} or {GLYPHS!r}"
            )
    if not names:
        raise ValueError("--sources is empty; name at least one source (or use --list)")
    return list(dict.fromkeys(names))


def parse_source_dirs(text: str | None) -> dict[str, str]:
    """``"fungi=/d/fungi,aircraft=/d/fgvc"`` -> {source: directory}."""
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
        elif spec.catalogue is None:
            how = "needs --source_dirs (not in the TFDS catalogue)"
        elif spec.catalogue.manual_download:
            how = f"from {spec.catalogue.name}, needs --manual_dir"
        else:
            how = f"from {spec.catalogue.name}"
        lines.append(
            f"  {name:<13} {'seen' if spec.seen else 'unseen':<7} "
            f"{'yes' if status['prepared'] else 'no':<9} "
            + " ".join(f"{c:<16}" for c in cells)
            + how
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flatfsc_jax.data.prepare",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--sources", help="comma list: names, all, seen, unseen, glyphs")
    parser.add_argument("--data_dir", default="~/tensorflow_datasets", help="TFDS data dir")
    parser.add_argument("--manual_dir", help="TFDS manual download dir (imagenet2012)")
    parser.add_argument(
        "--source_dirs", help="comma list <source>=<original archive dir> (fungi needs one)"
    )
    parser.add_argument(
        "--vdd_annotations_dir",
        help="decathlon-1.0/annotations (class names of aircraft), if not in data_dir/downloads",
    )
    parser.add_argument(
        "--hierarchy_file",
        help="ilsvrc_2012 only: wordnet.is_a.txt or Meta-Dataset's ilsvrc_2012_dataset_spec.json",
    )
    parser.add_argument(
        "--max_images_per_class", type=int, help="keep the first N images per class"
    )
    parser.add_argument("--overwrite", action="store_true", help="rebuild prepared sources")
    parser.add_argument("--list", action="store_true", help="show each source's status")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    data_dir = os.path.abspath(os.path.expanduser(args.data_dir))
    if args.list:
        print(format_status(data_dir))
        return 0
    if not args.sources:
        parser.error("give --sources=... (or --list)")
    try:
        names = parse_sources(args.sources)
        source_dirs = parse_source_dirs(args.source_dirs)
    except ValueError as e:
        parser.error(str(e))
    if args.hierarchy_file and "ilsvrc_2012" not in names:
        parser.error("--hierarchy_file applies to ilsvrc_2012 only; add it to --sources")
    failed = []
    for name in names:
        print(f"== {name}", flush=True)
        try:
            if name == GLYPHS:
                benchmarks.prepare(GLYPHS, None, data_dir)  # every domain, prints its own
                continue
            path = benchmarks.prepare(
                meta_dataset.BENCHMARK,
                name,
                data_dir,
                source_dir=source_dirs.get(name),
                manual_dir=args.manual_dir,
                vdd_annotations_dir=args.vdd_annotations_dir,
                hierarchy_file=args.hierarchy_file if name == "ilsvrc_2012" else None,
                max_images_per_class=args.max_images_per_class,
                overwrite=args.overwrite,
            )
            print(f"   prepared in {path}", flush=True)
        except (ImportError, OSError, ValueError, RuntimeError) as e:
            failed.append(name)
            print(f"   FAILED: {e}", file=sys.stderr, flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
