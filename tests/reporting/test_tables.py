"""Tests for flatfsc_jax.reporting.tables: tables, paired differences and the headline figure."""

import errno
import math
import os

import numpy as np
import pytest

from flatfsc_jax import errors, families
from flatfsc_jax.flatness import landscape
from flatfsc_jax.flatness import report as flatness_report
from flatfsc_jax.reporting import tables as tables_lib

SIX = ["sam+ft", "erm", "erm+kd", "sam", "erm+ft", "sam+kd"]  # shuffled on purpose


def _fake_results(seed=0):
    rng = np.random.default_rng(seed)
    results = {
        "benchmark": "glyphs",
        "families": SIX,
        "adaptations": ["ncc", "pa", "finetune"],
        "seen_domains": ["cjk", "latin"],
        "episodes": 30,
        "finetune_episodes": 5,
        "pa_episodes": 30,
        "tsa_episodes": 5,
        "domains": {},
    }
    for domain, seen in (("thai", False), ("cjk", True), ("latin", True)):
        fams = {}
        for i, fam in enumerate(SIX):
            accs = {a: rng.uniform(0.3 + 0.05 * i, 0.9, 30).tolist() for a in ("ncc", "pa")}
            if fam in ("erm", "sam"):  # fine-tuned at test time: these two only
                accs["finetune"] = rng.uniform(0.4, 1.0, 5).tolist()
            fams[fam] = accs
        results["domains"][domain] = {"seen": seen, "families": fams, "selection": {}}
    return results


def _stats(x):
    x = 100 * np.asarray(x)
    return x.mean(), 1.96 * x.std() / math.sqrt(len(x))


def test_comparisons_are_the_papers_pairs_where_both_exist():
    assert families.comparisons(SIX) == [
        ("sam", "erm"),
        ("sam+kd", "erm+kd"),
        ("sam+ft", "erm+ft"),
        ("erm+ft", "erm+kd"),
        ("sam+ft", "sam+kd"),
    ]
    assert families.comparisons(["erm", "sam", "erm+ft"]) == [("sam", "erm")]
    assert families.comparisons(["erm+lora", "erm+kd"]) == [("erm+lora", "erm+kd")]
    assert families.ordered_families(SIX + ["x"]) == [
        "erm", "sam", "erm+kd", "sam+kd", "erm+ft", "sam+ft", "x"
    ]  # fmt: skip


def test_table_cells_and_paired_differences_match_numpy():
    results = _fake_results()
    table = tables_lib.build_table(results)
    rows = {r["name"]: r["cells"] for r in table["rows"]}
    assert [r["name"] for r in table["rows"]] == [
        "cjk", "latin", "thai", "average seen", "average unseen"
    ]  # fmt: skip
    fams = results["domains"]["thai"]["families"]
    for a in ("ncc", "pa"):
        for f in SIX:
            mean, ci = _stats(fams[f][a])
            assert rows["thai"][f"{f} / {a}"][:2] == pytest.approx((mean, ci))
        for x, y in families.comparisons(SIX):
            mean, ci = _stats(np.asarray(fams[x][a]) - np.asarray(fams[y][a]))
            assert rows["thai"][f"{x} - {y} / {a}"][:2] == pytest.approx((mean, ci))
            # The seen average is the plain mean of the two seen domains' differences.
            per = [
                100
                * np.mean(
                    np.subtract(
                        results["domains"][d]["families"][x][a],
                        results["domains"][d]["families"][y][a],
                    )
                )
                for d in ("cjk", "latin")
            ]
            assert rows["average seen"][f"{x} - {y} / {a}"][0] == pytest.approx(np.mean(per))
    # Fine-tuning: only the two families that have it, and only their difference.
    ft_keys = [k for k in table["keys"] if k.endswith(" / finetune")]
    assert ft_keys == ["erm / finetune", "sam / finetune", "sam - erm / finetune"]
    # Columns of one adaptation in the paper's family order, then the differences.
    pa_keys = [k for k in table["keys"] if k.endswith(" / pa")]
    assert pa_keys[:6] == [f"{f} / pa" for f in families.FAMILY_ORDER[:6]]
    assert len(pa_keys) == 6 + 5


def test_markdown_has_one_table_per_adaptation_and_the_png_is_written(tmp_path):
    results = _fake_results()
    md = tables_lib.to_markdown(results)
    assert md.count("Adaptation: **") == 3
    assert "pa" in md and "finetune: the first 5" in md
    header = next(line for line in md.splitlines() if line.startswith("| domain | erm | sam"))
    assert "erm+kd | sam+kd | erm+ft | sam+ft | sam - erm | sam+kd - erm+kd" in header
    paths = tables_lib.write_report(results, tmp_path)
    assert (tmp_path / "headline.png").stat().st_size > 10_000
    assert set(paths) == {"json", "markdown", "csv", "png"}


def test_flatness_report_pairs_sam_with_erm_and_orders_fused_variants():
    methods = sorted(
        ["sam+kd", "erm+ft", "sam", "erm+kd", "erm", "sam+ft"],
        key=flatness_report.flatness_method_order,
    )
    assert methods == ["erm", "sam", "erm+ft", "sam+ft", "erm+kd", "sam+kd"]
    assert families.sam_vs_erm(methods) == [
        ("sam", "erm"),
        ("sam+ft", "erm+ft"),
        ("sam+kd", "erm+kd"),
    ]
    assert families.sam_vs_erm(["sam", "erm+ft", "sam+lora"]) == []


# Reports are replaced whole or not at all (docs/zoo.md#reliability): a failing plot or a
# full disk leaves the previous report byte-identical.


def _snapshot(d):
    return {n: (d / n).read_bytes() for n in sorted(os.listdir(d))}


@pytest.fixture
def previous(tmp_path):
    out = tmp_path / "report"
    tables_lib.write_report(_fake_results(0), out)
    return out, _snapshot(out)


def test_failing_plot_leaves_the_previous_report_intact(previous, monkeypatch):
    out, before = previous

    def broken(*a, **k):
        raise RuntimeError("matplotlib failed")

    monkeypatch.setattr(tables_lib, "plot_headline", broken)
    with pytest.raises(RuntimeError, match="matplotlib failed"):
        tables_lib.write_report(_fake_results(1), out)
    assert _snapshot(out) == before  # no staging directory left either


def test_full_disk_mid_write_leaves_the_previous_report_intact(previous, monkeypatch):
    out, before = previous
    real = tables_lib.plot_headline

    def half_written_png(results, table, path):
        real(results, table, path)
        with open(path, "r+b") as f:  # the disk fills up halfway through the PNG
            f.truncate(os.path.getsize(path) // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tables_lib, "plot_headline", half_written_png)
    with pytest.raises(OSError, match="No space left"):
        tables_lib.write_report(_fake_results(1), out)
    assert _snapshot(out) == before


def test_a_new_report_replaces_every_file(previous):
    out, before = previous
    paths = tables_lib.write_report(_fake_results(1), out)
    after = _snapshot(out)
    assert set(after) == set(before) == {os.path.basename(p) for p in paths.values()}
    assert after["results.json"] != before["results.json"]


def test_empty_results_are_refused_before_writing(previous):
    out, before = previous
    empty = dict(_fake_results(1), adaptations=[])
    with pytest.raises(errors.ResultsError, match="no adaptation"):
        tables_lib.write_report(empty, out)
    assert _snapshot(out) == before


def _flatness_results(shift):
    entries = []
    for method in ("erm", "sam"):
        entries.append(
            dict(
                domain="latin",
                method=method,
                key=f"glyphs/latin/{method}",
                examples=8,
                train_loss=0.5 + shift,
                sharpness=0.1,
                top_eigenvalue=2.0,
                hessian_trace=3.0,
                hessian_trace_se=0.1,
                landscape_1d=dict(alphas=[-1.0, 0.0, 1.0], losses=[2.0, 0.5 + shift, 2.0]),
            )
        )
    settings = dict(seed=0, rho=0.05, sharpness_steps=1, power_iters=2, power_tol=None)
    return dict(benchmark="glyphs", settings=dict(settings, trace_samples=2), entries=entries)


def test_flatness_report_failing_plot_leaves_the_previous_one(tmp_path, monkeypatch):
    out = tmp_path / "flatness"
    paths = flatness_report.write_flatness_report(_flatness_results(0.0), out)
    assert paths["landscapes"]["latin"] == str(out / "landscape_latin.png")
    before = _snapshot(out)
    assert set(before) == {"flatness.json", "flatness.md", "flatness.csv", "landscape_latin.png"}

    def broken(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(landscape, "plot_landscape_1d", broken)
    with pytest.raises(OSError):
        flatness_report.write_flatness_report(_flatness_results(1.0), out)
    assert _snapshot(out) == before


def test_markdown_names_the_test_setting():
    results = _fake_results()
    assert "(Meta-Dataset's variable-way variable-shot)" in tables_lib.to_markdown(results)
    results["episode_spec"] = "1shot"
    first = tables_lib.to_markdown(results).splitlines()[0]
    assert "30 test episodes per domain (URL's five-way one-shot)" in first
