"""Embedding a million images through the project's embedding function, in bounded memory.

    .venv/bin/python bench/embed_many.py                            # 1M images, ResNet-18, 84 px
    .venv/bin/python bench/embed_many.py --num-images 4096 --arch resnet10 --width 0.125

The images are ``--num-images`` stream positions over a pool of ``--pool`` distinct
random uint8 images (generated once), embedded ``--chunk`` at a time by
``ncc.embed_split`` (the function validation and testing call) with a randomly
initialised backbone. Each chunk's [chunk, D] float32 table is reduced to a checksum and
dropped, so host memory is bounded by the pool, one chunk of images and one chunk of
embeddings, whatever ``--num-images``: the peak RSS is printed to show it. Prints img/s
(compilation excluded) and writes ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from flatfsc_jax import models  # noqa: E402
from flatfsc_jax.data.sources import SplitData  # noqa: E402
from flatfsc_jax.evaluation import ncc  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-images", type=int, default=1_000_000)
    parser.add_argument("--pool", type=int, default=4096, help="distinct images")
    parser.add_argument("--chunk", type=int, default=32768, help="images per embed_split call")
    parser.add_argument("--batch", type=int, default=1024, help="embed_split batch_size")
    parser.add_argument("--image-size", type=int, default=84)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    for name in ("num_images", "pool", "chunk", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")

    shape = (args.image_size, args.image_size, args.channels)
    pool = np.random.default_rng(0).integers(0, 256, (args.pool, *shape), dtype=np.uint8)
    model = models.build_model(args.arch, 10, width=args.width, dtype=args.dtype)
    variables = jax.jit(model.init)(jax.random.key(0), np.zeros((1, *shape), np.float32))
    chunk = min(args.chunk, args.num_images)
    names = [str(c) for c in range(10)]

    def chunk_split(start: int) -> SplitData:
        positions = np.arange(start, min(start + chunk, args.num_images))
        images = pool[positions % args.pool]  # one chunk of images, materialised
        return SplitData("bench/embed", "test", images, positions % 10, names)

    start = time.perf_counter()
    ncc.embed_split(model, variables, chunk_split(0), batch_size=args.batch)  # compiles
    compile_s = time.perf_counter() - start
    checksum, done, rss_after_first = 0.0, 0, None
    start = time.perf_counter()
    for first in range(0, args.num_images, chunk):
        split = chunk_split(first)
        table = ncc.embed_split(model, variables, split, batch_size=args.batch)
        checksum += float(np.sum(table, dtype=np.float64))
        done += len(table)
        del split, table
        if rss_after_first is None:
            rss_after_first = peak_rss_mib()
    seconds = time.perf_counter() - start
    result = {
        "num_images": done,
        "img_s": done / seconds,
        "seconds": seconds,
        "compile_and_first_chunk_s": compile_s,
        "embedding_dim": model.embedding_dim,
        "peak_rss_mib_after_first_chunk": rss_after_first,
        "peak_rss_mib": peak_rss_mib(),
        "checksum": checksum,
        "settings": vars(args),
        "device_kind": jax.devices()[0].device_kind,
    }
    print(
        f"embedded {done} images ({args.arch} x{args.width:g} {args.dtype}, "
        f"{'x'.join(map(str, shape))}, batch {args.batch}): {result['img_s']:.0f} img/s, "
        f"{seconds:.1f} s; peak RSS {result['peak_rss_mib']:.0f} MiB "
        f"(after the first chunk {rss_after_first:.0f} MiB)",
        flush=True,
    )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
