"""The shared command line of the population drivers (the flatness study, the frontier).

Thin: flags, the compilation cache, a call of the driver's ``run(config, workdir,
stages)``; fixable errors are printed as one line with exit status 2, as main.py does.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from absl import app, flags
from ml_collections import config_flags

STAGES = ["train", "measure", "evaluate", "analyse"]


def main_for(default_config: str, default_workdir: str, run: Callable[[], Callable]) -> None:
    """Defines the flags and runs ``run()(config, workdir, stages)`` under absl."""
    config = config_flags.DEFINE_config_file("config", default_config, "Driver config.")
    workdir = flags.DEFINE_string(
        "workdir", default_workdir, "Members' zoos, caches and results go here."
    )
    stages = flags.DEFINE_list("stages", STAGES, "Stages to run (resumable, in this order).")
    cache = flags.DEFINE_string(
        "compilation_cache",
        os.path.join(
            os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "flatfsc_jax", "jax"
        ),
        "Persistent XLA compilation cache ('' disables it).",
    )

    def main(argv) -> None:
        if len(argv) > 1:
            raise app.UsageError(
                f"unexpected arguments {argv[1:]}; flags take the form --name=value"
            )
        logging.getLogger().setLevel(logging.WARNING)
        logging.getLogger("flatfsc_jax").setLevel(logging.INFO)
        import jax

        if cache.value:
            jax.config.update("jax_compilation_cache_dir", cache.value)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
        from flatfsc_jax.training import resumable

        try:
            run()(config.value, workdir.value, tuple(stages.value))
        except (ValueError, OSError, resumable.NonFiniteError) as e:  # as main.py: fixable
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    app.run(main)
