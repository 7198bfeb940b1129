"""Does flatness predict transfer? The study driver: population -> measures -> outcomes -> tau.

Command: ``python -m flatfsc_jax.cli.flatness_study --config=configs/flatness_study.py
--workdir=study`` (the config names the population, the primary measure and outcome, and
its cost). Four stages, each resumable, each reusing what the previous run left:

* ``train``: every member of the population (:func:`population`) is one zoo entry,
  trained by ``experiment.run(stages=("train",))`` in its own workdir
  ``<workdir>/members/<name>`` with the member's hyper-parameters
  (``member.configure``); the zoo's reuse policy makes a finished member free and an
  interrupted one resume from its checkpoint. The seconds of its training steps go to
  ``<workdir>/members/<name>/cost.json`` (:func:`cost`). The frontier
  (:mod:`flatfsc_jax.flatness.frontier`) drives its own members through the same stages.
* ``measure``: every backbone, *with* its head, in BatchNorm eval mode on a fixed seeded
  subset of its source training images (``sharpness.measure_split_backbone``: Hessian
  trace and top eigenvalue, SAM gaps, adaptive average / worst-case sharpness, relative
  flatness, weight norms, CDNV and effective rank on held-out source classes), plus the
  source validation accuracy the training loop recorded; cached per member in
  ``<workdir>/study/measures/<name>.json``.
* ``evaluate``: NCC accuracy on the same ``episodes`` seeded test episodes of each target
  script for every backbone, and the PARC score of its embedding on each episode's
  support set; cached per member in ``<workdir>/study/outcomes/<name>.json``.
* ``analyse``: ``correlation.correlation_table`` over measures x outcomes (Holm over the
  whole table), the primary row's details (granulated tau per axis, tau per optimiser,
  sign-error per axis); writes ``<workdir>/study/{results.json, table.md, table.csv,
  scatter_<primary measure>.png}``. Design and reading: docs/flatness-transfer.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Sequence

import ml_collections
import numpy as np

from flatfsc_jax import config_lib, experiment, flat_methods, models
from flatfsc_jax import zoo as zoo_lib
from flatfsc_jax.data import benchmarks
from flatfsc_jax.data import episodes as episodes_lib
from flatfsc_jax.evaluation import ncc, parc, protocol
from flatfsc_jax.flatness import sharpness
from flatfsc_jax.flatness.plots import plot_scatter, plot_taus  # noqa: F401 (the notebook's)
from flatfsc_jax.flatness.study_report import format_summary, write_outputs
from flatfsc_jax.profiling import PROFILE
from flatfsc_jax.reporting import correlation, significance
from flatfsc_jax.training import resumable

log = logging.getLogger(__name__)

STAGES = ("train", "measure", "evaluate", "analyse")
FACTOR_AXES = ("optimiser", "lr", "batch_size", "rho")
# The measures correlated, with the sign a *good* predictor of transfer should have
# (+1: larger measure, higher accuracy). Flatness measures: larger = sharper.
FLATNESS = {
    "hessian_trace": -1,
    "top_eigenvalue": -1,
    "sam_gap_common_rho": -1,
    "adaptive_average_sharpness": -1,
    "adaptive_worst_sharpness": -1,
    "relative_flatness": -1,
    "weight_norm": -1,
}
BASELINES = {
    "source_val_accuracy": 1,
    "train_loss": -1,
    "generalisation_gap": -1,
    "cdnv": -1,
    "effective_rank": 1,
}
MEAN_OUTCOME = "unseen_mean"


@dataclasses.dataclass(frozen=True)
class Member:
    """One backbone of the population: its factor levels and its seed."""

    optimiser: str
    method: str
    lr: float
    batch_size: int
    rho: float
    rho_level: str  # "none" (ERM) or "low" / "high" within the optimiser's own grid
    seed: int
    anchor: bool

    @property
    def name(self) -> str:
        return f"{self.optimiser}_lr{self.lr:g}_bs{self.batch_size}_rho{self.rho:g}_s{self.seed}"

    @property
    def configuration(self) -> str:
        return self.name.rsplit("_s", 1)[0]

    @property
    def training_rho(self) -> float | None:
        """The radius the backbone was trained with (its SAM gap is also taken there)."""
        return self.rho or None

    def configure(self, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        return member_config(config, self)


def population(study: ml_collections.ConfigDict) -> list[Member]:
    """The crossed design: optimiser x lr x batch size x rho, ``seeds`` seeds each, and
    ``anchor_seeds`` seeds in all for each anchor configuration."""
    anchors = {(a[0], float(a[1]), int(a[2]), float(a[3])) for a in study.anchors}
    out = []
    for name, opt in study.optimisers.items():
        rhos = tuple(float(r) for r in opt["rho"])
        for lr in study.lrs:
            for bs in study.batch_sizes:
                for k, rho in enumerate(rhos):
                    level = "none" if rho == 0 else ("low", "high")[k] if len(rhos) == 2 else "one"
                    key = (name, float(lr), int(bs), rho)
                    seeds = study.anchor_seeds if key in anchors else study.seeds
                    for seed in range(int(seeds)):
                        out.append(
                            Member(
                                name,
                                opt["method"],
                                float(lr),
                                int(bs),
                                rho,
                                level,
                                seed,
                                key in anchors,
                            )
                        )
    unknown = anchors - {(m.optimiser, m.lr, m.batch_size, m.rho) for m in out}
    if unknown:
        raise config_lib.ConfigError(
            f"config.study.anchors has {sorted(unknown)}, not configurations of the design; "
            "name an (optimiser, lr, batch size, rho) that the crossed factors contain"
        )
    return out


def member_config(config: ml_collections.ConfigDict, member: Member) -> ml_collections.ConfigDict:
    """The one-entry run config of ``member``: its method, row, seed and overrides."""
    c = ml_collections.ConfigDict(config.to_dict())
    source = config.study.source
    c.methods = (member.method,)
    c.seed = member.seed
    row = c.per_domain[source]
    row.lr, row.batch_size, row.rho = member.lr, member.batch_size, member.rho
    overrides = config.study.optimisers[member.optimiser]["overrides"]
    c.update_from_flattened_dict(_flatten(_plain(overrides)))
    del c["study"]
    return c


def _plain(d):
    return d.to_dict() if isinstance(d, ml_collections.ConfigDict) else dict(d)


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def check_study(config) -> None:
    """Fails before any work, naming the key, if the study's settings cannot run."""
    s = config.study
    if tuple(config.domains) != (s.source,):
        raise config_lib.ConfigError(
            f"config.domains={tuple(config.domains)} must be the study's one source "
            f"(config.study.source={s.source!r})"
        )
    known = config_lib.benchmark_domains(config.benchmark)
    for t in (*s.near_targets, *s.far_targets):
        if t not in known or t == s.source:
            raise config_lib.ConfigError(
                f"config.study targets have {t!r}; choose scripts other than the source "
                f"from {known}"
            )
    if len(population(s)) < 3:
        raise config_lib.ConfigError("config.study gives fewer than 3 backbones: no tau")
    if s.primary_measure not in (*FLATNESS, *BASELINES):
        raise config_lib.ConfigError(
            f"config.study.primary_measure={s.primary_measure!r}; choose from "
            f"{(*FLATNESS, *BASELINES)}"
        )
    if s.primary_outcome not in (MEAN_OUTCOME, *targets(config)):
        raise config_lib.ConfigError(
            f"config.study.primary_outcome={s.primary_outcome!r}; choose {MEAN_OUTCOME!r} "
            f"or a target {targets(config)}"
        )
    check_measurement(config)
    check_statistics(config)
    for m in population(s):
        config_lib.validate(member_config(config, m))


def targets(config) -> tuple[str, ...]:
    return (*config.study.near_targets, *config.study.far_targets)


def check_measurement(config) -> None:
    """The measurement settings (``config.study.sharpness``, ``examples``), before any
    training: a bad one would otherwise fail after the population is trained."""
    try:
        settings = sharpness_settings(config)
    except ValueError as e:
        raise config_lib.ConfigError(f"config.study.sharpness: {e}") from None
    if settings.worst_batch > config.study.examples:
        raise config_lib.ConfigError(
            f"config.study.sharpness.worst_batch={settings.worst_batch} is larger than "
            f"config.study.examples={config.study.examples}; lower it or measure more images"
        )


def planned_tests(config) -> int:
    """Rows of the table, Holm's family: measures x (targets + their mean) + PARC rows."""
    n_targets = len(targets(config))
    return (len(FLATNESS) + len(BASELINES)) * (n_targets + 1) + n_targets


def holm_floor(n_tests: int, n_perm: int) -> float:
    """The smallest Holm-adjusted p of ``n_tests`` rows: a two-sided permutation p is at
    least 2 / (n_perm + 1), and Holm multiplies the smallest p by the number of tests."""
    return min(1.0, n_tests * 2.0 / (n_perm + 1))


def check_statistics(config) -> None:
    """Warns, before any training, when too few permutations leave no row able to pass
    Holm at .05 (the ``:tiny`` test run's case); ``table.md`` states the floor."""
    n_tests, n_perm = planned_tests(config), int(config.study.n_perm)
    if holm_floor(n_tests, n_perm) >= 0.05:
        log.warning(
            "config.study.n_perm=%d cannot give a Holm-adjusted p below 0.05 over %d tests; "
            "use n_perm >= %d for a table whose corrected p-values can reject",
            n_perm,
            n_tests,
            math.ceil(2 * n_tests / 0.05),
        )


def sharpness_settings(config) -> sharpness.SharpnessSettings:
    return sharpness.SharpnessSettings(**config.study.sharpness.to_dict())


def _write_json(path: str, data) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)  # a killed run never leaves a half-written cache


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _load(config, workdir: str, member: Member) -> zoo_lib.LoadedBackbone:
    zoo = zoo_lib.Zoo(os.path.join(workdir, "members", member.name, "zoo"))
    return zoo.load(config.benchmark, config.study.source, member.method)


DIVERGED = "DIVERGED"  # marker in a member's workdir: its training went non-finite


def diverged(workdir: str, member: Member) -> str | None:
    """Why ``member``'s training diverged (its marker's text), or None."""
    path = os.path.join(workdir, "members", member.name, DIVERGED)
    return open(path).read() if os.path.exists(path) else None


def train(config, workdir: str, members: Sequence, *, progress: bool = True) -> None:
    """Trains every member not yet complete (``member.configure(config)`` is its one-entry
    run config) and records its cost (:func:`cost`). A member whose loss goes non-finite
    is part of the result (that configuration does not train), not a crash: it is marked
    and left out of the measures, and a re-run does not retrain it (delete the marker to
    retry)."""
    for i, m in enumerate(members):
        if diverged(workdir, m):
            print(f"[study] train {i + 1}/{len(members)}: {m.name} diverged before; skipped")
            continue
        print(f"[study] train {i + 1}/{len(members)}: {m.name}", flush=True)
        member_dir = os.path.join(workdir, "members", m.name)
        member_cfg = m.configure(config)
        try:
            experiment.run(member_cfg, member_dir, stages=("train",), progress=progress)
        except resumable.NonFiniteError as e:
            with open(os.path.join(member_dir, DIVERGED), "w") as f:
                f.write(str(e))
            print(f"[study] {m.name} diverged: {e}", flush=True)
            continue
        _add_cost(member_dir, member_cfg, m.method)


COST = "cost.json"  # in a member's workdir


def _add_cost(member_dir: str, cfg, method: str) -> None:
    """Adds the training steps this process timed (``profiling.PROFILE``, reset by
    ``experiment.run``) to the member's cost record. A resumed member adds each piece;
    a reused one adds nothing. Compilation, validation and checkpoints are not counted:
    the cost of a method is its steps."""
    seconds = PROFILE.seconds.get("train/steps", 0.0)
    steps = PROFILE.counts.get("train/steps", 0)
    if steps == 0:
        return
    path = os.path.join(member_dir, COST)
    record = _read_json(path) if os.path.exists(path) else {"step_seconds": 0.0, "timed_steps": 0}
    record["step_seconds"] += seconds
    record["timed_steps"] += steps
    entry = config_lib.domain_config(cfg, cfg.domains[0], method)
    record["num_steps"] = int(entry.num_steps)
    record["gradient_evaluations"] = gradient_evaluations(entry)
    _write_json(path, record)


def gradient_evaluations(entry_cfg) -> int:
    """Forward-backward passes of a whole training run of one entry's config."""
    flat = config_lib.flat_settings(entry_cfg)
    steps = int(entry_cfg.num_steps)
    if flat is None:
        return steps
    per_step = flat_methods.gradient_evaluations(flat, np.arange(steps))
    return int(np.sum(np.broadcast_to(per_step, (steps,))))


def cost(workdir: str, member) -> dict | None:
    """A member's training cost: ``gradient_evaluations``, ``seconds_per_step`` (training
    steps only, mean over the steps this machine timed) and ``seconds`` (that times the
    run's steps), or None when no training of it was timed."""
    path = os.path.join(workdir, "members", member.name, COST)
    if not os.path.exists(path):
        return None
    record = _read_json(path)
    per_step = record["step_seconds"] / record["timed_steps"]
    return dict(record, seconds_per_step=per_step, seconds=per_step * record["num_steps"])


def measure(config, workdir: str, members: Sequence) -> dict[str, dict]:
    """Every member's measures (cached per member)."""
    s = config.study
    out = {}
    splits = None
    for i, m in enumerate(members):
        path = os.path.join(workdir, "study", "measures", f"{m.name}.json")
        if os.path.exists(path):
            out[m.name] = _read_json(path)
            continue
        if splits is None:
            splits = [
                benchmarks.load_split(config.benchmark, s.source, split, config.data_dir)
                for split in ("train", "valid")
            ]
        loaded = _load(config, workdir, m)
        values = sharpness.measure_split_backbone(
            loaded.model,
            loaded.variables,
            *splits,
            examples=s.examples,
            heldout_examples=s.heldout_examples,
            training_rho=m.training_rho,
            settings=sharpness_settings(config),
        )
        values["source_val_accuracy"] = float(loaded.entry.best_accuracy)
        values["train_accuracy"] = values["accuracy"]
        values["train_loss"] = values["loss"]
        values["generalisation_gap"] = values["accuracy"] - values["source_val_accuracy"]
        values["best_step"] = loaded.entry.metadata.get("best_validation", {}).get("step")
        _write_json(path, values)
        out[m.name] = values
        print(f"[study] measured {i + 1}/{len(members)}: {m.name} ({values['seconds']:.0f} s)")
    return out


def evaluate(
    config, workdir: str, members: Sequence, target_scripts: Sequence[str] | None = None
) -> dict[str, dict]:
    """Per member and target (default :func:`targets`): NCC accuracy and PARC score of
    every shared episode."""
    s = config.study
    target_scripts = tuple(target_scripts or targets(config))
    out, todo = {}, []
    for m in members:
        path = os.path.join(workdir, "study", "outcomes", f"{m.name}.json")
        if os.path.exists(path):
            out[m.name] = _read_json(path)
        else:
            todo.append(m)
    if not todo:
        return out
    tasks = {}
    for t in target_scripts:
        split = benchmarks.load_split(config.benchmark, t, "test", config.data_dir)
        # The same seeded episodes for every backbone (as protocol.py's evaluation).
        batch = episodes_lib.EpisodeBatch.sample(split, s.episodes, seed=s.episode_seed)
        support = protocol.parc_subsets(batch, s.parc_max_support, s.episode_seed + 1000)
        tasks[t] = (split, batch, support)
    for m in todo:
        loaded = _load(config, workdir, m)
        meta = loaded.entry.metadata["model"]
        trunk = models.build_model(meta["arch"], 0, width=meta["width"], dtype=meta["dtype"])
        variables = {
            "params": models.trunk_params(loaded.variables["params"]),
            "batch_stats": loaded.variables["batch_stats"],
        }
        result = {}
        for t, (split, batch, support) in tasks.items():
            emb = ncc.embed_split(trunk, variables, split, batch_size=config.validation.batch_size)
            result[t] = {
                "ncc": np.asarray(ncc.episode_accuracies(emb, batch)).astype(float).tolist(),
                "parc": np.asarray(parc.parc_scores_padded(emb, *support)).astype(float).tolist(),
            }
        path = os.path.join(workdir, "study", "outcomes", f"{m.name}.json")
        _write_json(path, result)
        out[m.name] = result
        print(f"[study] evaluated {m.name}", flush=True)
    return out


def _usable(name: str, values: np.ndarray, dropped: dict) -> bool:
    if not np.all(np.isfinite(values)):
        dropped[name] = "non-finite for some backbone"
        return False
    if np.all(values == values[0]):
        dropped[name] = "constant over the population"
        return False
    return True


def analyse(config, members, measured: dict, outcomes: dict) -> dict:
    """The statistics of the study as plain data (``results.json``)."""
    s = config.study
    names = [m.name for m in members]
    tg = targets(config)
    episode = {t: np.array([outcomes[n][t]["ncc"] for n in names]) for t in tg}
    episode[MEAN_OUTCOME] = np.concatenate([episode[t] for t in tg], axis=1)
    outcome = {k: v.mean(1) for k, v in episode.items()}
    directions = {**FLATNESS, **BASELINES}
    dropped: dict = {}
    meas = {}
    for k in directions:
        v = np.array([measured[n][k] for n in names], float)
        if _usable(k, v, dropped):
            meas[k] = v
    parc_scores = {t: np.array([np.mean(outcomes[n][t]["parc"]) for n in names]) for t in tg}
    factors = {
        "optimiser": [m.optimiser for m in members],
        "lr": [m.lr for m in members],
        "batch_size": [m.batch_size for m in members],
        "rho": [m.rho_level for m in members],
        "seed": [m.seed for m in members],  # a factor, not an axis: pairs share a seed
    }
    axes = [a for a in FACTOR_AXES if len(set(factors[a])) > 1]
    groups = factors["optimiser"]
    covariate = meas.get("source_val_accuracy")
    common = dict(
        factors=factors,
        axes=axes,
        covariate=covariate,
        groups=groups,
        n_boot=s.n_boot,
        n_perm=s.n_perm,
        seed=s.stats_seed,
    )
    outcome_names = [s.primary_outcome] + [k for k in (*tg, MEAN_OUTCOME) if k != s.primary_outcome]
    ordered = {k: outcome[k] for k in outcome_names}
    rows = correlation.correlation_table(
        meas,
        ordered,
        episode_outcomes={k: episode[k] for k in ordered},
        directions=directions,
        **common,
    )
    # PARC is a score of a backbone *on a target*: one row per target, its own outcome.
    for t in tg:
        if _usable(f"parc_{t}", parc_scores[t], dropped):
            rows += correlation.correlation_table(
                {f"parc_{t}": parc_scores[t]},
                {t: outcome[t]},
                episode_outcomes={t: episode[t]},
                directions={f"parc_{t}": 1},
                **common,
            )
    # Holm over the whole table (measures x outcomes, PARC rows included).
    for row, adj in zip(rows, significance.holm([r["p"] for r in rows]), strict=True):
        row["p_holm"] = float(adj)
        row["kind"] = "flatness" if row["measure"] in FLATNESS else "baseline"
        row["primary"] = row["measure"] == s.primary_measure and row["outcome"] == s.primary_outcome
    rows.sort(key=lambda r: (not r["primary"], r["outcome"] != s.primary_outcome))
    floor = holm_floor(len(rows), int(s.n_perm))
    primary = None
    if s.primary_measure in meas:
        x, y = meas[s.primary_measure], outcome[s.primary_outcome]
        primary = {
            "measure": s.primary_measure,
            "outcome": s.primary_outcome,
            "tau": correlation.kendall_tau(
                x, y, n_boot=s.n_boot, n_perm=s.n_perm, seed=s.stats_seed
            ),
            "granulated": correlation.granulated_tau(x, y, factors, axes=axes),
            "groups": correlation.group_taus(x, y, groups, n_perm=s.n_perm, seed=s.stats_seed),
            "sign_error": correlation.sign_error(
                x,
                y,
                factors,
                direction=directions[s.primary_measure],
                axes=axes,
                episode_outcomes=episode[s.primary_outcome],
            ),
        }
    return {
        "primary_measure": s.primary_measure,
        "primary_outcome": s.primary_outcome,
        "n": len(members),
        "min_detectable_tau": significance.min_detectable_tau(len(members)),
        "n_perm": int(s.n_perm),
        "holm_floor": floor,
        "targets": {"near": list(s.near_targets), "far": list(s.far_targets)},
        "members": [dict(dataclasses.asdict(m), name=m.name) for m in members],
        "factors": factors,
        "axes": axes,
        "directions": directions,
        "measures": {k: v.tolist() for k, v in meas.items()},
        "measures_all": {n: measured[n] for n in names},
        "parc": {t: v.tolist() for t, v in parc_scores.items()},
        "outcomes": {k: v.tolist() for k, v in outcome.items()},
        "episode_accuracies": {t: episode[t].tolist() for t in tg},
        "dropped_measures": dropped,
        "rows": rows,
        "primary": primary,
    }


def start(config, workdir: str, stages: Sequence[str], check) -> tuple[tuple, str, object]:
    """Before any work: the stages checked, the workdir made absolute, a copy of the config
    whose data directory is shared by every member (``experiment.run`` would give each its
    own), the config checked by ``check(config)`` and the workdir by ``experiment``."""
    stages = tuple(stages)
    unknown = sorted(set(stages) - set(STAGES))
    if unknown or not stages:
        raise config_lib.ConfigError(
            f"--stages={','.join(stages)} has {unknown or 'no stage'}; choose from {STAGES}"
        )
    workdir = os.path.abspath(os.path.expanduser(workdir))
    config = ml_collections.ConfigDict(config.to_dict())
    if not config.data_dir:
        config.data_dir = os.path.join(workdir, "data")
    check(config)
    experiment.check_workdir(workdir)
    return stages, workdir, config


def run(config, workdir: str, stages: Sequence[str] = STAGES, *, progress: bool = True):
    """The study's stages (module docstring); returns the results of ``analyse`` or None."""
    t0 = time.perf_counter()
    stages, workdir, config = start(config, workdir, stages, check_study)
    members = population(config.study)
    print(
        f"[study] {len(members)} backbones on {config.study.source}; targets "
        f"{', '.join(targets(config))}; primary {config.study.primary_measure} vs "
        f"{config.study.primary_outcome}",
        flush=True,
    )
    if "train" in stages:
        train(config, workdir, members, progress=progress)
    lost = {m.name: diverged(workdir, m) for m in members if diverged(workdir, m)}
    members = [m for m in members if m.name not in lost]
    measured = measure(config, workdir, members) if "measure" in stages else None
    outcomes = evaluate(config, workdir, members) if "evaluate" in stages else None
    results = None
    if "analyse" in stages:
        measured = measured or measure(config, workdir, members)
        outcomes = outcomes or evaluate(config, workdir, members)
        results = analyse(config, members, measured, outcomes)
        results["diverged"] = lost
        results["config"] = config.to_dict()
        results["wall_seconds"] = time.perf_counter() - t0
        paths = write_outputs(results, os.path.join(workdir, "study"))
        print(format_summary(results), flush=True)
        print("[study] written: " + ", ".join(paths.values()), flush=True)
    print(f"[study] done in {time.perf_counter() - t0:.0f} s", flush=True)
    return results
