"""The frontier end to end on ``configs/frontier.py:tiny`` (4 methods x 2 seeds, conv4).

One run trains, measures, evaluates and analyses. The table is then recomputed from the
per-backbone records it stored with plain loops and ``scipy.stats``; the gradient counts
are checked against the methods' definitions; a second run reuses everything.
"""

import json
import os

import numpy as np
import pytest
from scipy import stats

from flatfsc_jax import config_lib
from flatfsc_jax.flatness import frontier, study
from flatfsc_jax.training import loop as loop_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(arg="tiny"):
    return config_lib.sibling_module(os.path.join(ROOT, "configs", "x.py"), "frontier").get_config(
        arg
    )


@pytest.fixture(scope="module")
def tiny_frontier(tmp_path_factory):
    # The steps timed depend on which programs this process already ran (the loop's
    # in-process cache): start from none, whatever tests ran here before.
    loop_lib._COMPILED_STEPS.clear()
    workdir = tmp_path_factory.mktemp("frontier")
    results = frontier.run(_config(), str(workdir), progress=False)
    return workdir, results


def test_full_frontier_members_validate_and_each_method_is_what_it_says():
    c = _config(None)
    c.data_dir = "unused"
    frontier.check(c)  # every member's config validates
    members = frontier.members(c)
    assert len(members) == 30 and len({m.name for m in members}) == 30
    by = {m.label: m.configure(c) for m in members if m.seed == 0}
    assert by["erm_2x"].per_domain.latin.num_steps == 2 * by["erm"].per_domain.latin.num_steps
    assert by["erm_2x"].per_domain.latin.restart_period == 500
    assert by["sam_late"].flat.late_start == 425  # the last 15% of 500 steps
    assert by["ema"].flat.method == "erm" and by["ema"].flat.average == "ema"
    assert by["erm"].per_domain.latin.rho == 0 and by["sam"].per_domain.latin.rho == 0.1
    assert all("frontier" not in v and "study" not in v for v in by.values())
    ema = next(m for m in members if m.label == "ema")
    assert ema.training_rho is None  # weight averaging alone has no radius
    long = _config("long")
    long.data_dir = "unused"
    frontier.check(long)
    sam_late = next(m for m in frontier.members(long) if m.label == "sam_late")
    assert sam_late.configure(long).flat.late_start == 2125  # the last 15% of 2500 steps
    with pytest.raises(ValueError, match="'tiny' or 'long'"):
        _config("tiny,long")


def test_bad_frontier_settings_are_named_before_any_work():
    c = _config()
    del c.frontier.methods["sam"]
    with pytest.raises(config_lib.ConfigError, match="no \\['sam'\\]"):
        frontier.check(c)
    c = _config()
    c.frontier.targets = ("latin",)
    with pytest.raises(config_lib.ConfigError, match="config.frontier.targets"):
        frontier.check(c)
    c = _config()
    c.frontier.methods.sam.flat = {"method": "nope"}
    with pytest.raises(config_lib.ConfigError, match="config.flat.method"):
        frontier.check(c)


@pytest.mark.slow
def test_tiny_frontier_table_checks_out_and_a_rerun_reuses_everything(tiny_frontier, capsys):
    workdir, results = tiny_frontier
    out = workdir / "frontier"
    for name in ("results.json", "table.md", "frontier.png"):
        assert (out / name).stat().st_size > 0, name
    rows = {r["method"]: r for r in results["rows"]}
    assert list(rows) == ["erm", "sam_late", "erm_2x", "sam"]  # by cost, then name
    # Gradient evaluations of 4 steps: ERM 1 each, SAM 2, SAM-late SAM from step 3,
    # ERM at SAM's compute 8 steps.
    grads = {m: results["costs"][f"{m}_s0"]["gradient_evaluations"] for m in rows}
    assert grads == {"erm": 4, "sam_late": 5, "sam": 8, "erm_2x": 8}
    assert rows["sam_late"]["grads_x_erm"] == pytest.approx(1.25)
    # A member's cost is the steps it timed: the calls that compiled a program are not
    # counted (SAM-late compiles two), and seed 1 reuses seed 0's programs (ERM at twice
    # the steps reuses ERM's).
    timed = {n: c["timed_steps"] for n, c in results["costs"].items()}
    assert timed == {
        "erm_s0": 3,
        "erm_s1": 4,
        "sam_late_s0": 2,
        "sam_late_s1": 4,
        "sam_s0": 3,
        "sam_s1": 4,
        "erm_2x_s0": 8,
        "erm_2x_s1": 8,
    }
    assert all(c["seconds"] > 0 for c in results["costs"].values())
    # The transfer column from the stored per-episode accuracies, by plain loops.
    targets = results["targets"]
    for m in rows:
        values = []
        for seed in (0, 1):
            per_target = [
                np.mean(
                    study._read_json(str(workdir / "study" / "outcomes" / f"{m}_s{seed}.json"))[t][
                        "ncc"
                    ]
                )
                for t in targets
            ]
            values.append(np.mean(per_target))
        assert rows[m]["unseen"]["mean"] == pytest.approx(np.mean(values), abs=1e-6)
        assert rows[m]["unseen"]["sd"] == pytest.approx(np.std(values, ddof=1), abs=1e-6)
    # Paired differences against SAM: per seed, with scipy's t interval over seeds.
    for m in rows:
        d = [results["unseen"][f"{m}_s{s}"] - results["unseen"][f"sam_s{s}"] for s in (0, 1)]
        assert rows[m]["vs_sam"]["mean"] == pytest.approx(np.mean(d), abs=1e-9)
        if np.std(d) > 0:
            lo, hi = stats.t.interval(0.95, len(d) - 1, loc=np.mean(d), scale=stats.sem(d))
            assert rows[m]["vs_sam"]["ci95"] == pytest.approx((hi - lo) / 2, rel=1e-6)
    assert rows["sam"]["vs_sam"]["mean"] == 0 and rows["erm"]["vs_erm"]["mean"] == 0
    # The goal's verdict follows its definition.
    for m, v in results["goal"]["per_method"].items():
        assert v["cheap"] == (rows[m]["grads_x_erm"] <= 1.25)
        assert v["transfers"] == (rows[m]["unseen"]["mean"] >= rows["sam"]["unseen"]["mean"])
    table = (out / "table.md").read_text()
    assert table.count("\n| ") == len(rows) and "reached by" in table  # one line each
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(results["rows"]))

    capsys.readouterr()
    again = frontier.run(_config(), str(workdir), progress=False)
    printed = capsys.readouterr().out
    assert printed.count("complete, reusing it") == 8
    assert "measured" not in printed and "evaluated" not in printed
    assert again["rows"] == results["rows"]


def test_bad_measurement_settings_are_named_before_any_training():
    c = _config()
    c.study.sharpness.average_samples = 1
    with pytest.raises(config_lib.ConfigError, match="config.study.sharpness: average_samples"):
        frontier.check(c)
    c = _config()
    c.study.examples = 16
    with pytest.raises(config_lib.ConfigError, match="worst_batch=32 is larger"):
        frontier.check(c)
