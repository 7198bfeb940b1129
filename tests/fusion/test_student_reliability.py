"""Distilled students meet backbone training's standard (docs/zoo.md#reliability): a
diverged student is never complete and the advice works, changed keys or teachers stop
the run, the dry run lists students, an unfinished student restarts under new settings,
a damaged teacher is named as damaged. One zoo of random teachers is shared."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import glyphs as glyphs_config
from flatfsc_jax import config_lib, experiment, models
from flatfsc_jax import zoo as zoo_lib
from flatfsc_jax.data import benchmarks
from flatfsc_jax.fusion import distill, finetune
from flatfsc_jax.training import resumable


def _config(data_dir):
    c = glyphs_config.get_config("tiny,kd")
    domains = ("cjk", "latin")
    config_lib.with_table(
        c,
        {d: dict(glyphs_config.GLYPHS_TABLE[d], num_steps=4, restart_period=4) for d in domains},
        domains,
    )
    glyphs_config.with_distillation(c)
    c.data_dir = str(data_dir)
    c.model.arch = "conv4"  # the recipe's checks, not its quality: the cheapest compile
    c.methods = ("erm",)
    c.fusion.mode = "distill"
    d = c.fusion.distill
    d.num_steps, d.restart_period, d.validation_every = 3, 3, 3
    d.batch_size.cjk, d.batch_size.latin = 16, 16
    c.checkpoint_every = c.log_every = 1
    return c


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """(config, zoo root) with random erm teachers of cjk and latin."""
    root = tmp_path_factory.mktemp("students")
    c = _config(root / "data")
    experiment.check_data(c, ("train",))
    zoo = zoo_lib.Zoo(root / "zoo")
    for i, dom in enumerate(c.domains):
        split = benchmarks.load_split(c.benchmark, dom, "train", c.data_dir)
        model = models.build_model_from_config(c.model, split.num_classes)
        variables = model.init(jax.random.key(i), jnp.zeros((1, *split.image_shape)))
        zoo.write(
            "glyphs",
            dom,
            "erm",
            variables=variables,
            model_config=models.model_metadata(c, split.num_classes),
            image_shape=split.image_shape,
            metadata={"config": config_lib.domain_config(c, dom, "erm").to_dict()},
        )
    return c, root / "zoo"


def _copy(teachers, tmp_path):
    c, root = teachers
    shutil.copytree(root, tmp_path / "zoo")
    return c.copy_and_resolve_references(), zoo_lib.Zoo(tmp_path / "zoo")


@pytest.fixture(scope="module")
def diverged_then_rerun(teachers, tmp_path_factory):
    """The issue's lr=1e6 student, then the advice followed (lower lr, same command)."""
    c, root = teachers
    work = tmp_path_factory.mktemp("diverged")
    shutil.copytree(root, work / "zoo")
    zoo = zoo_lib.Zoo(work / "zoo")
    c = c.copy_and_resolve_references()
    c.fusion.distill.lr = 1e6
    with pytest.raises(resumable.NonFiniteError) as err:
        finetune.fuse(c, zoo, "erm", progress=False)
    state_after_failure = zoo.status("glyphs", "cjk", "erm+kd")
    c.fusion.distill.lr = 0.05
    (entry,) = finetune.fuse(c, zoo, "erm", progress=False)
    return dict(error=str(err.value), state=state_after_failure, zoo=zoo, entry=entry, config=c)


def test_diverged_student_is_never_complete_and_the_advice_works(diverged_then_rerun):
    r = diverged_then_rerun
    assert r["state"][0] != "complete"
    msg = r["error"]
    assert "config.fusion.distill.lr" in msg and "step None" not in msg
    assert "nothing was marked complete" in msg
    # Followed: the lower lr restarted (not resumed the NaN state) and completed finite.
    entry = r["entry"]
    assert entry.metadata["config"]["fusion"]["distill"]["lr"] == 0.05
    loaded = r["zoo"].load("glyphs", "cjk", "erm+kd")
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(loaded.variables))


@pytest.mark.parametrize("key, value", [("lr", 0.01), ("num_steps", 5)])
def test_changed_student_key_after_completion_stops_the_run(diverged_then_rerun, key, value):
    c = diverged_then_rerun["config"].copy_and_resolve_references()
    zoo = diverged_then_rerun["zoo"]
    experiment.check_reuse(c, zoo)  # unchanged: reused
    c.fusion.distill[key] = value
    with pytest.raises(zoo_lib.StaleEntryError, match=rf"erm\+kd: fusion\.distill\.{key}: "):
        experiment.check_reuse(c, zoo)
    assert f"STALE: fusion.distill.{key}" in experiment.describe_plan(c, zoo)


def test_retrained_teacher_is_named_before_evaluation(diverged_then_rerun, tmp_path):
    c = diverged_then_rerun["config"]
    shutil.copytree(diverged_then_rerun["zoo"].root, tmp_path / "zoo")
    zoo = zoo_lib.Zoo(tmp_path / "zoo")
    teacher = zoo.load("glyphs", "latin", "erm")
    variables = jax.tree.map(lambda x: x + 1.0, teacher.variables)
    meta = teacher.entry.metadata
    zoo.write(
        "glyphs",
        "latin",
        "erm",
        variables=variables,
        model_config=meta["model"],
        image_shape=meta["image_shape"],
        metadata={"config": meta["config"]},
    )
    with pytest.raises(zoo_lib.StaleEntryError, match=r"teachers were retrained \(latin\)"):
        experiment.check_fused_sources(c, zoo)


def test_dry_run_lists_students():
    c = glyphs_config.get_config("tiny,kd")
    text = experiment.describe_plan(c)
    lines = {ln.split(":")[0].strip(): ln for ln in text.splitlines() if "+kd:" in ln}
    # Each student with its own rho and teachers (the ERM student is plain ERM).
    assert (
        "rho 0," in lines["glyphs/cjk/erm+kd"] and "the erm backbones" in lines["glyphs/cjk/erm+kd"]
    )
    assert (
        "rho 0.1," in lines["glyphs/cjk/sam+kd"]
        and "the sam backbones" in lines["glyphs/cjk/sam+kd"]
    )


def test_unfinished_student_with_another_lr_restarts(teachers, tmp_path, monkeypatch, capsys):
    c, zoo = _copy(teachers, tmp_path)
    calls = []
    monkeypatch.setattr(distill, "distill", lambda config, zoo, method, **k: calls.append(1))
    finetune._distill(c, zoo, "erm", progress=False)
    train = zoo.entry_dir("glyphs", "cjk", "erm+kd") / "train" / "2"
    train.mkdir(parents=True)  # an unfinished run's checkpoint
    finetune._distill(c, zoo, "erm", progress=False)  # same settings: resumed
    assert train.exists()
    c.fusion.distill.lr = 0.01
    finetune._distill(c, zoo, "erm", progress=False)
    assert not train.exists() and len(calls) == 3
    assert "discarded an unfinished run with other settings (fusion.distill.lr" in (
        capsys.readouterr().out
    )


def test_damaged_teacher_is_named_as_damaged(teachers, tmp_path):
    c, zoo = _copy(teachers, tmp_path)
    best = zoo.entry_dir("glyphs", "latin", "erm") / "best"
    victim = next(os.path.join(d, f) for d, _, fs in os.walk(best) for f in fs)
    with open(victim, "ab") as f:
        f.write(b"x")
    with pytest.raises(zoo_lib.ZooError, match=r"damaged: \['glyphs/latin/erm \(best/"):
        finetune.fuse(c, zoo, "erm", progress=False)
