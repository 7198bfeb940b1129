"""The main job: data check -> backbone zoo -> fusion -> evaluation -> report.

``run(config, workdir, stages)`` is what ``./run.sh`` / ``python -m flatfsc_jax.main``
execute. Every stage reuses what is already complete in ``<workdir>/zoo`` (a second run
retrains nothing unless ``--config.retrain=True``), and every stage checks its inputs
before compiling anything: missing data sources are listed together with the command
that prepares them.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import ml_collections

from flatfsc_jax import config_lib, convergence, fusion, profiling, protocol, report, train
from flatfsc_jax import zoo as zoo_lib
from flatfsc_jax.profiling import PROFILE

log = logging.getLogger(__name__)

STAGES = ("train", "fuse", "evaluate")


def resolve_paths(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """Fixes ``config.data_dir``: Glyphs defaults to ``<workdir>/data``, else TFDS's."""
    c = ml_collections.ConfigDict(config.to_dict())
    if not c.data_dir:
        if c.benchmark == "glyphs":
            c.data_dir = os.path.join(workdir, "data")
        else:
            c.data_dir = train.resolve_data_dir(c)
    c.data_dir = os.path.abspath(os.path.expanduser(c.data_dir))
    return c


def check_data(config, stages) -> None:
    """Prepares Glyphs if needed; for other benchmarks fails fast listing missing sources."""
    needed = set()
    if "train" in stages or "fuse" in stages:
        needed |= set(config.domains)
    if "evaluate" in stages and config.evaluation.enabled:
        needed |= set(config.evaluation.domains)
    if config.benchmark == "glyphs":
        from flatfsc_jax.data import glyphs

        glyphs.prepare(config.data_dir, domains=sorted(needed))
        return
    from flatfsc_jax.data import meta_dataset

    meta_dataset.require_sources(sorted(needed), config.data_dir)


def run(config: ml_collections.ConfigDict, workdir: str, stages=STAGES, *, progress=True):
    """Runs the requested stages; returns the evaluation results (or None)."""
    t_start = time.perf_counter()
    PROFILE.reset()
    # run.sh passes the seconds its virtual-environment check took (set-up).
    setup_seconds = float(os.environ.get("FLATFSC_SETUP_SECONDS", 0) or 0)
    if setup_seconds:
        PROFILE.add("setup", setup_seconds)
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"--stages has {sorted(unknown)}; choose from {STAGES}")
    workdir = os.path.abspath(os.path.expanduser(workdir))
    config = resolve_paths(config, workdir)
    config_lib.validate(config, num_devices=jax.device_count())
    with PROFILE.section("data"):
        check_data(config, stages)
    zoo = zoo_lib.Zoo(os.path.join(workdir, "zoo"))
    _print(
        f"flatfsc_jax: benchmark {config.benchmark}, domains {', '.join(config.domains)}, "
        f"methods {', '.join(config.methods)}, {jax.device_count()} device(s) "
        f"({jax.devices()[0].platform}), workdir {workdir}"
    )

    if "train" in stages:
        for method in config.methods:
            for domain in config.domains:
                if zoo.is_complete(config.benchmark, domain, method) and not config.retrain:
                    _print(f"[train] {config.benchmark}/{domain}/{method}: complete, reusing it")
                    continue
                if config.retrain:
                    zoo.invalidate(config.benchmark, domain, method)
                entry = train.train_and_evaluate(config, zoo, domain, method, progress=progress)
                _print(
                    f"[train] {entry.key}: best validation accuracy "
                    f"{100 * entry.best_accuracy:.2f}%"
                )

    if "fuse" in stages and config.fusion.enabled:
        for method in config.methods:
            for entry in fusion.fuse(config, zoo, method, progress=progress):
                _print(
                    f"[fuse] {entry.key}: best validation accuracy {100 * entry.best_accuracy:.2f}%"
                )

    if jax.process_index() == 0 and ("train" in stages or "fuse" in stages):
        with PROFILE.section("report"):
            write_convergence(config, zoo, os.path.join(workdir, "report", "convergence.png"))

    results = None
    if "evaluate" in stages and config.evaluation.enabled:
        results = protocol.evaluate_zoo(config, zoo, progress=progress)
        results["config"] = config.to_dict()
        with PROFILE.section("report"):
            results["wall_seconds"] = time.perf_counter() - t_start + setup_seconds
            results["profile"] = PROFILE.summary(results["wall_seconds"])
            if jax.process_index() == 0:
                paths = report.write_report(results, os.path.join(workdir, "report"))
                _print("\n" + report.to_markdown(results))
                _print("report written: " + ", ".join(paths.values()))
    total = time.perf_counter() - t_start + setup_seconds
    summary = PROFILE.summary(total)
    if jax.process_index() == 0:
        _print("\nwhere the time went (profiling.py):\n" + profiling.format_summary(summary))
        os.makedirs(os.path.join(workdir, "report"), exist_ok=True)
        with open(os.path.join(workdir, "report", "profile.json"), "w") as f:
            json.dump(summary, f, indent=2)
    _print(f"done in {total:.0f} s")
    return results


def write_convergence(config, zoo: zoo_lib.Zoo, path: str) -> None:
    """Validation curves of this run's domains (every method in the zoo), budget marked."""
    curves = convergence.read_curves(zoo, config.benchmark)
    curves = {d: curves[d] for d in config.domains if d in curves}
    if not curves:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    budgets = {d: int(config_lib.domain_config(config, d, "erm").num_steps) for d in curves}
    convergence.plot_convergence(curves, path, budgets=budgets, title=config.benchmark)
    _print(f"validation curves written: {path}")


def _print(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)
