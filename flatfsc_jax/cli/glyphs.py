"""Command line: the embedded Glyphs benchmark's data card, and writing its TFDS sources.

  python -m flatfsc_jax.cli.glyphs --describe [--faces]        # the data card
  python -m flatfsc_jax.cli.glyphs --prepare --data_dir=DIR [--domains=latin,thai]

The job prepares Glyphs on demand; this is for inspecting it or preparing it ahead.
"""

from __future__ import annotations

import sys
import time

from absl import app, flags

from flatfsc_jax.data import glyphs

_DESCRIBE = flags.DEFINE_bool("describe", False, "Print the data card.")
_FACES = flags.DEFINE_bool("faces", False, "With --describe: list every face.")
_PREPARE = flags.DEFINE_bool("prepare", False, "Write the TFDS sources.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory (with --prepare).")
_DOMAINS = flags.DEFINE_list("domains", None, "Domains to prepare (default: all).")
_ASSETS_DIR = flags.DEFINE_string(
    "assets_dir", None, f"Another rendered copy (default ${glyphs.ASSETS_ENV} or the shipped one)."
)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not (_DESCRIBE.value or _PREPARE.value):
        raise app.UsageError("nothing to do: pass --describe and/or --prepare --data_dir=DIR")
    if _DESCRIBE.value:
        print(glyphs.describe(glyphs.data_card(_ASSETS_DIR.value), faces=_FACES.value))
    if _PREPARE.value:
        if not _DATA_DIR.value:
            raise app.UsageError("--prepare needs --data_dir=DIR")
        try:
            start = time.perf_counter()
            glyphs.prepare(_DATA_DIR.value, _DOMAINS.value, assets_dir=_ASSETS_DIR.value)
            print(f"done in {time.perf_counter() - start:.1f} s")
        except (ValueError, FileNotFoundError) as e:
            sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
