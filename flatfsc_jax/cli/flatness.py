"""Command line: flatness of the zoo's ERM and SAM backbones (:mod:`flatfsc_jax.flatness.zoo`).

    python -m flatfsc_jax.cli.flatness --workdir=work [--benchmark=glyphs]
        [--data_dir=<workdir>/data] [--examples=512] [--rho=0.05] [--fused]
        [--landscape_2d=<domain>] [--out=<workdir>/flatness]

after ``./run.sh`` has filled ``<workdir>/zoo``. Writes ``flatness.json`` (everything,
landscapes included), ``flatness.md`` (a table: one row per domain, ERM next to SAM for
every measure), ``flatness.csv`` (one row per backbone), ``landscape_<domain>.png`` (the
1-D landscapes of a domain's backbones on one plot) and, with ``--landscape_2d``,
``landscape2d_<domain>.png`` (contours). What is measured:
:mod:`flatfsc_jax.flatness.zoo`.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from absl import app, flags

from flatfsc_jax import errors, lock
from flatfsc_jax import zoo as zoo_lib
from flatfsc_jax.flatness import report as flatness_report
from flatfsc_jax.flatness import zoo as mf

_DEFAULTS = mf.FlatnessSettings()

_WORKDIR = flags.DEFINE_string("workdir", "work", "The run's workdir (zoo in <workdir>/zoo).")
_BENCHMARK = flags.DEFINE_string("benchmark", "glyphs", "Benchmark of the zoo entries.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Default: <workdir>/data.")
_OUT = flags.DEFINE_string("out", None, "Default: <workdir>/flatness.")
_EXAMPLES = flags.DEFINE_integer("examples", _DEFAULTS.examples, "Training images per domain.")
_RHO = flags.DEFINE_float("rho", _DEFAULTS.rho, "Radius of the rho-sharpness ball.")
_SHARPNESS_STEPS = flags.DEFINE_integer(
    "sharpness_steps", _DEFAULTS.sharpness_steps, "Projected ascent steps after SAM's point."
)
_POWER_ITERS = flags.DEFINE_integer(
    "power_iters", _DEFAULTS.power_iters, "Most Hessian-vector products of the power iteration."
)
_POWER_TOL = flags.DEFINE_float(
    "power_tol",
    _DEFAULTS.power_tol,
    "Relative tolerance that stops the power iteration early (0: never).",
)
_TRACE_SAMPLES = flags.DEFINE_integer(
    "trace_samples", _DEFAULTS.trace_samples, "Rademacher probes of the Hutchinson trace."
)
_ALPHAS = flags.DEFINE_string(
    "alphas", None, "1-D landscape grid 'start,stop,num' (default -1,1,21)."
)
_SEED = flags.DEFINE_integer("seed", _DEFAULTS.seed, "Seeds the images, directions and probes.")
_FUSED = flags.DEFINE_bool("fused", False, "Also the erm+ft / sam+ft ... entries.")
_DOMAINS = flags.DEFINE_list("domains", None, "Comma-separated subset of domains.")
_LANDSCAPE_2D = flags.DEFINE_string(
    "landscape_2d", None, "Also draw 2-D landscapes for this domain."
)
_GRID_2D = flags.DEFINE_integer("grid_2d", _DEFAULTS.grid_2d, "Points per axis of the 2-D grid.")
_CACHE = flags.DEFINE_string(
    "compilation_cache",
    os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "flatfsc_jax", "jax"
    ),
    "Persistent XLA compilation cache ('' disables it).",
)


def _parse_alphas(text: str | None) -> tuple[float, ...]:
    if text is None:
        return mf.DEFAULT_ALPHAS
    try:
        start, stop, num = text.split(",")
        return tuple(float(a) for a in np.linspace(float(start), float(stop), int(num)))
    except ValueError as e:
        raise ValueError(f"alphas={text!r} must be 'start,stop,num', e.g. -1,1,21") from e


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; flags take the form --name=value")
    logging.getLogger().setLevel(logging.WARNING)
    try:
        settings = mf.FlatnessSettings(
            examples=_EXAMPLES.value,
            rho=_RHO.value,
            sharpness_steps=_SHARPNESS_STEPS.value,
            power_iters=_POWER_ITERS.value,
            power_tol=_POWER_TOL.value or None,
            trace_samples=_TRACE_SAMPLES.value,
            alphas=_parse_alphas(_ALPHAS.value),
            grid_2d=_GRID_2D.value,
            seed=_SEED.value,
        )
    except ValueError as e:
        raise SystemExit(f"flatness: --{e}") from e
    if _CACHE.value:
        jax.config.update("jax_compilation_cache_dir", _CACHE.value)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    workdir = _WORKDIR.value
    data_dir = _DATA_DIR.value or os.path.join(workdir, "data")
    out = _OUT.value or os.path.join(workdir, "flatness")
    domains = [d for d in _DOMAINS.value if d] if _DOMAINS.value else None
    zoo_root = os.path.join(workdir, "zoo")
    try:  # the user's mistakes become one-line messages; anything later is a real error
        entries = mf.select_entries(
            zoo_lib.Zoo(zoo_root), benchmark=_BENCHMARK.value, fused=_FUSED.value, domains=domains
        )
        mf.check_landscape_domain(entries, _LANDSCAPE_2D.value)
    except (mf.EmptyZooError, ValueError) as e:
        raise SystemExit(f"flatness: {e}") from e
    try:
        with lock.workdir_lock(workdir):
            _measure_and_write(zoo_root, data_dir, out, domains, settings)
    except errors.WorkdirLockedError as e:
        raise SystemExit(f"flatness: {e}") from e


def _measure_and_write(zoo_root, data_dir, out, domains, settings) -> None:
    results = mf.measure_zoo(
        zoo_root,
        data_dir,
        benchmark=_BENCHMARK.value,
        fused=_FUSED.value,
        domains=domains,
        landscape_2d_domain=_LANDSCAPE_2D.value,
        settings=settings,
        progress=lambda line: print(line, flush=True),
    )
    paths = flatness_report.write_flatness_report(results, out)
    print()
    print(flatness_report.flatness_markdown(results))
    print(f"measured {len(results['entries'])} backbones in {results['seconds']:.1f} s; written:")
    for name in ("json", "markdown", "csv"):
        print("  " + paths[name])
    for path in [*paths["landscapes"].values(), *paths["landscapes_2d"].values()]:
        print("  " + path)


if __name__ == "__main__":
    app.run(main)
