"""The flatness study end to end on ``configs/flatness_study.py:tiny`` (9 conv4 backbones).

One run trains, measures, evaluates and analyses; the statistics it wrote are then
recomputed from the per-backbone arrays it stored, with ``reporting.correlation`` and
``scipy.stats`` as the references, and a second run reuses every cache.
"""

import json
import math
import os

import numpy as np
import pytest
from scipy import stats

from flatfsc_jax import config_lib
from flatfsc_jax.flatness import study
from flatfsc_jax.reporting import correlation, significance
from flatfsc_jax.training import resumable

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config():
    return config_lib.sibling_module(
        os.path.join(ROOT, "configs", "x.py"), "flatness_study"
    ).get_config("tiny")


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("study")
    results = study.run(_config(), str(workdir), progress=False)
    return workdir, results


def test_population_is_the_crossed_design_with_anchor_seeds():
    full = config_lib.sibling_module(
        os.path.join(ROOT, "configs", "x.py"), "flatness_study"
    ).get_config()
    full.data_dir = "unused"
    study.check_study(full)  # every member's config validates
    members = study.population(full.study)
    assert len(members) == 60 and len({m.name for m in members}) == 60
    per_config = {}
    for m in members:
        per_config[m.configuration] = per_config.get(m.configuration, 0) + 1
    assert per_config["erm_lr0.05_bs64_rho0"] == per_config["sam_lr0.05_bs64_rho0.1"] == 4
    assert sorted(set(per_config.values())) == [2, 4] and len(per_config) == 28
    asam = study.member_config(full, next(m for m in members if m.optimiser == "asam"))
    assert asam.sam.adaptive and asam.methods == ("sam",) and "study" not in asam
    msam = study.member_config(full, next(m for m in members if m.optimiser == "msam"))
    assert msam.flat.method == "msam" and not msam.sam.adaptive and msam.methods == ("sam",)
    assert significance.min_detectable_tau(60) == pytest.approx(0.1736, abs=1e-3)
    # Enough permutations that a Holm-corrected row can pass .05: a two-sided permutation
    # p is at least 2 / (n_perm + 1), times 64 tests.
    assert study.planned_tests(full) == 12 * 5 + 4
    assert study.holm_floor(64, full.study.n_perm) == pytest.approx(128 / 10_001)
    assert study.holm_floor(64, 2000) > 0.05  # the earlier setting could not


@pytest.mark.slow
def test_tiny_study_writes_its_outputs_and_its_statistics_check_out(tiny_study):
    workdir, results = tiny_study
    out = workdir / "study"
    for name in ("results.json", "table.md", "table.csv", "scatter_adaptive_worst_sharpness.png"):
        assert (out / name).stat().st_size > 0
    stored = json.loads((out / "results.json").read_text())
    n = stored["n"]
    assert n == 9 and len(stored["members"]) == 9
    rows = stored["rows"]
    outcomes = ["unseen_mean", "greek", "hangul", "digits"]
    measures = list(stored["measures"])
    assert len(rows) == len(measures) * len(outcomes) + len(stored["parc"])
    assert rows[0]["primary"] and sum(r["primary"] for r in rows) == 1
    assert (rows[0]["measure"], rows[0]["outcome"]) == ("adaptive_worst_sharpness", "unseen_mean")
    md = (out / "table.md").read_text()
    assert md.count("\n| ") == len(rows) + 1  # header + one line per row
    assert len(rows) == study.planned_tests(_config())
    assert stored["holm_floor"] == pytest.approx(min(1, 2 * len(rows) / (stored["n_perm"] + 1)))
    assert f"can fall below {stored['holm_floor']:.3f}" in md

    # Outcomes: the mean over the shared episodes of every target.
    episodes = {t: np.array(v) for t, v in stored["episode_accuracies"].items()}
    assert all(e.shape == (n, 20) for e in episodes.values())
    for t, e in episodes.items():
        np.testing.assert_allclose(stored["outcomes"][t], e.mean(1))
    np.testing.assert_allclose(
        stored["outcomes"]["unseen_mean"], np.concatenate(list(episodes.values()), 1).mean(1)
    )

    s = _config().study
    x = np.array(stored["measures"]["adaptive_worst_sharpness"])
    y = np.array(stored["outcomes"]["unseen_mean"])
    z = np.array(stored["measures"]["source_val_accuracy"])
    row = rows[0]
    assert row["tau"] == pytest.approx(stats.kendalltau(x, y).statistic)
    ref = correlation.kendall_tau(x, y, n_boot=s.n_boot, n_perm=s.n_perm, seed=s.stats_seed)
    assert row["p"] == pytest.approx(ref["p"])
    for k in ("ci_low", "ci_high"):
        assert (math.isnan(row[k]) and math.isnan(ref[k])) or row[k] == pytest.approx(ref[k])
    part = correlation.partial_tau(x, y, z, n_boot=s.n_boot, n_perm=s.n_perm, seed=s.stats_seed)
    assert row["tau_partial"] == pytest.approx(part["tau_partial"], nan_ok=True)
    groups = correlation.group_taus(x, y, stored["factors"]["optimiser"], n_perm=s.n_perm)
    assert row["tau_within"] == pytest.approx(groups["pooled_within"]["tau"], nan_ok=True)
    psi = correlation.granulated_tau(x, y, stored["factors"], axes=stored["axes"])["psi"]
    assert row["psi"] == pytest.approx(psi, nan_ok=True)
    np.testing.assert_allclose(
        [r["p_holm"] for r in rows], significance.holm([r["p"] for r in rows])
    )
    parc_greek = next(r for r in rows if r["measure"] == "parc_greek")
    assert parc_greek["outcome"] == "greek"
    assert parc_greek["tau"] == pytest.approx(
        stats.kendalltau(stored["parc"]["greek"], stored["outcomes"]["greek"]).statistic
    )


@pytest.mark.slow
def test_a_second_run_reuses_every_backbone_and_cache(tiny_study):
    workdir, first = tiny_study
    caches = sorted((workdir / "study").glob("*/*.json")) + sorted(
        (workdir / "members").glob("*/zoo/*/*/*/metadata.json")
    )
    assert len(caches) == 3 * 9
    before = {p: p.stat().st_mtime_ns for p in caches}
    again = study.run(_config(), str(workdir), progress=False)
    assert {p: p.stat().st_mtime_ns for p in caches} == before
    assert again["rows"][0]["tau"] == first["rows"][0]["tau"]


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("primary_measure", "flatness", "config.study.primary_measure='flatness'"),
        ("primary_outcome", "kana", "config.study.primary_outcome='kana'"),
        ("far_targets", ("latin",), "targets have 'latin'"),
        ("anchors", (("sam", 0.05, 64, 0.3),), "config.study.anchors"),
    ],
)
def test_a_bad_study_setting_fails_before_any_work_naming_its_key(tmp_path, key, value, match):
    config = _config()
    config.study[key] = value
    with pytest.raises(config_lib.ConfigError, match=match):
        study.run(config, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def test_a_diverged_member_is_marked_and_not_retrained(tmp_path, monkeypatch):
    config = _config()
    members = study.population(config.study)
    calls = []

    def fake_run(cfg, workdir, stages, progress):
        calls.append(os.path.basename(workdir))
        if os.path.basename(workdir) == members[0].name:
            os.makedirs(workdir, exist_ok=True)
            raise resumable.NonFiniteError("loss is nan at step 3")

    monkeypatch.setattr(study.experiment, "run", fake_run)
    study.train(config, str(tmp_path), members[:2], progress=False)
    assert study.diverged(str(tmp_path), members[0]) == "loss is nan at step 3"
    assert study.diverged(str(tmp_path), members[1]) is None
    study.train(config, str(tmp_path), members[:2], progress=False)
    assert calls == [members[0].name, members[1].name, members[1].name]
