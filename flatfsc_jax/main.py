"""Command line: ``python -m flatfsc_jax.main --config=configs/<x>.py[:arg] --workdir=DIR``.

Thin on purpose (flax examples/imagenet style): parse flags, set up JAX (compilation
cache, multi-host), hand over to ``experiment.run``. ``./run.sh`` forwards its flags here.

  --config.<key>=<value>   override any config key, e.g. --config.per_domain.latin.rho=0.1
  --stages=train,fuse,evaluate
  --retrain                retrain zoo entries that are already complete
  --dry_run                validate everything, print the config and every entry's
                           effective batch size / lr / steps / restart period / rho
  --traceback              show the traceback of an expected failure

Expected failures (``errors.FlatfscError``: a bad config value, missing data, a damaged
or stale zoo entry, an unwritable or busy workdir, a diverged run) print one message
naming the key or path and the fix and exit with status 2; anything else is a bug and
shows its traceback.
  --distributed            call jax.distributed.initialize() (SLURM / TPU pods detect
                           everything; otherwise give --coordinator_address,
                           --num_processes and --process_id)
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/glyphs.py", "Experiment config.")
_WORKDIR = flags.DEFINE_string("workdir", "work", "Zoo, logs and reports go here.")
_STAGES = flags.DEFINE_list("stages", ["train", "fuse", "evaluate"], "Stages to run.")
_RETRAIN = flags.DEFINE_bool("retrain", False, "Retrain complete zoo entries.")
_ENTRIES = flags.DEFINE_string(
    "entries",
    None,
    "k/n: train and fuse only this process's share of the zoo (one process per GPU, "
    "docs/scale.md#one-process-per-gpu).",
)
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Multi-host: jax.distributed.initialize().")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Validate and print the resolved config, then exit (nothing runs)."
)
_TRACEBACK = flags.DEFINE_bool(
    "traceback", False, "Show the traceback of expected failures (bad config, data, zoo)."
)
_CACHE = flags.DEFINE_string(
    "compilation_cache",
    os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "flatfsc_jax", "jax"
    ),
    "Persistent XLA compilation cache ('' disables it).",
)


def setup_jax() -> None:
    import jax

    if _CACHE.value:
        jax.config.update("jax_compilation_cache_dir", _CACHE.value)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    if _DISTRIBUTED.value:
        # CPU collectives across processes need gloo (docs/install.md#multi-device-and-multi-host);
        # the setting only
        # affects the CPU backend, so it is harmless on GPU/TPU hosts.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )


def expected_errors() -> tuple[type[BaseException], ...]:
    """Failures a user can fix from the message alone (no traceback shown)."""
    from flatfsc_jax import errors

    # Only our own types: a ValueError or OSError from anywhere else is a bug and keeps
    # its traceback. Data errors are wrapped by experiment.check_data.
    return (errors.FlatfscError,)


def dry_run(config, workdir: str, stages) -> None:
    """Validates everything a run checks before compiling, prints what it would train."""
    from flatfsc_jax import config_lib, experiment
    from flatfsc_jax import zoo as zoo_lib

    experiment.check_stages(stages)
    config = experiment.resolve_paths(config, os.path.abspath(os.path.expanduser(workdir)))
    config_lib.validate(config)
    print(config)
    zoo_root = os.path.join(os.path.abspath(os.path.expanduser(workdir)), "zoo")
    zoo = zoo_lib.Zoo(zoo_root) if os.path.isdir(zoo_root) else None
    print(experiment.describe_plan(config, zoo))


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; flags take the form --name=value")
    logging.getLogger("absl").setLevel(logging.WARNING)
    # absl shows INFO logs of every library, and those are nothing a user can act on:
    # with JAX_PLATFORMS unset jax probes each backend it knows and logs the absent ones
    # ("Unable to initialize backend 'tpu'": no libtpu on a CPU/GPU host); matplotlib
    # logs building its font cache. Keep third-party logs at WARNING (jax's warnings, a
    # failing platform named in JAX_PLATFORMS, still show) and our own at INFO.
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("flatfsc_jax").setLevel(logging.INFO)
    config = _CONFIG.value
    if _RETRAIN.value:
        config.retrain = True
    try:
        if _DRY_RUN.value:
            dry_run(config, _WORKDIR.value, tuple(_STAGES.value))
            return
        setup_jax()
        from flatfsc_jax import experiment

        experiment.run(config, _WORKDIR.value, tuple(_STAGES.value), entries=_ENTRIES.value)
    except expected_errors() as e:
        if _TRACEBACK.value:
            raise
        print(f"error: {e}\n(--traceback shows where it happened)", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
