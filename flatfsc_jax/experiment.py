"""The main job: data check -> backbone zoo -> fusion -> evaluation -> report.

``run(config, workdir, stages)`` is what ``./run.sh`` / ``python -m flatfsc_jax.main``
execute, holding the workdir's lock (``lock.py``: one writer per workdir). Every stage
checks its inputs before compiling anything (config keys, stages, a writable workdir,
the data, the zoo entries it will reuse) and reuses what is already complete in
``<workdir>/zoo``, under the reuse rules of docs/zoo.md#reliability:

* a complete entry is reused only if the keys that define its backbone
  (``zoo.BACKBONE_KEYS``) equal those of the effective config the run would train it
  with; otherwise the run stops *before training anything*, naming each such entry, the
  changed keys and the choices (``--retrain``, delete the entry, another ``--workdir``):
  a complete backbone may have cost hours and is never thrown away silently;
* an unfinished run of an entry (``train/`` checkpoints, no complete metadata) started
  with other settings is discarded and restarted, saying which keys changed;
* a damaged entry (``best/`` missing or not matching its recorded sha256) is retrained
  by the train stage, saying so; evaluation names it and the fix;
* a fused entry whose source backbone was retrained is fused again by the fuse stage.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time

import jax
import ml_collections

from flatfsc_jax import config_lib, errors, families, lock, profiling
from flatfsc_jax import zoo as zoo_lib
from flatfsc_jax.data import benchmarks, sources
from flatfsc_jax.data import glyphs as glyphs_data
from flatfsc_jax.evaluation import protocol
from flatfsc_jax.fusion import distill, finetune
from flatfsc_jax.profiling import PROFILE
from flatfsc_jax.reporting import atomic, convergence, tables
from flatfsc_jax.training import loop

log = logging.getLogger(__name__)

STAGES = ("train", "fuse", "evaluate")


class WorkdirError(errors.FlatfscError, ValueError):
    """``--workdir`` is not a writable directory."""


def check_stages(stages) -> tuple[str, ...]:
    stages = tuple(stages)
    unknown = sorted(set(stages) - set(STAGES))
    if unknown or not stages:
        raise config_lib.ConfigError(
            f"--stages={','.join(stages)} has {unknown or 'no stage'}; choose from "
            f"{','.join(STAGES)}"
        )
    return stages


def check_workdir(workdir: str) -> None:
    """Fails with the path and the fix unless ``workdir`` is (or can be) a writable dir."""
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.TemporaryFile(dir=workdir):
            pass
    except OSError as e:
        raise WorkdirError(
            f"--workdir={workdir} is not a writable directory ({type(e).__name__}: "
            f"{e.strerror or e}); choose another --workdir"
        ) from e


@dataclasses.dataclass(frozen=True)
class Planned:
    """One zoo entry a run trains or uses, with its effective config."""

    domain: str
    method: str  # training method: erm / sam
    entry_method: str  # zoo name: erm, sam, sam+ft, sam+kd, ...
    cfg: ml_collections.ConfigDict
    fused: bool

    @property
    def kind(self) -> str:
        return zoo_lib.entry_kind(self.entry_method)

    def stored_config(self) -> dict:
        """The config recorded in (and compared with) the entry's metadata."""
        return distill.student_config(self.cfg) if self.kind == "student" else self.cfg.to_dict()

    def describe(self) -> str:
        if self.kind == "student":
            return distill.describe_student(self.cfg)
        return config_lib.describe_entry(self.cfg)


def plan(config: ml_collections.ConfigDict) -> list[Planned]:
    """Every zoo entry of the run (per-domain backbones, then fused ones), in order."""
    out = [
        Planned(d, m, m, config_lib.domain_config(config, d, m), False)
        for m in config.methods
        for d in config.domains
    ]
    if config.fusion.enabled:
        for mode in config_lib.fusion_modes(config):
            if mode == "distill":  # one student per method, under the general domain
                source = config.fusion.source_domain
                for m in config.methods:
                    name = families.fused_method(m, mode)
                    out.append(Planned(source, m, name, config, True))
                continue
            fcfg = finetune.fusion_config(config, mode)
            for m in config.methods:
                for d in finetune.fusion_targets(config):
                    name = families.fused_method(m, mode)
                    out.append(Planned(d, m, name, config_lib.domain_config(fcfg, d, m), True))
    return out


def stale_entries(config, zoo: zoo_lib.Zoo) -> list[tuple[Planned, list[str]]]:
    """Complete planned entries whose backbone-defining keys differ from the config."""
    out = []
    for p in plan(config):
        if not zoo.is_complete(config.benchmark, p.domain, p.entry_method):
            continue
        stored = zoo.get(config.benchmark, p.domain, p.entry_method).metadata.get("config")
        if not isinstance(stored, dict):
            changes = ["config: not recorded in metadata.json"]
        else:
            changes = zoo_lib.config_changes(
                stored,
                p.stored_config(),
                fused=p.kind == "fused",
                student=p.kind == "student",
            )
        if changes:
            out.append((p, changes))
    return out


def check_reuse(config, zoo: zoo_lib.Zoo) -> None:
    """Stops (``StaleEntryError``) before anything trains if a complete entry is stale."""
    if config.retrain:
        return
    stale = stale_entries(config, zoo)
    if not stale:
        return
    lines = [
        f"the zoo {str(zoo.root)!r} has complete entries trained with other settings than "
        "this run's config; reusing them would report the wrong backbones:"
    ]
    for p, changes in stale:
        lines.append(f"  {config.benchmark}/{p.domain}/{p.entry_method}: {'; '.join(changes)}")
    paths = " ".join(
        str(zoo.entry_dir(config.benchmark, p.domain, p.entry_method)) for p, _ in stale
    )
    lines += [
        "Choose one:",
        "  --retrain                       retrain every entry of this run",
        f"  rm -r {paths}",
        "                                  then re-run: retrains only these entries (and "
        "the fused entries built on them)",
        "  --workdir=<another directory>   keep this zoo and train a new one",
    ]
    raise zoo_lib.StaleEntryError("\n".join(lines))


def describe_plan(config, zoo: zoo_lib.Zoo | None = None) -> str:
    """The effective hyper-parameters of every entry (``--dry_run``), and its zoo state."""
    lines = ["entries (effective batch size, lr, steps, restart period, rho):"]
    stale = {(p.domain, p.entry_method): c for p, c in stale_entries(config, zoo)} if zoo else {}
    for p in plan(config):
        line = f"  {config.benchmark}/{p.domain}/{p.entry_method}: {p.describe()}"
        if zoo is not None:
            state, problem = zoo.status(config.benchmark, p.domain, p.entry_method)
            if (p.domain, p.entry_method) in stale:
                state = "STALE: " + "; ".join(stale[(p.domain, p.entry_method)])
            elif state == "complete":
                state = "complete, reused" if not config.retrain else "complete, retrained"
            elif problem:
                state = f"{state}: {problem}"
            line += f"  [{state}]"
        lines.append(line)
    return "\n".join(lines)


def check_fused_sources(config, zoo: zoo_lib.Zoo) -> None:
    """Before evaluation: every fused entry was fine-tuned from the current source."""
    if not config.fusion.enabled:
        return
    for p in plan(config):
        if not p.fused:
            continue
        entry = zoo.get(config.benchmark, p.domain, p.entry_method)
        if p.kind == "student":
            reason = distill.teachers_retrained(
                distill.teacher_checksums(config, zoo, p.method), entry
            )
            if reason:
                raise zoo_lib.StaleEntryError(
                    f"zoo entry {entry.key}: {reason} since it was distilled; run the fuse "
                    "stage again (--stages=fuse,evaluate)"
                )
            continue
        source = zoo.get(config.benchmark, config.fusion.source_domain, p.method)
        recorded = entry.metadata.get("fusion", {}).get("source_sha256")
        if recorded is not None and recorded != source.best_sha256:
            raise zoo_lib.StaleEntryError(
                f"zoo entry {entry.key} was fine-tuned from an earlier {source.key} backbone "
                f"(retrained since); run the fuse stage again (--stages=fuse,evaluate)"
            )


def resolve_paths(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """Fixes ``config.data_dir``: Glyphs defaults to ``<workdir>/data``, else TFDS's."""
    c = ml_collections.ConfigDict(config.to_dict())
    if not c.data_dir:
        if c.benchmark == "glyphs":
            c.data_dir = os.path.join(workdir, "data")
        else:
            c.data_dir = benchmarks.resolve_data_dir(c.data_dir)
    c.data_dir = os.path.abspath(os.path.expanduser(c.data_dir))
    return c


def check_data(config, stages) -> None:
    """Every split the stages will read is prepared and intact (``benchmarks.ensure_prepared``:
    Glyphs is prepared if needed, missing Meta-Dataset sources fail fast)."""
    splits: dict[str, set] = {}
    if "train" in stages or "fuse" in stages:
        for d in config.domains:
            splits.setdefault(d, set()).update(("train", "valid"))
    if "evaluate" in stages and config.evaluation.enabled:
        for d in config.evaluation.domains:
            splits.setdefault(d, set()).add("test")
    try:
        benchmarks.ensure_prepared(config.benchmark, splits, config.data_dir)
    except (sources.MissingDataError, glyphs_data.AssetChecksumError) as e:
        raise errors.DataError(str(e)) from e


def run(config: ml_collections.ConfigDict, workdir: str, stages=STAGES, *, progress=True):
    """Runs the requested stages; returns the evaluation results (or None)."""
    t_start = time.perf_counter()
    PROFILE.reset()
    # run.sh passes the seconds its virtual-environment check took (set-up).
    setup_seconds = float(os.environ.get("FLATFSC_SETUP_SECONDS", 0) or 0)
    if setup_seconds:
        PROFILE.add("setup", setup_seconds)
    stages = check_stages(stages)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    config = resolve_paths(config, workdir)
    config_lib.validate(config, num_devices=jax.device_count())
    plan(config)  # every entry's effective config is valid
    check_workdir(workdir)
    # One writer per workdir (a second run would corrupt checkpoints and metrics).
    with lock.workdir_lock(workdir, take=jax.process_index() == 0):
        return _run_stages(config, workdir, stages, progress, t_start, setup_seconds)


def _run_stages(config, workdir, stages, progress, t_start, setup_seconds):
    zoo = zoo_lib.Zoo(os.path.join(workdir, "zoo"))
    check_reuse(config, zoo)
    with PROFILE.section("data"):
        check_data(config, stages)
    _print(
        f"flatfsc_jax: benchmark {config.benchmark}, domains {', '.join(config.domains)}, "
        f"methods {', '.join(config.methods)}, {jax.device_count()} device(s) "
        f"({jax.devices()[0].platform}), workdir {workdir}"
    )

    if "train" in stages:
        for method in config.methods:
            for domain in config.domains:
                cfg = config_lib.domain_config(config, domain, method)
                reused = zoo.reuse_or_begin(
                    config.benchmark,
                    domain,
                    method,
                    {"config": cfg.to_dict()},
                    retrain=config.retrain,
                    stage="train",
                )
                if reused is not None:
                    continue
                entry = loop.train_and_evaluate(config, zoo, domain, method, progress=progress)
                _print(
                    f"[train] {entry.key}: best validation accuracy "
                    f"{100 * entry.best_accuracy:.2f}%"
                )

    if "fuse" in stages and config.fusion.enabled:
        for method in config.methods:
            for entry in finetune.fuse(config, zoo, method, progress=progress):
                _print(
                    f"[fuse] {entry.key}: best validation accuracy {100 * entry.best_accuracy:.2f}%"
                )

    if jax.process_index() == 0 and ("train" in stages or "fuse" in stages):
        with PROFILE.section("report"):
            write_convergence(config, zoo, os.path.join(workdir, "report", "convergence.png"))

    results = None
    if "evaluate" in stages and config.evaluation.enabled:
        for p in plan(config):  # every backbone is there and intact before compiling
            zoo.get(config.benchmark, p.domain, p.entry_method)
        check_fused_sources(config, zoo)
        results = protocol.evaluate_zoo(config, zoo, progress=progress)
        results["config"] = config.to_dict()
        with PROFILE.section("report"):
            results["wall_seconds"] = time.perf_counter() - t_start + setup_seconds
            results["profile"] = PROFILE.summary(results["wall_seconds"])
            if jax.process_index() == 0:
                paths = tables.write_report(results, os.path.join(workdir, "report"))
                _print("\n" + tables.to_markdown(results))
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
    """Validation curves of this run's domains (every method in the zoo), budget marked.

    Never fatal: the plot is a by-product of trained entries, so a failure is a warning
    naming the file (the zoo is complete either way).
    """
    try:
        curves = convergence.read_curves(zoo, config.benchmark)
        curves = {d: curves[d] for d in config.domains if d in curves}
        if not curves:
            return
        budgets = {d: int(config_lib.domain_config(config, d, "erm").num_steps) for d in curves}
        with atomic.staged(os.path.dirname(path)) as tmp:
            staged = os.path.join(tmp, os.path.basename(path))
            convergence.plot_convergence(curves, staged, budgets=budgets, title=config.benchmark)
    except Exception as e:  # noqa: BLE001 - a plot must not stop a run whose entries are done
        log.warning(
            "validation curves not written to %s (%s: %s); the zoo entries are complete",
            path,
            type(e).__name__,
            e,
        )
        return
    _print(f"validation curves written: {path}")


def _print(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)
