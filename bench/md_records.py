"""Throughput of ``prepare --from_records`` on a miniature Meta-Dataset in MD's format.

Writes miniature records (``flatfsc_jax.data.meta_dataset.miniature``) with images of a
chosen size range (ImageNet's JPEGs are ~400x350 px, QuickDraw's 28 px) and prepares one
source from them, once per worker count, printing the per-source table of the prepare
command (input size, peak disk, time, output size, images/s). The class conversion
(decode + resize) is the parallel part; the TFDS write that follows is serial.

    .venv/bin/python bench/md_records.py                       # dtd, 300-500 px, 1 and 2 workers
    .venv/bin/python bench/md_records.py --size 28 28 --workers 1 4 8
"""

from __future__ import annotations

import argparse
import os
import tempfile

from flatfsc_jax.data.meta_dataset import builder, miniature


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="dtd")
    parser.add_argument("--size", type=int, nargs=2, default=(300, 500), help="min max px")
    parser.add_argument("--classes", type=int, default=6, help="classes per split")
    parser.add_argument("--images", type=int, default=20, help="images per class")
    parser.add_argument("--workers", type=int, nargs="+", default=(1, 2))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        mini = miniature.write_miniature(
            os.path.join(root, "records"),
            sources=[args.source],
            classes_per_split=args.classes,
            images_per_class=(args.images, args.images),
            image_size=tuple(args.size),
        )
        reports = []
        for workers in args.workers:
            data_dir = os.path.join(root, f"data{workers}")
            report = builder.prepare_from_records(args.source, mini.root, data_dir, workers=workers)
            reports.append(report)
            print(f"workers={workers}: {report.images / report.seconds:.0f} images/s", flush=True)
        print(builder.format_records_table(reports))


if __name__ == "__main__":
    main()
