"""The main job: data check -> backbone zoo -> fusion -> evaluation -> report.

``run(config, workdir, stages)`` is what ``./run.sh`` / ``python -m flatfsc_jax.main``
execute, holding the workdir's lock (``lock.py``: one writer per workdir). Every stage
checks its inputs before compiling anything (config keys, stages, a writable workdir,
the data, the zoo entries it will reuse) and reuses what is already complete in
``<workdir>/zoo``, under the reuse rules of docs/zoo.md#reliability:

* a complete entry is reused only if the keys that define its backbone
  (``entry_keys.BACKBONE_KEYS``) equal those of the effective config the run would train it
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
from etils import epath

from flatfsc_jax import config_lib, entry_keys, errors, families, lock, profiling
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
        if "://" in workdir:  # cloud storage: epath, never a local "gs:" folder
            epath.Path(workdir).mkdir(parents=True, exist_ok=True)
        else:
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
        return entry_keys.entry_kind(self.entry_method)

    def stored_config(self) -> dict:
        """The config recorded in (and compared with) the entry's metadata."""
        return distill.student_config(self.cfg) if self.kind == "student" else self.cfg.to_dict()

    def describe(self) -> str:
        if self.kind == "student":
            return distill.describe_student(self.cfg, self.method)
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


def entry_cost(p: Planned) -> float:
    """Relative training cost of a planned entry: images per step times steps, twice for
    SAM (two forward-backward passes; the measured ratio is ~1.6x, docs/scale.md)."""
    if p.kind == "student":
        dc = p.cfg.fusion.distill
        images = sum(int(dc.batch_size[d]) for d in p.cfg.domains) * int(dc.num_steps)
    else:
        images = int(p.cfg.batch_size) * int(p.cfg.num_steps)
    return images * (2.0 if p.method == "sam" else 1.0)


def parse_shard(spec: str) -> tuple[int, int]:
    """``"k/n"`` -> ``(k, n)`` with ``0 <= k < n``; the error names the flag and the fix."""
    try:
        k, n = (int(x) for x in str(spec).split("/"))
    except ValueError:
        k, n = -1, 0
    if not 0 <= k < n:
        raise ValueError(
            f"--entries={spec!r} must be k/n with 0 <= k < n (this process's share of n), "
            f"e.g. --entries=0/8"
        )
    return k, n


def shard_entries(config, spec: str) -> set[tuple[str, str]]:
    """The ``(domain, entry_method)`` entries process ``k`` of ``n`` trains or fuses.

    Deterministic (every process computes the same split from the config alone) and
    balanced: per phase (backbones, then fused entries, which start from trained
    backbones) the most costly entry goes to the least loaded share (:func:`entry_cost`).
    The shares of all ``k`` are disjoint and cover :func:`plan`
    (docs/scale.md#one-process-per-gpu).
    """
    k, n = parse_shard(spec)
    mine = set()
    for fused in (False, True):
        load = [0.0] * n
        phase = [p for p in plan(config) if p.fused == fused]
        for p in sorted(phase, key=lambda p: (-entry_cost(p), p.domain, p.entry_method)):
            share = min(range(n), key=lambda i: (load[i], i))
            load[share] += entry_cost(p)
            if share == k:
                mine.add((p.domain, p.entry_method))
    return mine


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
            changes = entry_keys.config_changes(
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


def evaluated_entries(config) -> list[tuple[str, str]]:
    """(domain, method) of every zoo entry the evaluate stage reads: the run's plan, or,
    with ``config.evaluation.families`` (which may name imported backbones), the entries
    those families use on the evaluation domains."""
    if not config.evaluation.get("families"):
        return [(p.domain, p.entry_method) for p in plan(config)]
    return list(
        dict.fromkeys(
            c
            for fam in families.families(config)
            for d in config.evaluation.domains
            for c in protocol.candidate_backbones(config, fam, d)
        )
    )


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
    c.data_dir = zoo_lib.resolve_path(c.data_dir)  # a gs:// URL stays one
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


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    stages=STAGES,
    *,
    progress=True,
    entries: str | None = None,
):
    """Runs the requested stages; returns the evaluation results (or None).

    ``entries="k/n"``: train and fuse only this process's share (:func:`shard_entries`),
    so n processes, one per GPU, fill one zoo concurrently; then one run evaluates
    (docs/scale.md#one-process-per-gpu).
    """
    t_start = time.perf_counter()
    PROFILE.reset()
    # run.sh passes the seconds its virtual-environment check took (set-up).
    setup_seconds = float(os.environ.get("FLATFSC_SETUP_SECONDS", 0) or 0)
    if setup_seconds:
        PROFILE.add("setup", setup_seconds)
    stages = check_stages(stages)
    workdir = zoo_lib.resolve_path(workdir)  # a gs:// URL stays one (etils.epath)
    config = resolve_paths(config, workdir)
    config_lib.validate(config, num_processes=jax.process_count())
    plan(config)  # every entry's effective config is valid
    mine = None if entries is None else shard_entries(config, entries)
    check_workdir(workdir)
    # One writer per workdir (a second run would corrupt checkpoints and metrics); shares
    # of one zoo write together, entry by entry (lock.py).
    with lock.workdir_lock(workdir, take=jax.process_index() == 0, shared=mine is not None):
        return _run_stages(config, workdir, stages, progress, t_start, setup_seconds, entries, mine)


def _run_stages(config, workdir, stages, progress, t_start, setup_seconds, entries, mine):
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
                if mine is not None and (domain, method) not in mine:
                    continue
                cfg = config_lib.domain_config(config, domain, method)
                with zoo.entry_lock(config.benchmark, domain, method):
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
        only = None if mine is None else (lambda d, m: (d, m) in mine)
        for method in config.methods:
            for entry in finetune.fuse(config, zoo, method, progress=progress, only=only):
                _print(
                    f"[fuse] {entry.key}: best validation accuracy {100 * entry.best_accuracy:.2f}%"
                )

    # A share (entries=k/n) leaves the figure to avoid n processes writing one file.
    if jax.process_index() == 0 and ("train" in stages or "fuse" in stages) and mine is None:
        with PROFILE.section("report"):
            write_convergence(config, zoo, os.path.join(workdir, "report", "convergence.png"))

    results = None
    if "evaluate" in stages and config.evaluation.enabled:
        for domain, method in evaluated_entries(config):  # there and intact, before compiling
            zoo.get(config.benchmark, domain, method)
        if any(entry_keys.entry_kind(f) in ("fused", "student") for f in families.families(config)):
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
        report = epath.Path(workdir) / "report"
        report.mkdir(parents=True, exist_ok=True)
        name = (
            "profile.json" if entries is None else f"profile-{'of'.join(entries.split('/'))}.json"
        )
        (report / name).write_text(json.dumps(summary, indent=2))
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
