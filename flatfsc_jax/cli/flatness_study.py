"""Command line: the flatness study (:mod:`flatfsc_jax.flatness.study`).

    python -m flatfsc_jax.cli.flatness_study --config=configs/flatness_study.py --workdir=study
        [--stages=train,measure,evaluate,analyse] [--config.study.<key>=<value>]

Thin: parse flags, set up the compilation cache, hand over to ``study.run``. Resumable:
re-run the same command and every finished backbone, measurement and evaluation is kept.
Writes ``<workdir>/study/{results.json, table.md, table.csv, scatter_<measure>.png}``
(docs/flatness-transfer.md).
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/flatness_study.py", "Study config.")
_WORKDIR = flags.DEFINE_string("workdir", "study", "Members' zoos, caches and results go here.")
_STAGES = flags.DEFINE_list("stages", ["train", "measure", "evaluate", "analyse"], "Stages to run.")
_CACHE = flags.DEFINE_string(
    "compilation_cache",
    os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "flatfsc_jax", "jax"
    ),
    "Persistent XLA compilation cache ('' disables it).",
)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; flags take the form --name=value")
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("flatfsc_jax").setLevel(logging.INFO)
    import jax

    if _CACHE.value:
        jax.config.update("jax_compilation_cache_dir", _CACHE.value)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    from flatfsc_jax.flatness import study
    from flatfsc_jax.training import resumable

    try:
        study.run(_CONFIG.value, _WORKDIR.value, tuple(_STAGES.value))
    except (ValueError, OSError, resumable.NonFiniteError) as e:  # as main.py: fixable
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
