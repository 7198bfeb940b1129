"""Training loop: kill -9 and resume gives bit-identical parameters; NaN loss stops cleanly."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from flatfsc_jax import zoo as zoo_lib
from flatfsc_jax.training import loop as loop_lib
from flatfsc_jax.training import resumable

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A tiny run of one Glyphs domain; each input batch sleeps a little so the parent can
# kill the process mid-run (the sleep does not change any number).
SCRIPT = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {root!r})
    import jax
    jax.config.update("jax_compilation_cache_dir", {cache!r})
    from flatfsc_jax import zoo as zoo_lib
    from flatfsc_jax.training import loop as loop_lib
    from flatfsc_jax.data import pipeline
    from configs import glyphs as glyphs_config

    make = pipeline.make_train_iterator

    class Slow:
        def __init__(self, it): self.it = it
        def __next__(self):
            time.sleep({sleep})
            return next(self.it)
        def __getattr__(self, name): return getattr(self.it, name)

    pipeline.make_train_iterator = lambda *a, **k: Slow(make(*a, **k))
    c = glyphs_config.get_config("tiny")
    c.data_dir = {data!r}
    c.domains = ("latin",)
    row = c.per_domain.latin
    row.num_steps, row.restart_period, row.batch_size = 24, 24, 16
    c.checkpoint_every, c.log_every = 4, 1
    c.validation.every, c.validation.episodes = 8, 4
    loop_lib.train_and_evaluate(c, zoo_lib.Zoo({zoo!r}), "latin", "sam", progress=False)
    print("FINISHED")
    """
)


def _script(tmp_path, zoo, sleep):
    path = tmp_path / f"run_{os.path.basename(zoo)}.py"
    path.write_text(
        SCRIPT.format(
            root=ROOT,
            cache=str(tmp_path / "cache"),
            sleep=sleep,
            data=str(tmp_path / "data"),
            zoo=zoo,
        )
    )
    return [sys.executable, str(path)]


def _steps_saved(zoo):
    d = os.path.join(zoo, "glyphs", "latin", "sam", "train")
    if not os.path.isdir(d):
        return []
    return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def _final_params(zoo_root):
    zoo = zoo_lib.Zoo(zoo_root)
    entry = zoo.get("glyphs", "latin", "sam")
    loaded = zoo.load("glyphs", "latin", "sam")
    return entry, jax.tree.leaves(loaded.variables)


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    out = subprocess.run(
        _script(tmp_path, full, 0.0), env=env, capture_output=True, text=True, timeout=600
    )
    assert "FINISHED" in out.stdout, out.stderr[-3000:]

    proc = subprocess.Popen(
        _script(tmp_path, resumed, 0.25),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not any(s >= 8 for s in _steps_saved(resumed)):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    time.sleep(0.6)  # let it log a step or two past the checkpoint: they are re-done
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _steps_saved(resumed)
    assert killed_at and max(killed_at) < 24, killed_at
    assert not zoo_lib.Zoo(resumed).is_complete("glyphs", "latin", "sam")

    out = subprocess.run(
        _script(tmp_path, resumed, 0.0), env=env, capture_output=True, text=True, timeout=600
    )
    assert "FINISHED" in out.stdout, out.stderr[-3000:]

    entry_a, params_a = _final_params(full)
    entry_b, params_b = _final_params(resumed)
    for a, b in zip(params_a, params_b, strict=True):
        np.testing.assert_array_equal(a, b)
    assert entry_a.metadata["best_validation"] == entry_b.metadata["best_validation"]
    # The resumed run logged the steps after the restart, and none twice after the kill:
    # its log is the uninterrupted run's, record for record (timings aside).
    log = loop_lib.read_metrics(zoo_lib.Zoo(resumed).entry_dir("glyphs", "latin", "sam"))
    records = [(r["step"], "val_accuracy" in r) for r in log]  # (step, validation record?)
    assert len(records) == len(set(records)), f"a step was logged twice: {records}"
    assert [s for s, val in records if not val] == list(range(1, 25))  # log_every = 1
    assert [s for s, val in records if val] == [8, 16, 24]  # validation.every = 8
    full_log = loop_lib.read_metrics(zoo_lib.Zoo(full).entry_dir("glyphs", "latin", "sam"))
    no_timing = [
        [{k: v for k, v in r.items() if k != "images_per_s"} for r in x] for x in (log, full_log)
    ]
    assert no_timing[0] == no_timing[1]


def test_non_finite_state_stops_with_clear_error_and_saves_nothing_non_finite(tmp_path):
    import orbax.checkpoint as ocp

    from configs import glyphs as glyphs_config

    c = glyphs_config.get_config("tiny")
    c.data_dir = str(tmp_path / "data")
    c.domains = ("latin",)
    row = c.per_domain.latin
    row.num_steps, row.restart_period = 12, 12
    c.checkpoint_every, c.log_every, c.validation.every, c.validation.episodes = 2, 2, 12, 2
    row.lr = 1e12  # diverges within a few steps
    zoo = zoo_lib.Zoo(tmp_path / "zoo")
    with pytest.raises(
        resumable.NonFiniteError, match=r"Lower config\.per_domain\.latin\.lr"
    ) as err:
        loop_lib.train_and_evaluate(c, zoo, "latin", "erm", progress=False)
    assert not zoo.is_complete("glyphs", "latin", "erm")
    train_dir = zoo.entry_dir("glyphs", "latin", "erm") / "train"
    saved = sorted(int(n) for n in os.listdir(train_dir) if n.isdigit())
    # The checkpoint the error calls "last good" is the latest one kept, and it is finite
    # (the loss alone is not enough: under BatchNorm it stays finite while weights are NaN).
    if saved:
        assert f"last good checkpoint (step {saved[-1]};" in str(err.value)
    else:  # never "step None"
        assert "No checkpoint was saved and nothing was marked complete" in str(err.value)
    with ocp.StandardCheckpointer() as ckptr:
        for step in saved:
            state = ckptr.restore(train_dir / str(step) / "state")
            for leaf in jax.tree.leaves(state):
                leaf = np.asarray(leaf)
                if np.issubdtype(leaf.dtype, np.inexact):
                    assert np.all(np.isfinite(leaf)), step


def test_sam_late_compiles_its_second_program_outside_the_timed_steps(tmp_path):
    """SAM-late runs the one-gradient program, then the SAM one: each first call is a
    compile section, and the steps section counts the other steps (cost per step)."""
    from configs import glyphs as glyphs_config
    from flatfsc_jax.profiling import PROFILE

    c = glyphs_config.get_config("tiny")
    c.data_dir = str(tmp_path / "data")
    c.domains = ("latin",)
    row = c.per_domain.latin
    row.num_steps, row.restart_period, row.batch_size = 6, 6, 8
    c.checkpoint_every, c.log_every, c.validation.every, c.validation.episodes = 6, 2, 6, 2
    c.flat.method, c.flat.late_start = "sam_late", 3
    PROFILE.reset()
    loop_lib.train_and_evaluate(c, zoo_lib.Zoo(tmp_path / "zoo"), "latin", "sam", progress=False)
    assert PROFILE.counts["train/compile"] == 2  # step 0 (ERM program) and step 3 (SAM)
    assert PROFILE.counts["train/steps"] == 4  # steps 1, 2, 4 and 5
    PROFILE.reset()
