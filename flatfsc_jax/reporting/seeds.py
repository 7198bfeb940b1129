"""Seed-to-seed variation of the paired differences: the evidence behind a headline.

A paired interval over episodes measures how well one pair of backbones was evaluated,
not how much a difference changes when the backbones are trained again. This module
reads the ``report/results.json`` of several runs that differ only in ``config.seed``
(training seed; the test episodes are fixed by ``config.evaluation.seed``) and reports,
per adaptation and for the seen and unseen averages, every seed's paired difference
(SAM - ERM, SAM+FT - ERM+FT, ...) and their mean with a 95% Student-t interval across
seeds (n - 1 degrees of freedom).

  ./run.sh --config.seed=1 --workdir=work/seed1   # and seed 2 (scripts/run_seeds.sh)
  python -m flatfsc_jax.cli.seeds work work/seed1 work/seed2 --out=work/seeds
"""

from __future__ import annotations

import logging
import math
import os

import numpy as np
from scipy import stats

from flatfsc_jax import errors, families

log = logging.getLogger(__name__)


def paired_averages(results: dict) -> dict:
    """``{(better, baseline, adaptation, kind): mean paired difference in points}`` where
    kind is ``seen`` / ``unseen`` and the mean is over that kind's domains (each domain's
    mean over its episodes), as the paper's averages."""
    out: dict = {}
    per: dict = {}
    for dom in results["domains"].values():
        kind = "seen" if dom["seen"] else "unseen"
        for better, base in families.comparisons(results["families"]):
            for a in results["adaptations"]:
                x = dom["families"].get(better, {}).get(a)
                y = dom["families"].get(base, {}).get(a)
                if x is None or y is None:
                    continue
                d = 100.0 * (np.asarray(x, np.float64) - np.asarray(y, np.float64))
                d = d[~np.isnan(d)]
                if len(d):
                    per.setdefault((better, base, a, kind), []).append(float(d.mean()))
    for key, values in per.items():
        out[key] = float(np.mean(values))
    return out


def across_seeds(values) -> tuple[float, float]:
    """Mean and 95% Student-t half-width over seeds (nan half-width for one seed)."""
    v = np.asarray(values, np.float64)
    if len(v) < 2:
        return float(v.mean()), math.nan
    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return float(v.mean()), float(half)


def seed_table(runs: dict[str, dict]) -> dict:
    """``runs``: {label: results}. Returns plain data: rows of per-seed values + summary."""
    per_run = {label: paired_averages(r) for label, r in runs.items()}
    keys = sorted({k for p in per_run.values() for k in p}, key=lambda k: (k[2], k[3], k[0]))
    rows = []
    for key in keys:
        values = [per_run[label].get(key, math.nan) for label in runs]
        finite = [v for v in values if not math.isnan(v)]
        mean, half = across_seeds(finite) if finite else (math.nan, math.nan)
        better, base, a, kind = key
        rows.append(
            {
                "difference": f"{better} - {base}",
                "adaptation": a,
                "domains": kind,
                "per_seed": values,
                "mean": mean,
                "ci95": half,
                "positive_seeds": int(sum(v > 0 for v in finite)),
                "seeds": len(finite),
            }
        )
    return {"runs": list(runs), "rows": rows}


def to_markdown(table: dict) -> str:
    labels = table["runs"]
    head = ["difference", "adaptation", "domains", *labels, "mean ± 95% CI (seeds)", "> 0"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(labels) + 2)]
    for r in table["rows"]:
        per = [f"{v:+.2f}" if not math.isnan(v) else "-" for v in r["per_seed"]]
        ci = f"± {r['ci95']:.2f}" if not math.isnan(r["ci95"]) else ""
        lines.append(
            f"| {r['difference']} | {r['adaptation']} | {r['domains']} | "
            + " | ".join(per)
            + f" | **{r['mean']:+.2f}** {ci} | {r['positive_seeds']}/{r['seeds']} |"
        )
    return "\n".join(lines) + "\n"


# Keys that may differ between pooled runs: the training seed and where files live.
POOLABLE_KEYS = ("seed", "data_dir", "workdir")


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def config_differences(runs: dict[str, dict]) -> list[str]:
    """``"key: a | b | ..."`` for every config key (but the seed and paths) that differs."""
    flat = {label: _flatten(r.get("config") or {}) for label, r in runs.items()}
    keys = sorted({k for f in flat.values() for k in f} - set(POOLABLE_KEYS))
    out = []
    for k in keys:
        values = [f.get(k, "<absent>") for f in flat.values()]
        if any(v != values[0] for v in values[1:]):
            out.append(f"{k}: {' | '.join(repr(v) for v in values)}")
    return out


def load_runs(workdirs, *, allow_config_differences: bool = False) -> dict[str, dict]:
    """``{"seed N": results}`` of each workdir's ``report/results.json``.

    The runs must differ only in the seed (and paths): otherwise a spread over seeds
    would mix recipes. ``ResultsError`` lists the differing keys, unless
    ``allow_config_differences`` (then a warning lists them).
    """
    from flatfsc_jax.reporting import tables

    runs, paths = {}, {}
    for w in workdirs:
        path = os.path.join(w, "report", "results.json")
        results = tables.read_results(path)
        seed = (results.get("config") or {}).get("seed", "?")
        runs[f"seed {seed}"] = results
        paths[f"seed {seed}"] = path
    if len(runs) != len(workdirs):
        raise errors.ResultsError(
            "two workdirs hold the same config.seed: give runs of distinct seeds"
        )
    differ = config_differences(runs)
    if differ:
        text = (
            f"the runs ({', '.join(paths.values())}) differ in more than the seed:\n  "
            + "\n  ".join(differ)
        )
        if not allow_config_differences:
            raise errors.ResultsError(
                text + "\npool runs of one config (or --allow_config_differences to pool "
                "them anyway)"
            )
        log.warning("%s\npooling them anyway (--allow_config_differences)", text)
    return runs
