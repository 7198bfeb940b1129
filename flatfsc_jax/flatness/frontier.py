"""The cost-flatness-transfer frontier of the flat methods: which route to a flat minimum
is worth its price?

Command: ``python -m flatfsc_jax.cli.frontier --config=configs/frontier.py
--workdir=frontier`` (the config names the methods, the seeds and the budget). Every
method of ``config.frontier.methods`` is trained ``config.frontier.seeds`` times on the
source script as one zoo entry each; ERM at SAM's compute (``budget=2``: twice the steps,
the same two-cycle schedule stretched) is one of them. The stages are those of the
flatness study (:mod:`flatfsc_jax.flatness.study`), whose driver this module reuses:

* ``train``: ``study.train`` (resumable member by member; the cost of each member's
  training steps in ``<workdir>/members/<name>/cost.json``);
* ``measure``: ``study.measure`` (Hessian trace with its standard error, top eigenvalue,
  SAM gap at a common rho, on a fixed seeded subset of source training images in
  BatchNorm eval mode, and the source validation accuracy);
* ``evaluate``: ``study.evaluate`` on ``config.frontier.targets`` (NCC on the same seeded
  episodes for every backbone: differences between methods are paired);
* ``analyse``: :func:`analyse` and :func:`write_outputs`: ``<workdir>/frontier/
  {results.json, table.md, frontier.png}``.

With one source script there is one backbone per (method, seed): PARC has nothing to
select, so the outcome is that backbone's NCC accuracy (docs/frontier.md says why).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from scipy import stats

from flatfsc_jax import config_lib
from flatfsc_jax.flatness import plots, study
from flatfsc_jax.reporting import atomic

STAGES = study.STAGES
REFERENCES = ("sam", "erm")  # paired differences are taken against these methods
MEASURES = (
    "hessian_trace",
    "hessian_trace_se",
    "top_eigenvalue",
    "sam_gap_common_rho",
    "source_val_accuracy",
)


@dataclasses.dataclass(frozen=True)
class Member:
    """One backbone of the frontier: a method (``config.frontier.methods`` key) and a seed."""

    label: str
    method: str  # the zoo entry's method: "erm" or "sam" (config.flat.* applies to "sam")
    seed: int
    rho: float
    flat: tuple[tuple[str, Any], ...]  # config.flat overrides
    budget: int  # multiple of the source row's num_steps and restart_period

    @property
    def name(self) -> str:
        return f"{self.label}_s{self.seed}"

    @property
    def training_rho(self) -> float | None:
        # A "sam" entry whose flat method is ERM (weight averaging alone) has no radius.
        flat_erm = dict(self.flat).get("method") == "erm"
        return None if self.method == "erm" or flat_erm else self.rho

    def configure(self, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        """The one-entry run config: method, seed, radius, budget and flat overrides."""
        c = ml_collections.ConfigDict(config.to_dict())
        for block in ("study", "frontier"):
            del c[block]
        c.methods = (self.method,)
        c.seed = self.seed
        row = c.per_domain[config.study.source]
        row.rho = self.rho if self.method == "sam" else 0.0
        row.num_steps *= self.budget
        row.restart_period *= self.budget
        c.flat.update(dict(self.flat))
        return c


def members(config: ml_collections.ConfigDict) -> list[Member]:
    """Every (method, seed) of ``config.frontier``, methods in the config's order."""
    f = config.frontier
    rho = float(config.per_domain[config.study.source].rho)
    out = []
    for label, spec in f.methods.items():
        spec = dict(spec)
        flat = dict(spec.get("flat", {}))
        for seed in range(int(f.seeds)):
            out.append(
                Member(
                    label=label,
                    method=spec["method"],
                    seed=seed,
                    rho=rho,
                    flat=tuple(sorted(flat.items())),
                    budget=int(spec.get("budget", 1)),
                )
            )
    return out


def check(config) -> None:
    """Fails before any work, naming the key, if the frontier cannot run."""
    f = config.frontier
    if tuple(config.domains) != (config.study.source,):
        raise config_lib.ConfigError(
            f"config.domains={tuple(config.domains)} must be the frontier's one source "
            f"(config.study.source={config.study.source!r})"
        )
    known = config_lib.benchmark_domains(config.benchmark)
    bad = [t for t in f.targets if t not in known or t == config.study.source]
    if bad or not f.targets:
        raise config_lib.ConfigError(
            f"config.frontier.targets={tuple(f.targets)}: choose scripts other than the "
            f"source from {known}"
        )
    if int(f.seeds) < 2:
        raise config_lib.ConfigError(
            f"config.frontier.seeds={f.seeds}: at least 2 (the table's spread is over seeds)"
        )
    for label, spec in f.methods.items():
        spec = dict(spec)
        unknown = sorted(set(spec) - {"method", "flat", "budget"})
        if unknown or spec.get("method") not in ("erm", "sam"):
            raise config_lib.ConfigError(
                f"config.frontier.methods.{label}: keys are method ('erm' or 'sam'), flat "
                f"(config.flat overrides) and budget; got {spec}"
            )
    missing = [r for r in REFERENCES if r not in f.methods]
    if missing:
        raise config_lib.ConfigError(
            f"config.frontier.methods has no {missing}: the paired differences need them"
        )
    study.check_measurement(config)
    for m in members(config):
        config_lib.validate(m.configure(config), evaluation=False)


def analyse(config, members_: Sequence[Member], measured: Mapping, outcomes: Mapping, costs):
    """Per method, in order of cost: cost, flatness, source accuracy and transfer over
    seeds; paired differences against SAM and ERM (same seed, same episodes) over seeds."""
    f = config.frontier
    labels = list(dict.fromkeys(m.label for m in members_))
    by_label = {lb: [m for m in members_ if m.label == lb] for lb in labels}
    # Unseen accuracy of a backbone: the mean over the targets of its per-episode NCC.
    unseen = {
        m.name: float(np.mean([np.mean(outcomes[m.name][t]["ncc"]) for t in f.targets]))
        for m in members_
    }
    per_target = {
        m.name: {t: float(np.mean(outcomes[m.name][t]["ncc"])) for t in f.targets} for m in members_
    }
    erm_grads = np.mean([costs[m.name]["gradient_evaluations"] for m in by_label["erm"]])
    erm_seconds = np.mean([costs[m.name]["seconds"] for m in by_label["erm"]])
    rows = []
    for lb in labels:
        ms = by_label[lb]
        row = {"method": lb, "seeds": len(ms)}
        grads = np.mean([costs[m.name]["gradient_evaluations"] for m in ms])
        row["grads_x_erm"] = float(grads / erm_grads)
        row["seconds_x_erm"] = float(np.mean([costs[m.name]["seconds"] for m in ms]) / erm_seconds)
        for k in MEASURES:
            row[k] = _spread([measured[m.name][k] for m in ms])
        row["unseen"] = _spread([unseen[m.name] for m in ms])
        for ref in REFERENCES:
            diffs = [
                unseen[m.name] - unseen[r.name]
                for m in ms
                for r in by_label[ref]
                if r.seed == m.seed
            ]
            row[f"vs_{ref}"] = _paired(diffs)
        rows.append(row)
    rows.sort(key=lambda r: (r["grads_x_erm"], r["method"]))  # along the cost axis
    return {
        "source": config.study.source,
        "targets": list(f.targets),
        "episodes": int(config.study.episodes),
        "members": [dict(dataclasses.asdict(m), name=m.name) for m in members_],
        "unseen": unseen,
        "per_target": per_target,
        "costs": {m.name: costs[m.name] for m in members_},
        "measures": {m.name: {k: measured[m.name][k] for k in MEASURES} for m in members_},
        "rows": rows,
        "goal": goal(rows, f.goal_cost),
    }


def _spread(values) -> dict:
    v = np.asarray(values, float)
    sd = float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")
    return {"mean": float(np.mean(v)), "sd": sd, "values": v.tolist()}


def _paired(diffs) -> dict:
    """Mean paired difference over seeds with its t 95% CI (seeds are the replicates)."""
    d = np.asarray(diffs, float)
    out = {"mean": float(np.mean(d)), "n": len(d), "ci95": float("nan")}
    if len(d) > 1 and np.std(d) > 0:
        out["ci95"] = float(stats.t.ppf(0.975, len(d) - 1) * np.std(d, ddof=1) / np.sqrt(len(d)))
    elif len(d) > 1:
        out["ci95"] = 0.0
    return out


def goal(rows: Sequence[dict], max_cost: float) -> dict:
    """The issue's goal, per method: cost <= ``max_cost`` x ERM (gradient evaluations),
    Hessian trace <= SAM's and unseen accuracy >= SAM's (means over seeds)."""
    sam = next(r for r in rows if r["method"] == "sam")
    verdict = {}
    for r in rows:
        if r["method"] == "sam":
            continue
        verdict[r["method"]] = {
            "cheap": bool(r["grads_x_erm"] <= max_cost),
            "as_flat": bool(r["hessian_trace"]["mean"] <= sam["hessian_trace"]["mean"]),
            "transfers": bool(r["unseen"]["mean"] >= sam["unseen"]["mean"]),
        }
    reached = [k for k, v in verdict.items() if all(v.values())]
    return {"max_cost_x_erm": max_cost, "per_method": verdict, "reached_by": reached}


def to_markdown(results: dict) -> str:
    """The frontier table: mean +- sd over seeds; paired differences +- their t 95% CI."""

    def pm(d, scale=1.0, fmt=".2f"):
        return f"{scale * d['mean']:{fmt}} ± {scale * d['sd']:{fmt}}"

    def diff(d):
        return f"{100 * d['mean']:+.2f} ± {100 * d['ci95']:.2f}"

    head = (
        "| method | grads × ERM | time × ERM | Hessian trace | top eigenvalue | "
        "SAM gap (common rho) | source val % | unseen NCC % | vs SAM (pp) | vs ERM (pp) |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in results["rows"]:
        lines.append(
            f"| {r['method']} | {r['grads_x_erm']:.2f} | {r['seconds_x_erm']:.2f} | "
            f"{pm(r['hessian_trace'], fmt='.0f')} | {pm(r['top_eigenvalue'], fmt='.1f')} | "
            f"{pm(r['sam_gap_common_rho'], fmt='.3f')} | "
            f"{pm(r['source_val_accuracy'], 100)} | {pm(r['unseen'], 100)} | "
            f"{diff(r['vs_sam'])} | {diff(r['vs_erm'])} |"
        )
    g = results["goal"]
    reached = ", ".join(g["reached_by"]) or "no method"
    foot = (
        f"\n{len(results['targets'])} unseen scripts ({', '.join(results['targets'])}), "
        f"{results['episodes']} shared episodes each; mean ± sd over seeds; paired "
        "differences: same seed and episodes, mean ± t 95% CI over seeds.\n"
        f"Goal (≤ {g['max_cost_x_erm']:g}x ERM's gradients, Hessian trace ≤ SAM's, unseen "
        f"accuracy ≥ SAM's): reached by {reached}.\n"
    )
    return head + "\n".join(lines) + "\n" + foot


def plot(results: dict, path: str | None = None, ax=None):
    """Cost (gradient evaluations x ERM) on x, unseen accuracy on y, log Hessian trace
    as colour, the seed spread (sd) as bars."""
    fig, ax, _ = plots.new_axes(ax, figsize=(6.5, 4.5))
    rows = results["rows"]
    x = np.array([r["grads_x_erm"] for r in rows])
    y = np.array([100 * r["unseen"]["mean"] for r in rows])
    err = np.array([100 * r["unseen"]["sd"] for r in rows])
    trace = np.log10([max(r["hessian_trace"]["mean"], 1e-12) for r in rows])
    ax.errorbar(x, y, yerr=err, fmt="none", ecolor="grey", lw=1, capsize=3, zorder=1)
    points = ax.scatter(x, y, c=trace, cmap="viridis_r", s=50, zorder=2)
    label_x, label_y = _label_positions(x, y)
    for xi, yi, r in zip(label_x, label_y, rows, strict=True):
        ax.annotate(r["method"], (xi, yi), fontsize=8, va="center")
    colourbar = (fig or ax.figure).colorbar(points, ax=ax)
    colourbar.set_label("log10 Hessian trace (lower = flatter)")
    ax.set_xlabel("training cost: gradient evaluations × ERM")
    ax.set_ylabel("unseen-script NCC accuracy (%)")
    ax.set_title(
        f"{results['source']} → {len(results['targets'])} unseen scripts; bars: sd over seeds"
    )
    plots.finish(fig, path)
    return ax


def _label_positions(x, y, width: float = 0.1, gap: float = 0.04):
    """Where the method names go: points within ``width`` in cost form a column, named
    right of its rightmost point, names at their points' heights pushed apart by ``gap``
    (a fraction of the accuracy range) so none overlap."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    column = np.zeros(len(x), int)  # points sorted by cost; a gap > width starts a column
    order = np.argsort(x, kind="stable")
    for a, b in zip(order, order[1:], strict=False):
        column[b] = column[a] + (x[b] - x[a] > width)
    step = gap * max(float(np.ptp(y)), 1e-9)
    label_x, label_y = x.copy(), y.copy()
    for c in np.unique(column):
        idx = [i for i in np.argsort(y) if column[i] == c]
        label_x[idx] = x[idx].max() + 0.02
        for a, b in zip(idx, idx[1:], strict=False):
            label_y[b] = max(label_y[b], label_y[a] + step)
    return label_x, label_y


def write_outputs(results: dict, out_dir: str) -> dict[str, str]:
    """``results.json``, ``table.md`` and ``frontier.png``, replacing the previous ones
    only once all three are written (``reporting.atomic``)."""
    names = {"results": "results.json", "table": "table.md", "plot": "frontier.png"}
    with atomic.staged(out_dir) as tmp:
        with open(os.path.join(tmp, names["results"]), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(tmp, names["table"]), "w") as f:
            f.write(to_markdown(results))
        plot(results, os.path.join(tmp, names["plot"]))
    return {k: os.path.join(out_dir, name) for k, name in names.items()}


def run(config, workdir: str, stages: Sequence[str] = STAGES, *, progress: bool = True):
    """The frontier's stages (module docstring); returns the results of ``analyse`` or None."""
    t0 = time.perf_counter()
    stages, workdir, config = study.start(config, workdir, stages, check)
    population = members(config)
    print(
        f"[frontier] {len(population)} backbones ({len(config.frontier.methods)} methods x "
        f"{config.frontier.seeds} seeds) on {config.study.source}; targets "
        f"{', '.join(config.frontier.targets)}",
        flush=True,
    )
    if "train" in stages:
        study.train(config, workdir, population, progress=progress)
    lost = [m.name for m in population if study.diverged(workdir, m)]
    if lost and "analyse" in stages:
        raise config_lib.ConfigError(
            f"training diverged for {lost} (their DIVERGED markers say how): the frontier "
            "compares every method over the same seeds; change the method's settings"
        )
    measured = study.measure(config, workdir, population) if "measure" in stages else None
    targets = tuple(config.frontier.targets)
    outcomes = (
        study.evaluate(config, workdir, population, targets) if "evaluate" in stages else None
    )
    results = None
    if "analyse" in stages:
        measured = measured or study.measure(config, workdir, population)
        outcomes = outcomes or study.evaluate(config, workdir, population, targets)
        costs = {m.name: study.cost(workdir, m) for m in population}
        untimed = [k for k, v in costs.items() if v is None]
        if untimed:
            raise config_lib.ConfigError(
                f"no timed training for {untimed} (cost.json missing): their zoo entries "
                "came from elsewhere; delete <workdir>/members/<name> to retrain them"
            )
        results = analyse(config, population, measured, outcomes, costs)
        results["config"] = config.to_dict()
        results["wall_seconds"] = time.perf_counter() - t0
        paths = write_outputs(results, os.path.join(workdir, "frontier"))
        print(to_markdown(results), flush=True)
        print("[frontier] written: " + ", ".join(paths.values()), flush=True)
    print(f"[frontier] done in {time.perf_counter() - t0:.0f} s", flush=True)
    return results
