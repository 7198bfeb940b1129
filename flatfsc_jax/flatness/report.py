"""The flatness report: what :mod:`flatfsc_jax.flatness.zoo` measured, as tables and plots.

A Markdown table with ERM next to SAM for every measure (fused variants after them), a
CSV row per backbone, JSON, and the 1-D / 2-D landscape PNGs.
CLI: ``python -m flatfsc_jax.cli.flatness --workdir=work``.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any

import numpy as np

from flatfsc_jax import families
from flatfsc_jax.flatness import landscape
from flatfsc_jax.reporting import atomic
from flatfsc_jax.reporting.tables import Z95

FLATNESS_BASE_METHODS = ("erm", "sam")

# (result key, table header, whether the cell carries a 95% interval)
FLATNESS_MEASURES = (
    ("train_loss", "train loss", False),
    ("sharpness", "rho-sharpness", False),
    ("top_eigenvalue", "top eigenvalue", False),
    ("hessian_trace", "Hessian trace", True),
)


def flatness_method_order(method: str) -> tuple[int, str, int, str]:
    """Sort key of the flatness report: ERM, SAM, then fused variants by fusion name."""
    base, _, fusion = method.partition("+")
    bases = FLATNESS_BASE_METHODS
    rank = bases.index(base) if base in bases else len(bases)
    return (1 if fusion else 0, fusion, rank, method)


def _flatness_by_domain(results: dict) -> dict[str, dict[str, dict]]:
    table: dict[str, dict[str, dict]] = {}
    for r in results["entries"]:
        table.setdefault(r["domain"], {})[r["method"]] = r
    return table


def _flatness_cell(entry: dict | None, key: str, interval: bool) -> str:
    if entry is None:
        return "-"
    if interval:
        return f"{entry[key]:.4g} ± {Z95 * entry[key + '_se']:.2g}"
    return f"{entry[key]:.4g}"


def flatness_markdown(results: dict) -> str:
    """The flatness table: settings, one row per domain and a SAM-vs-ERM tally."""
    s = results["settings"]
    methods = sorted({r["method"] for r in results["entries"]}, key=flatness_method_order)
    by_domain = _flatness_by_domain(results)
    examples = sorted({r["examples"] for r in results["entries"]})
    lines = [
        f"Flatness of the {results['benchmark']} backbones, each on {'/'.join(map(str, examples))}"
        f" training images of its own domain (seed {s['seed']}, BatchNorm in eval mode). "
        "Larger = sharper.",
        "",
        f"- **rho-sharpness**: largest loss increase found within L2 distance rho = {s['rho']:g}"
        f" of the weights ({s['sharpness_steps']} projected ascent steps from SAM's point).",
        f"- **top eigenvalue**: of the Hessian (power iteration: at most {s['power_iters']}"
        " steps"
        + (
            f", stopped when consecutive estimates agree to {s['power_tol']:g}"
            if s["power_tol"]
            else ""
        )
        + ").",
        f"- **Hessian trace**: Hutchinson estimate ({s['trace_samples']} Rademacher probes)"
        " ± 95% interval.",
        "",
    ]
    header = ["domain"] + [f"{title} {m}" for _, title, _ in FLATNESS_MEASURES for m in methods]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|---" + "|---:" * (len(header) - 1) + "|")
    for domain, row in by_domain.items():
        cells = [
            _flatness_cell(row.get(m), key, ci) for key, _, ci in FLATNESS_MEASURES for m in methods
        ]
        lines.append(f"| {domain} | " + " | ".join(cells) + " |")
    for sam, erm in families.sam_vs_erm(methods):
        both = [row for row in by_domain.values() if sam in row and erm in row]
        if not both:
            continue
        tallies = ", ".join(
            f"{sum(row[sam][key] < row[erm][key] for row in both)}/{len(both)} by {title}"
            for key, title, _ in FLATNESS_MEASURES[1:]
        )
        lines += ["", f"{sam} is flatter than {erm} (smaller value) on {tallies}."]
    return "\n".join(lines) + "\n"


_FLATNESS_CSV_FIELDS = (
    "domain",
    "method",
    "key",
    "arch",
    "num_params",
    "training_rho",
    "examples",
    "train_loss",
    "train_accuracy",
    "sharpness",
    "perturbed_loss",
    "perturbation_norm",
    "top_eigenvalue",
    "eigenvalue_relative_change",
    "eigenvalue_iterations",
    "hessian_trace",
    "hessian_trace_se",
    "seconds",
)


def write_flatness_report(results: dict, out_dir) -> dict[str, Any]:
    """Writes flatness.json/.md/.csv and the landscape PNGs; returns their paths.

    ``results`` is what :func:`flatfsc_jax.flatness.zoo.measure_zoo` returns. Returns
    ``dict(json, markdown, csv, landscapes={domain: png}, landscapes_2d=...)``:
    ``landscape_<domain>.png`` holds the 1-D landscapes of a domain's backbones on one
    plot, ``landscape2d_<domain>.png`` the contours where 2-D landscapes were measured.
    """
    if not results.get("entries"):
        raise ValueError("results hold no entries: nothing to report")
    final_dir = os.fspath(out_dir)
    # Rendered whole into a staging directory, then moved over the previous report.
    with atomic.staged(final_dir) as out_dir:
        paths = _render(results, out_dir)
    return {
        k: (
            {d: atomic.final_path(p, out_dir, final_dir) for d, p in v.items()}
            if isinstance(v, dict)
            else atomic.final_path(v, out_dir, final_dir)
        )
        for k, v in paths.items()
    }


def _render(results: dict, out_dir: str) -> dict[str, Any]:
    paths: dict[str, Any] = {
        "json": os.path.join(out_dir, "flatness.json"),
        "markdown": os.path.join(out_dir, "flatness.md"),
        "csv": os.path.join(out_dir, "flatness.csv"),
        "landscapes": {},
        "landscapes_2d": {},
    }
    by_domain = _flatness_by_domain(results)
    with open(paths["json"], "w") as f:
        json.dump(results, f, indent=1)
    with open(paths["markdown"], "w") as f:
        f.write(flatness_markdown(results))
        f.write(
            "\n1-D landscapes (training loss along one filter-normalised random direction "
            "per backbone): " + ", ".join(f"landscape_{d}.png" for d in by_domain) + ".\n"
        )
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_FLATNESS_CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results["entries"])
    for domain, row in by_domain.items():
        ordered = sorted(row.items(), key=lambda kv: flatness_method_order(kv[0]))
        curves = {
            method: (r["landscape_1d"]["alphas"], r["landscape_1d"]["losses"])
            for method, r in ordered
        }
        losses = np.concatenate([np.asarray(c[1]) for c in curves.values()])
        paths["landscapes"][domain] = landscape.plot_landscape_1d(
            curves,
            os.path.join(out_dir, f"landscape_{domain}.png"),
            title=f"{results['benchmark']}/{domain}: training loss along a random direction",
            # The loss explodes at |alpha| ~ 1 and would flatten the basin on a linear axis.
            log_scale=bool(losses.min() > 0 and losses.max() > 10 * losses.min()),
        )
        surfaces = {
            method: (
                r["landscape_2d"]["alphas"],
                r["landscape_2d"]["betas"],
                r["landscape_2d"]["losses"],
            )
            for method, r in ordered
            if "landscape_2d" in r
        }
        if surfaces:
            paths["landscapes_2d"][domain] = landscape.plot_landscape_2d(
                surfaces,
                os.path.join(out_dir, f"landscape2d_{domain}.png"),
                title=f"{results['benchmark']}/{domain}: training loss, two random directions",
            )
    return paths
