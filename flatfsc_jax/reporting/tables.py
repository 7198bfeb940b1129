"""Paper-style reports from protocol results: Markdown table, CSV/JSON and a PNG chart.

One table per adaptation (NCC, PA, fine-tuning, LoRA, TSA: those the run evaluated).
Rows are evaluation domains (seen first, then unseen) followed by the seen / unseen
averages (plain means over domains, as the paper reports them); columns are the backbone
families present for that adaptation, in the paper's order (ERM, SAM, ERM+KD, SAM+KD,
ERM+FT, SAM+FT, then +LoRA; :data:`families.FAMILY_ORDER`), with mean accuracy +- 95% CI over
episodes, then the paired differences on the *same* episodes that the paper discusses
(:func:`families.comparisons`): SAM - ERM within each kind of backbone (plain, +KD, +FT, +LoRA),
and fusion by fine-tuning minus fusion by distillation (FT - KD, LoRA - KD) within ERM
and within SAM, each where both families exist.

The 95% interval of an average over domains treats domains as independent samples of
episodes: ``1.96 * sqrt(sum_d var_d / n_d) / D``. Paired intervals use the per-episode
differences, which is why they are much tighter than the difference of two intervals.

CLI: ``python -m flatfsc_jax.cli.report --workdir=work`` re-renders ``work/report/``
from ``work/report/results.json``.
"""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np

from flatfsc_jax import errors, families
from flatfsc_jax.data import episodes as episodes_lib
from flatfsc_jax.evaluation import ncc
from flatfsc_jax.reporting import atomic

Z95 = 1.96  # the normal quantile of every 95% interval here (ncc.summarize's too)


def _stats(values) -> tuple[float, float, int]:
    """(mean, 95% half-width, n) in percent of per-episode accuracies in [0, 1]."""
    v = 100.0 * np.asarray(values, np.float64)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return math.nan, math.nan, 0
    s = ncc.summarize(v)  # population std (ddof=0), as the paper's evaluation code
    return s["mean"], s["ci95"], s["n"]


def _average(stats: list[tuple[float, float, int]]) -> tuple[float, float]:
    """Mean over domains and its 95% half-width (independent domains)."""
    stats = [s for s in stats if s[2] > 0]
    if not stats:
        return math.nan, math.nan
    mean = float(np.mean([s[0] for s in stats]))
    var = sum((s[1] / Z95) ** 2 for s in stats)  # (std/sqrt(n))^2 per domain
    return mean, float(Z95 * math.sqrt(var) / len(stats))


def build_table(results: dict) -> dict:
    """Table as plain data: columns, rows (name, kind, cells), cells = (mean, ci)."""
    adapts = results["adaptations"]
    domains = results["domains"].values()

    def present(f, a):  # the family was evaluated with this adaptation somewhere
        return any(dom["families"].get(f, {}).get(a) is not None for dom in domains)

    fams = families.ordered_families(results["families"])
    columns = [(f, a) for a in adapts for f in fams if present(f, a)]
    diffs = [
        (b, base, a)
        for a in adapts
        for (b, base) in families.comparisons([f for f in fams if present(f, a)])
    ]
    rows = []
    per_kind: dict[str, dict] = {"seen": {}, "unseen": {}}
    for domain, dom in results["domains"].items():
        kind = "seen" if dom["seen"] else "unseen"
        cells = {}
        for f, a in columns:
            acc = dom["families"].get(f, {}).get(a)
            s = _stats(acc) if acc is not None else (math.nan, math.nan, 0)
            cells[f"{f} / {a}"] = s
            per_kind[kind].setdefault(f"{f} / {a}", []).append(s)
        for b, base, a in diffs:
            x = dom["families"].get(b, {}).get(a)
            y = dom["families"].get(base, {}).get(a)
            if x is None or y is None:
                s = (math.nan, math.nan, 0)
            else:
                s = _stats(np.asarray(x) - np.asarray(y))
            key = f"{b} - {base} / {a}"
            cells[key] = s
            per_kind[kind].setdefault(key, []).append(s)
        rows.append({"name": domain, "kind": kind, "cells": cells})
    rows.sort(key=lambda r: r["kind"] != "seen")
    for kind in ("seen", "unseen"):
        if per_kind[kind]:
            cells = {k: (*_average(v), len(v)) for k, v in per_kind[kind].items()}
            rows.append({"name": f"average {kind}", "kind": "average", "cells": cells})
    keys = [f"{f} / {a}" for f, a in columns] + [f"{b} - {base} / {a}" for b, base, a in diffs]
    return {"keys": keys, "rows": rows}


def _fmt(cell, signed=False) -> str:
    mean, ci = cell[0], cell[1]
    if math.isnan(mean):
        return "-"
    return f"{mean:+.2f} ± {ci:.2f}" if signed else f"{mean:.2f} ± {ci:.2f}"


def _spec_title(results: dict) -> str:
    # Results written before episode_spec existed used Meta-Dataset's episodes.
    name = results.get("episode_spec", "md")
    return episodes_lib.EPISODE_SPEC_TITLES.get(name, name)


def to_markdown(results: dict, table: dict | None = None) -> str:
    """One Markdown table per adaptation: families, then paired differences."""
    table = table or build_table(results)
    subsets = []
    episode_keys = {
        "pa": "pa_episodes",
        "finetune": "finetune_episodes",
        "lora": "finetune_episodes",
        "tsa": "tsa_episodes",
    }
    for a, key in episode_keys.items():
        n = results.get(key, results["episodes"])
        if a in results["adaptations"] and n < results["episodes"]:
            subsets.append(f"{a}: the first {n}")
    lines = [
        f"Few-shot accuracy (%) on {results['benchmark']}: mean ± 95% CI over "
        f"{results['episodes']} test episodes per domain ({_spec_title(results)})"
        + (f" ({'; '.join(subsets)} of them)" if subsets else "")
        + "; differences are paired on the same episodes.",
    ]
    for a in results["adaptations"]:
        keys = [k for k in table["keys"] if k.endswith(f" / {a}")]
        names = [k[: -len(f" / {a}")] for k in keys]
        lines += [
            "",
            f"Adaptation: **{a}**",
            "",
            "| domain | " + " | ".join(names) + " |",
            "|---|" + "---:|" * len(names),
        ]
        for row in table["rows"]:
            name = f"**{row['name']}**" if row["kind"] == "average" else row["name"]
            if row["kind"] == "unseen":
                name += " (unseen)"
            cells = [_fmt(row["cells"][k], signed=" - " in k) for k in keys]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    sel = _selection_lines(results)
    if sel:
        lines += ["", "Backbones chosen by PARC on unseen domains (episodes per backbone):", ""]
        lines += sel
    prov = _provenance_lines(results)
    if prov:
        lines += ["", "Data provenance (docs/meta-dataset.md#deviations):", ""]
        lines += prov
    return "\n".join(lines) + "\n"


def _provenance_lines(results) -> list[str]:
    """One line per domain whose prepared data records its provenance (Meta-Dataset)."""
    records = [d["provenance"] for d in results["domains"].values() if d.get("provenance")]
    if not records:
        return []
    from flatfsc_jax.data.meta_dataset.provenance import format_provenance

    return [f"- {format_provenance(r)}" for r in records]


def _selection_lines(results) -> list[str]:
    out = []
    for domain, dom in results["domains"].items():
        if dom["seen"]:
            continue
        for fam, counts in dom.get("selection", {}).items():
            top = sorted(counts.items(), key=lambda kv: -kv[1])
            out.append(f"- {domain} / {fam}: " + ", ".join(f"{k} {v}" for k, v in top if v))
    return out


def write_csv(table: dict, path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["domain", "kind", "column", "mean", "ci95", "n"])
        for row in table["rows"]:
            for k in table["keys"]:
                mean, ci, n = row["cells"][k]
                w.writerow([row["name"], row["kind"], k, f"{mean:.4f}", f"{ci:.4f}", n])


def plot_headline(results: dict, table: dict, path) -> None:
    """Average seen / unseen accuracy per backbone family (the paper's headline figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    adapts = results["adaptations"]
    averages = {r["name"]: r["cells"] for r in table["rows"] if r["kind"] == "average"}
    width = max(4.5, 0.8 * len(results["families"]) + 1.5)
    fig, axes = plt.subplots(1, len(adapts), figsize=(width * len(adapts), 3.6), squeeze=False)
    for ax, a in zip(axes[0], adapts, strict=True):
        # The families evaluated with this adaptation, in table (= paper) order.
        fams = [k[: -len(f" / {a}")] for k in table["keys"] if k.endswith(f" / {a}")]
        fams = [f for f in fams if " - " not in f]
        if not fams:
            ax.set_axis_off()
            continue
        x = np.arange(len(fams))
        for j, kind in enumerate(("seen", "unseen")):
            cells = averages.get(f"average {kind}")
            if cells is None:
                continue
            means = [cells[f"{f} / {a}"][0] for f in fams]
            cis = [cells[f"{f} / {a}"][1] for f in fams]
            ax.bar(x + (j - 0.5) * 0.38, means, 0.38, yerr=cis, capsize=3, label=kind)
        ax.set_xticks(x, fams)
        ax.set_ylabel("average accuracy (%)")
        ax.set_title(f"{results['benchmark']}: {a}")
        lo = np.nanmin([averages[k][f"{f} / {a}"][0] for k in averages for f in fams])
        ax.set_ylim(max(0.0, lo - 10), 105)
        ax.legend(loc="upper left", ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: dict, out_dir) -> dict:
    """Writes results.json, report.md, report.csv and headline.png; returns the paths.

    All four are rendered first (``atomic.staged``) and then replace the previous report,
    so a failure (a plot error, a full disk) leaves the previous report intact.
    """
    if not results.get("adaptations") or not results.get("families"):
        raise errors.ResultsError(
            f"results hold no {'adaptation' if not results.get('adaptations') else 'family'}"
            f": nothing to report in {os.fspath(out_dir)!r} (the previous report is kept)"
        )
    table = build_table(results)
    names = {
        "json": "results.json",
        "markdown": "report.md",
        "csv": "report.csv",
        "png": "headline.png",
    }
    with atomic.staged(out_dir) as tmp:
        with open(os.path.join(tmp, names["json"]), "w") as f:
            json.dump(results, f)
        with open(os.path.join(tmp, names["markdown"]), "w") as f:
            f.write(to_markdown(results, table))
        write_csv(table, os.path.join(tmp, names["csv"]))
        plot_headline(results, table, os.path.join(tmp, names["png"]))
    return {k: os.path.join(os.fspath(out_dir), n) for k, n in names.items()}


def read_results(path) -> dict:
    """``results.json`` as written by :func:`write_report`; ``ResultsError`` names the file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise errors.ResultsError(f"{path} does not exist: run ./run.sh (its evaluate stage) first")
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise errors.ResultsError(
            f"{path} is unreadable ({type(e).__name__}: {e}); re-run the evaluate stage "
            "(./run.sh --stages=evaluate) to write it again"
        ) from e
    lacking = [
        k
        for k in ("domains", "families", "adaptations")
        if not isinstance(results, dict) or k not in results
    ]
    if lacking:
        raise errors.ResultsError(
            f"{path} is not a results file (no {lacking}); re-run the evaluate stage "
            "(./run.sh --stages=evaluate) to write it again"
        )
    return results
