"""metrics.jsonl and TensorBoard hold the same numbers, and a resumed run logs each step once.

The event files are read back with TensorBoard's own reader (``EventAccumulator``, which
also applies the purge markers of resumed runs), independent of the writer's code.
"""

import json
import os
from collections import Counter

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from flatfsc_jax.training import metrics_writer


def _tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator.EventAccumulator(
        str(logdir), size_guidance={event_accumulator.SCALARS: 0}
    )
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _jsonl_scalars(records) -> dict[str, list[tuple[int, float]]]:
    out = {}
    for r in records:
        for k, v in r.items():
            if k != "step" and isinstance(v, int | float):
                out.setdefault(k, []).append((r["step"], float(v)))
    return out


def assert_same_scalars(logdir):
    """Every JSONL number is a TensorBoard scalar at the same step (float32), and back."""
    jsonl = _jsonl_scalars(metrics_writer.read_jsonl(os.path.join(logdir, "metrics.jsonl")))
    tb = _tensorboard_scalars(logdir)
    assert jsonl, "no records"
    assert sorted(tb) == sorted(jsonl)
    for tag, points in jsonl.items():
        assert [s for s, _ in tb[tag]] == [s for s, _ in points], tag
        np.testing.assert_allclose(
            [v for _, v in tb[tag]], np.float32([v for _, v in points]), rtol=0, atol=0
        )


def assert_no_step_twice(records):
    """No (step, key) pair twice: a record kind is logged at most once per step."""
    seen = Counter((r["step"], k) for r in records for k in r if k != "step")
    twice = sorted(key for key, n in seen.items() if n > 1)
    assert not twice, f"logged twice: {twice[:10]}"


def _train_record(step, scale=1.0):
    return {
        "loss": np.float32(scale * 2.5 / step),
        "perturbed_loss": np.float32(scale * 2.6 / step),
        "sharpness": 0.1 * scale / step,
        "grad_norm": np.float64(scale * 1.25),
        "learning_rate": 0.05 * (1 - step / 20),
        "images_per_s": 1234.5 + step,
    }


def test_event_file_scalars_equal_jsonl(tmp_path):
    with metrics_writer.MetricsWriter(tmp_path) as w:
        for step in range(1, 11):
            w.write(step, _train_record(step))
            if step % 5 == 0:
                w.write(step, {"val_accuracy": 0.5 + step / 100, "val_ci95": 0.02, "best": True})
    records = metrics_writer.read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 5, 6, 7, 8, 9, 10, 10]
    assert records[0]["loss"] == pytest.approx(2.5, rel=1e-6)
    assert records[5] == {"step": 5, "val_accuracy": 0.55, "val_ci95": 0.02, "best": True}
    assert_same_scalars(tmp_path)
    tb = _tensorboard_scalars(tmp_path)
    assert tb["best"] == [(5, 1.0), (10, 1.0)]  # bools become 0/1 scalars
    assert any(n.startswith("events.out.tfevents.") for n in os.listdir(tmp_path))


def test_resume_drops_records_after_the_checkpoint_step(tmp_path):
    # A first run logs steps 1..9, is killed mid-line, and had checkpointed step 6.
    w = metrics_writer.MetricsWriter(tmp_path)
    for step in range(1, 10):
        w.write(step, _train_record(step))
        if step % 3 == 0:
            w.write(step, {"val_accuracy": step / 10, "val_ci95": 0.01})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 10, "loss": 0.1')  # a line cut short by kill -9
    # The resumed run redoes steps 7..12 with (here) different numbers.
    with metrics_writer.MetricsWriter(tmp_path, resume_step=6) as w:
        for step in range(7, 13):
            w.write(step, _train_record(step, scale=3.0))
            if step % 3 == 0:
                w.write(step, {"val_accuracy": step / 20, "val_ci95": 0.03})

    records = metrics_writer.read_jsonl(tmp_path / "metrics.jsonl")
    assert_no_step_twice(records)
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(losses) == list(range(1, 13))
    assert losses[6] == pytest.approx(2.5 / 6)  # before the checkpoint: the first run's
    assert losses[7] == pytest.approx(3 * 2.5 / 7)  # after it: the resumed run's
    assert {r["step"]: r["val_accuracy"] for r in records if "val_accuracy" in r} == {
        3: 0.3,
        6: 0.6,
        9: 9 / 20,
        12: 12 / 20,
    }
    # TensorBoard hides the first run's steps > 6 (purge marker) and so shows the same.
    assert_same_scalars(tmp_path)
    assert len([n for n in os.listdir(tmp_path) if "tfevents" in n]) == 2


def test_resume_without_checkpoint_starts_the_log_afresh(tmp_path):
    with metrics_writer.MetricsWriter(tmp_path) as w:
        w.write(1, {"loss": 1.0})
        w.write(2, {"loss": 2.0})
    # killed before the first checkpoint: the rerun starts from step 0
    with metrics_writer.MetricsWriter(tmp_path, resume_step=0) as w:
        w.write(1, {"loss": 5.0})
    assert metrics_writer.read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 5.0}]
    assert _tensorboard_scalars(tmp_path) == {"loss": [(1, 5.0)]}


def test_truncate_after_keeps_earlier_records_and_is_atomic(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in range(1, 6)))
    assert metrics_writer.truncate_after(path, 3) == 2
    assert [r["step"] for r in metrics_writer.read_jsonl(path)] == [1, 2, 3]
    assert metrics_writer.truncate_after(path, 3) == 0
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]  # no temporary file left


def test_disabled_writer_writes_nothing(tmp_path):
    # processes other than 0
    with metrics_writer.MetricsWriter(tmp_path / "entry", enabled=False) as w:
        w.write(1, {"loss": 1.0})
    assert not (tmp_path / "entry").exists()


@pytest.mark.slow
def test_tiny_training_run_logs_the_same_scalars_to_tensorboard(tmp_path):
    from configs import glyphs as glyphs_config
    from flatfsc_jax import zoo as zoo_lib
    from flatfsc_jax.training import loop

    c = glyphs_config.get_config("tiny")
    c.data_dir = str(tmp_path / "data")
    c.domains = ("latin",)
    row = c.per_domain.latin
    row.num_steps, row.restart_period, row.batch_size = 4, 4, 16
    c.checkpoint_every, c.log_every, c.validation.every, c.validation.episodes = 4, 2, 2, 2
    zoo = zoo_lib.Zoo(tmp_path / "zoo")
    loop.train_and_evaluate(c, zoo, "latin", "sam", progress=False)
    entry_dir = zoo.entry_dir("glyphs", "latin", "sam")
    records = loop.read_metrics(entry_dir)
    assert_no_step_twice(records)
    assert_same_scalars(entry_dir)
    tags = set(_tensorboard_scalars(entry_dir))
    expected = {"loss", "perturbed_loss", "sharpness", "grad_norm", "learning_rate"}
    expected |= {"val_accuracy", "val_ci95", "images_per_s"}
    assert expected <= tags, expected - tags


def test_truncate_after_survives_records_that_are_not_objects(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n[3]\n7\n{"step": 2}\n{"step": 5}\n{"loss"')
    assert metrics_writer.truncate_after(path, 2) == 4
    assert metrics_writer.read_jsonl(path) == [{"step": 1, "loss": 1.0}, {"step": 2}]
    assert sum(str(path) in r.getMessage() for r in caplog.records) == 1
