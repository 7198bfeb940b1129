"""Seed tables, validation curves and the job profile: the evidence-reporting helpers."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from flatfsc_jax import errors, profiling
from flatfsc_jax import zoo as zoo_lib
from flatfsc_jax.reporting import convergence, seeds

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli(module, *args):
    """``python -m flatfsc_jax.cli.<module> ARGS`` from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", f"flatfsc_jax.cli.{module}", *args],
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _results(seed, shift_seen, shift_unseen, rng):
    """Fake protocol results: SAM = ERM + shift on every episode (2 seen, 1 unseen)."""
    doms = {}
    for name, seen, shift in (
        ("a", True, shift_seen),
        ("b", True, shift_seen),
        ("c", False, shift_unseen),
    ):
        erm = rng.uniform(0.3, 0.7, 50)
        doms[name] = {
            "seen": seen,
            "families": {"erm": {"ncc": erm.tolist()}, "sam": {"ncc": (erm + shift).tolist()}},
        }
    return {
        "families": ["erm", "sam"],
        "adaptations": ["ncc"],
        "domains": doms,
        "config": {"seed": seed},
    }


def test_seed_table_means_and_student_t_interval():
    rng = np.random.default_rng(0)
    shifts = [0.01, 0.03, -0.01]
    runs = {f"seed {i}": _results(i, s, 2 * s, rng) for i, s in enumerate(shifts)}
    table = seeds.seed_table(runs)
    rows = {(r["difference"], r["domains"]): r for r in table["rows"]}
    seen = rows[("sam - erm", "seen")]
    np.testing.assert_allclose(seen["per_seed"], [100 * s for s in shifts], atol=1e-9)
    v = np.array([100 * s for s in shifts])
    half = stats.t.ppf(0.975, 2) * v.std(ddof=1) / math.sqrt(3)
    np.testing.assert_allclose([seen["mean"], seen["ci95"]], [v.mean(), half], rtol=1e-12)
    assert seen["positive_seeds"] == 2 and seen["seeds"] == 3
    unseen = rows[("sam - erm", "unseen")]
    np.testing.assert_allclose(unseen["per_seed"], [200 * s for s in shifts], atol=1e-9)
    md = seeds.to_markdown(table)
    assert "| sam - erm | ncc | seen | +1.00 | +3.00 | -1.00 |" in md


def test_one_seed_has_no_interval():
    mean, half = seeds.across_seeds([1.5])
    assert mean == 1.5 and math.isnan(half)


def test_load_runs_rejects_duplicate_seeds(tmp_path):
    rng = np.random.default_rng(1)
    for w in ("w1", "w2"):
        (tmp_path / w / "report").mkdir(parents=True)
        (tmp_path / w / "report" / "results.json").write_text(
            json.dumps(_results(0, 0.0, 0.0, rng))
        )
    with pytest.raises(errors.ResultsError, match="same config.seed"):
        seeds.load_runs([str(tmp_path / "w1"), str(tmp_path / "w2")])
    with pytest.raises(errors.ResultsError, match="does not exist"):
        seeds.load_runs([str(tmp_path / "missing")])


def test_seeds_command_writes_the_table(tmp_path):
    rng = np.random.default_rng(2)
    for seed in (0, 1):
        (tmp_path / f"w{seed}" / "report").mkdir(parents=True)
        (tmp_path / f"w{seed}" / "report" / "results.json").write_text(
            json.dumps(_results(seed, 0.01, 0.02, rng))
        )
    out = tmp_path / "seeds"
    # Workdirs first, then --out: the order scripts/run_seeds.sh uses.
    proc = _cli("seeds", str(tmp_path / "w0"), str(tmp_path / "w1"), f"--out={out}")
    assert proc.returncode == 0, proc.stderr
    assert "| sam - erm | ncc | seen | +1.00 | +1.00 |" in proc.stdout
    assert (out / "seeds.md").read_text() in proc.stdout
    assert json.loads((out / "seeds.json").read_text())["runs"] == ["seed 0", "seed 1"]
    assert _cli("seeds").returncode != 0  # no workdirs: a usage error


def test_read_curves_and_plot(tmp_path):
    entry = tmp_path / "glyphs" / "latin" / "sam"
    entry.mkdir(parents=True)
    lines = [
        {"step": 50, "loss": 1.0},
        {"step": 100, "val_accuracy": 0.5, "val_ci95": 0.01},
        {"step": 200, "val_accuracy": 0.75, "val_ci95": 0.01},
    ]
    text = "\n".join(json.dumps(r) for r in lines) + '\n{"step": 250, "val_acc'  # cut by a kill
    (entry / "metrics.jsonl").write_text(text)
    curves = convergence.read_curves(zoo_lib.Zoo(tmp_path), "glyphs")
    assert curves == {"latin": {"sam": [(100, 50.0), (200, 75.0)]}}
    out = tmp_path / "c.png"
    convergence.plot_convergence(curves, out, budgets={"latin": 200})
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no validation curves"):
        convergence.plot_convergence({}, out)
    cli_out = tmp_path / "figs" / "curves.png"
    proc = _cli(
        "convergence", f"--zoo={tmp_path}", f"--out={cli_out}", "--budget=latin=200", "--title=t"
    )
    assert proc.returncode == 0, proc.stderr
    assert f"written: {cli_out} (1 domains)" in proc.stdout
    assert cli_out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_summary_ratios():
    p = profiling.Profile()
    p.add("train/steps", 60.0)
    p.add("fuse/steps", 10.0)
    p.add("train/compile", 5.0)
    p.add("train/validation", 3.0)
    p.add("fuse/checkpoint", 2.0)
    p.add("evaluate/ncc", 10.0)
    with p.section("report"):
        pass
    s = p.summary(100.0)
    assert s["training_step_share"] == pytest.approx(0.70)
    assert s["training_stage_seconds"] == pytest.approx(80.0)
    assert s["overhead_share_of_training_stage"] == pytest.approx(10.0 / 80.0)
    assert s["counts"]["report"] == 1
    text = profiling.format_summary(s)
    assert "70.0% of the job" in text and "12.5% of the training stages" in text


def test_profile_with_distillation_keeps_shares_within_the_job():
    p = profiling.Profile()
    p.add("train/steps", 20.0)
    p.add("distill/steps", 50.0)
    p.add("distill/compile", 10.0)
    p.add("distill/validation", 10.0)
    s = p.summary(100.0)
    # The student's sections count in both the overheads and the stages they belong to.
    assert s["training_stage_seconds"] == pytest.approx(90.0)
    assert s["overhead_share_of_training_stage"] == pytest.approx(20.0 / 90.0)
    assert s["training_step_share"] == pytest.approx(0.70)
    assert "22.2% of the training stages" in profiling.format_summary(s)


def _write_runs(tmp_path, configs):
    rng = np.random.default_rng(3)
    dirs = []
    for i, cfg in enumerate(configs):
        w = tmp_path / f"w{i}"
        (w / "report").mkdir(parents=True)
        r = _results(i, 0.01, 0.02, rng)
        r["config"] = dict(cfg, seed=i, data_dir=f"/data{i}")
        (w / "report" / "results.json").write_text(json.dumps(r))
        dirs.append(str(w))
    return dirs


def test_seeds_refuse_runs_whose_configs_differ_in_more_than_the_seed(tmp_path, caplog):
    dirs = _write_runs(
        tmp_path,
        [
            {"per_domain": {"latin": {"rho": 0.1}}, "model": {"width": 0.5}},
            {"per_domain": {"latin": {"rho": 0.05}}, "model": {"width": 0.5}},
        ],
    )
    with pytest.raises(errors.ResultsError) as err:
        seeds.load_runs(dirs)
    assert "per_domain.latin.rho: 0.1 | 0.05" in str(err.value)
    assert "model.width" not in str(err.value) and "data_dir" not in str(err.value)
    runs = seeds.load_runs(dirs, allow_config_differences=True)
    assert list(runs) == ["seed 0", "seed 1"]
    assert "per_domain.latin.rho" in caplog.text
    # Same config but the seed and the paths: pooled silently.
    same = _write_runs(tmp_path / "same", [{"model": {"width": 0.5}}] * 2)
    assert len(seeds.load_runs(same)) == 2


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_report_and_seeds_commands_name_a_damaged_results_file(tmp_path, content):
    (tmp_path / "report").mkdir()
    path = tmp_path / "report" / "results.json"
    path.write_text(content)
    for proc in (
        _cli("report", f"--workdir={tmp_path}"),
        _cli("seeds", str(tmp_path), f"--out={tmp_path / 'seeds'}"),
    ):
        assert proc.returncode == 1
        assert str(path) in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_read_curves_skips_bad_records_with_one_warning(tmp_path, caplog):
    zoo = zoo_lib.Zoo(tmp_path)
    d = zoo.entry_dir("glyphs", "latin", "erm")
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text(
        '{"step": 1, "val_accuracy": 0.5}\n'
        "[1, 2]\n"
        '"text"\n'
        '{"val_accuracy": 0.6}\n'
        '{"step": 2, "val_accuracy": "high"}\n'
        "{cut by a kill\n"
        '{"step": 3, "val_accuracy": 0.7}\n'
    )
    assert convergence.read_curves(zoo) == {"latin": {"erm": [(1, 50.0), (3, 70.0)]}}
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and str(d / "metrics.jsonl") in warnings[0].getMessage()


def test_convergence_plot_failure_is_a_warning_naming_the_file(tmp_path, monkeypatch, caplog):
    from configs import glyphs as glyphs_config
    from flatfsc_jax import experiment

    zoo = zoo_lib.Zoo(tmp_path / "zoo")
    d = zoo.entry_dir("glyphs", "latin", "erm")
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text('{"step": 1, "val_accuracy": 0.5}\n')
    (tmp_path / "report").mkdir()
    target = tmp_path / "report" / "convergence.png"
    target.write_bytes(b"previous")

    def broken(*a, **k):
        raise ValueError("matplotlib failed")

    monkeypatch.setattr(convergence, "plot_convergence", broken)
    experiment.write_convergence(glyphs_config.get_config("tiny"), zoo, str(target))
    assert str(target) in caplog.text and "matplotlib failed" in caplog.text
    assert target.read_bytes() == b"previous"
