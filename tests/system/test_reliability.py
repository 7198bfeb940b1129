"""Reliability (docs/zoo.md#reliability): never a wrong backbone in a report.

Finite states only (a diverged run leaves no complete entry and no NaN checkpoint), no
reuse of a complete entry the config no longer describes, damaged entries found and
named, every bad key caught before anything compiles, readable errors with exit code 2.
"""

import ast
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import glyphs as glyphs_config
from flatfsc_jax import config_lib, entry_keys, errors, experiment, families, models
from flatfsc_jax import zoo as zoo_lib
from flatfsc_jax.fusion import finetune
from flatfsc_jax.training import loop, optim, resumable
from flatfsc_jax.training import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPE = (16, 16, 1)


def _main(*args, timeout=180):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "flatfsc_jax.main", *args, "--compilation_cache="],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _tiny(**changes):
    c = glyphs_config.get_config("tiny")
    for key, value in changes.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def _all_finite(tree) -> bool:
    leaves = [np.asarray(x) for x in jax.tree.leaves(tree)]
    return all(np.all(np.isfinite(x)) for x in leaves if np.issubdtype(x.dtype, np.inexact))


# --------------------------------------------------------------------------------------
# 1. A diverged backbone is never stored, checkpointed or finalized.
# --------------------------------------------------------------------------------------


def test_diverged_run_fails_leaves_nothing_non_finite_and_a_sane_rerun_works(tmp_path, capsys):
    work = tmp_path / "work"
    c = _tiny(
        domains=("latin",),
        methods=("erm",),
        **{"fusion.enabled": False, "evaluation.enabled": False},
    )
    c.data_dir = str(tmp_path / "data")
    c.checkpoint_every = c.log_every = 1  # save early: any checkpoint kept must be finite
    c.per_domain.latin.lr = 1e6  # the command: the loss stays finite under BN
    with pytest.raises(resumable.NonFiniteError, match=r"NaN/inf|non-finite loss") as err:
        experiment.run(c, str(work), ("train",), progress=False)
    assert "config.per_domain.latin.lr" in str(err.value)
    zoo = zoo_lib.Zoo(work / "zoo")
    assert not zoo.is_complete("glyphs", "latin", "erm")
    assert zoo.list() == []
    entry_dir = zoo.entry_dir("glyphs", "latin", "erm")
    # Whatever was saved is finite: the "last good" checkpoint really is good.
    train_dir = entry_dir / "train"
    steps_saved = [n for n in os.listdir(train_dir) if n.isdigit()] if train_dir.exists() else []
    with ocp.StandardCheckpointer() as ckptr:
        for step in steps_saved:
            assert _all_finite(ckptr.restore(train_dir / step / "state")), step
        if (entry_dir / "best").exists():
            assert _all_finite(ckptr.restore(entry_dir / "best"))

    # The same command with a sane lr discards the unfinished run and completes.
    c.per_domain.latin.lr = 0.05
    experiment.run(c, str(work), ("train",), progress=False)
    out = capsys.readouterr().out
    if steps_saved:
        assert "discarded an unfinished run with other settings (lr: 1000000.0 -> 0.05" in out
    entry = zoo.get("glyphs", "latin", "erm")
    assert entry.metadata["config"]["lr"] == 0.05
    assert _all_finite(zoo.load("glyphs", "latin", "erm").variables)


def test_unfinished_run_with_other_settings_is_discarded(tmp_path):
    c = _tiny()
    zoo = zoo_lib.Zoo(tmp_path)
    cfg = config_lib.domain_config(c, "latin", "sam")
    assert zoo.begin("glyphs", "latin", "sam", {"config": cfg.to_dict()}) == []
    (zoo.entry_dir("glyphs", "latin", "sam") / "train" / "3").mkdir(parents=True)
    # Same settings: the unfinished run is kept (resumed).
    assert zoo.begin("glyphs", "latin", "sam", {"config": cfg.to_dict()}) == []
    assert (zoo.entry_dir("glyphs", "latin", "sam") / "train" / "3").exists()
    c.per_domain.latin.lr = 1e6
    cfg2 = config_lib.domain_config(c, "latin", "sam")
    changes = zoo.begin("glyphs", "latin", "sam", {"config": cfg2.to_dict()})
    assert changes == ["lr: 0.05 -> 1000000.0"]
    assert not (zoo.entry_dir("glyphs", "latin", "sam") / "train").exists()


def test_non_finite_leaves_names_params_and_batch_stats():
    model = models.build_model("conv4", 3, width=0.125)
    state = step_lib.create_train_state(
        model,
        optim.make_optimizer(
            learning_rate=0.1, momentum=0.9, weight_decay=0.0, restart_period=2, num_steps=2
        ),
        jax.random.key(0),
        jnp.zeros((1, *SHAPE)),
    )
    assert resumable.non_finite_leaves(state) == []
    stats = jax.tree.map(lambda x: x.at[..., 0].set(jnp.inf), state.batch_stats)
    bad = resumable.non_finite_leaves(state.replace(batch_stats=stats))
    assert bad and all(b.startswith("['batch_stats']") for b in bad)
    params = jax.tree.map(lambda x: x * jnp.nan, state.params)
    bad = resumable.non_finite_leaves(state.replace(params=params))
    assert len(bad) == len(jax.tree.leaves(state.params))


# --------------------------------------------------------------------------------------
# 2. Complete entries are reused only when the config still describes them.
# --------------------------------------------------------------------------------------


def _write_raw(zoo, domain, name, cfg, *, seed=0, extra=None):
    model = models.build_model("conv4", 4, width=0.125)
    variables = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, *SHAPE)))
    return zoo.write(
        "glyphs",
        domain,
        name,
        variables=variables,
        model_config=dict(arch="conv4", width=0.125, dtype="float32", num_classes=4),
        image_shape=SHAPE,
        metadata=dict(config=cfg.to_dict(), best_validation=dict(accuracy=0.5), **(extra or {})),
    )


def _write(zoo, config, domain, method, *, seed=0, fused_from=None):
    """A complete zoo entry (conv4) whose metadata config is the run's effective one."""
    if fused_from is None:
        return _write_raw(zoo, domain, method, config_lib.domain_config(config, domain, method))
    cfg = config_lib.domain_config(finetune.fusion_config(config), domain, method)
    extra = dict(fusion=dict(source_sha256=fused_from.best_sha256))
    name = families.fused_method(method, config.fusion.mode)
    return _write_raw(zoo, domain, name, cfg, seed=seed, extra=extra)


@pytest.fixture
def no_training(monkeypatch):
    """experiment.run without data or training: records what the train stage trains."""
    trained = []

    def fake_train(config, zoo, domain, method, **kw):
        name = kw.get("entry_method") or method
        trained.append((domain, name))
        cfg = config_lib.domain_config(config, domain, method)
        return _write_raw(zoo, domain, name, cfg, extra=kw.get("extra_metadata"))

    monkeypatch.setattr(experiment, "check_data", lambda *a: None)
    monkeypatch.setattr(loop, "train_and_evaluate", fake_train)
    return trained


def test_changed_backbone_keys_stop_the_run_naming_keys_and_choices(tmp_path, no_training):
    c = _tiny(**{"fusion.enabled": False, "evaluation.enabled": False})
    zoo = zoo_lib.Zoo(tmp_path / "zoo")
    for m in c.methods:
        for d in c.domains:
            _write(zoo, c, d, m)
    # Keys that do not define the backbone: reused.
    same = _tiny(**{"fusion.enabled": False, "evaluation.enabled": False})
    same.evaluation.episodes = 50
    same.validation.batch_size = 32
    same.log_every = 1
    experiment.run(same, str(tmp_path), ("train",), progress=False)
    assert no_training == []
    for key, value, change in [
        ("per_domain.latin.rho", 0.2, "sam.rho: 0.1 -> 0.2"),
        ("per_domain.latin.lr", 0.02, "lr: 0.05 -> 0.02"),
        ("per_domain.latin.num_steps", 7, "num_steps: 6 -> 7"),
        ("model.width", 0.25, "model.width: 0.125 -> 0.25"),
        ("model.arch", "conv4", "model.arch: 'resnet18' -> 'conv4'"),
    ]:
        changed = _tiny(**{"fusion.enabled": False, "evaluation.enabled": False, key: value})
        with pytest.raises(zoo_lib.StaleEntryError) as err:
            experiment.run(changed, str(tmp_path), ("train",), progress=False)
        msg = str(err.value)
        assert f"glyphs/latin/sam: {change}" in msg, msg
        assert "--retrain" in msg and "rm -r" in msg and "--workdir" in msg
        assert no_training == [], "nothing may train before the check"
    # --retrain retrains (here: every entry of the run).
    retrain = _tiny(**{"fusion.enabled": False, "evaluation.enabled": False, "retrain": True})
    retrain.per_domain.latin.rho = 0.2
    experiment.run(retrain, str(tmp_path), ("train",), progress=False)
    assert sorted(no_training) == sorted((d, m) for m in retrain.methods for d in retrain.domains)


def test_retrained_source_invalidates_fused_entries(tmp_path, no_training, capsys):
    c = _tiny(**{"evaluation.enabled": False})  # fusion: cjk -> latin
    zoo = zoo_lib.Zoo(tmp_path / "zoo")
    for m in c.methods:
        for d in c.domains:
            _write(zoo, c, d, m)
    for m in c.methods:
        _write(zoo, c, "latin", m, fused_from=zoo.get("glyphs", "cjk", m))
    experiment.run(c, str(tmp_path), ("train", "fuse"), progress=False)
    assert no_training == []  # everything current: reused
    # cjk/sam retrained (another backbone): latin/sam+ft is fused again, erm+ft is not.
    zoo.invalidate("glyphs", "cjk", "sam")
    _write_raw(zoo, "cjk", "sam", config_lib.domain_config(c, "cjk", "sam"), seed=7)
    experiment.run(c, str(tmp_path), ("fuse",), progress=False)
    assert no_training == [("latin", "sam+ft")]
    assert "glyphs/cjk/sam was retrained; fusing again" in capsys.readouterr().out


def test_fine_tuned_entries_are_shared_by_fusion_mode_lists(tmp_path):
    """The +ft entries of fusion.mode "full" are the same backbones under "full,distill"
    (adding distillation to a finished run) and the other way round; "lora" is not."""
    c = _tiny(**{"evaluation.enabled": False})
    zoo = zoo_lib.Zoo(tmp_path / "zoo")
    for m in c.methods:
        for d in c.domains:
            _write(zoo, c, d, m)
        _write(zoo, c, "latin", m, fused_from=zoo.get("glyphs", "cjk", m))  # mode "full"
    both = _tiny(**{"evaluation.enabled": False, "fusion.mode": "full,distill"})
    assert experiment.stale_entries(both, zoo) == []
    stored = zoo.get("glyphs", "latin", "sam+ft").metadata["config"]
    assert stored["fusion"]["mode"] == "full"
    # An entry written by a "full,distill" run before entries stored their own mode.
    legacy = json.loads(json.dumps(stored))
    legacy["fusion"]["mode"] = "full,distill"
    wanted = config_lib.domain_config(finetune.fusion_config(c, "full"), "latin", "sam")
    assert entry_keys.config_changes(legacy, wanted.to_dict(), fused=True) == []
    assert entry_keys.config_changes(stored, wanted.to_dict(), fused=True) == []
    lora = config_lib.domain_config(finetune.fusion_config(c, "lora"), "latin", "sam")
    assert entry_keys.config_changes(stored, lora.to_dict(), fused=True) == [
        "fusion.mode: 'full' -> 'lora'"
    ]


def test_evaluation_refuses_a_fused_entry_of_an_older_source(tmp_path):
    c = _tiny()
    zoo = zoo_lib.Zoo(tmp_path / "zoo")
    for m in c.methods:
        for d in c.domains:
            _write(zoo, c, d, m)
        _write(zoo, c, "latin", m, fused_from=zoo.get("glyphs", "cjk", m))
    experiment.check_fused_sources(c, zoo)
    zoo.invalidate("glyphs", "cjk", "erm")
    _write_raw(zoo, "cjk", "erm", config_lib.domain_config(c, "cjk", "erm"), seed=3)
    with pytest.raises(zoo_lib.StaleEntryError, match=r"latin/erm\+ft was fine-tuned from an"):
        experiment.check_fused_sources(c, zoo)


# --------------------------------------------------------------------------------------
# 3. One meaning per config key.
# --------------------------------------------------------------------------------------


def test_a_domain_always_trains_with_its_row():
    # One domain of the Glyphs table: its row, not Meta-Dataset's defaults.
    c = glyphs_config.get_config()
    c.domains = ("latin",)
    c.fusion.enabled = False
    config_lib.validate(c)
    e = config_lib.domain_config(c, "latin", "sam")
    row = glyphs_config.GLYPHS_TABLE["latin"]
    assert (e.batch_size, e.lr, e.num_steps, e.restart_period, e.sam.rho) == (
        row["batch_size"],
        row["lr"],
        row["num_steps"],
        row["restart_period"],
        row["rho"],
    )
    assert (row["num_steps"], c.per_domain.latin.num_steps) != (50_000, None)
    assert config_lib.domain_config(c, "latin", "erm").sam.rho == 0.0


@pytest.mark.parametrize(
    "key, value, fix",
    [
        ("sam.rho", float("nan"), "--config.per_domain.latin.rho=nan"),
        ("lr", 0.0, "--config.per_domain.cjk.lr=0.0"),
        ("num_steps", 10, "--config.per_domain.latin.num_steps=10"),
        ("batch_size", 32, "--config.per_domain.cjk.batch_size=32"),
        ("restart_period", 3, "--config.per_domain.latin.restart_period=3"),
    ],
)
def test_ignored_top_level_override_is_an_error_naming_the_row_key(key, value, fix):
    for domains in (("latin",), ("cjk", "latin")):
        c = _tiny(domains=domains, **{"fusion.enabled": False, key: value})
        with pytest.raises(config_lib.ConfigError, match="would be ignored") as err:
            config_lib.validate(c)
        if fix.split(".")[2] in domains:
            assert fix in str(err.value)
        with pytest.raises(config_lib.ConfigError):
            config_lib.domain_config(c, "latin", "sam")


def test_sam_rho_on_the_command_line_points_to_the_row():
    proc = _main("--config=configs/sam_resnet18.py:omniglot", "--config.sam.rho=0.1", "--dry_run")
    assert proc.returncode == 2
    assert "--config.per_domain.omniglot.rho=0.1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_dry_run_prints_every_entry_effective_values():
    proc = _main("--config=configs/glyphs.py:tiny", "--dry_run", "--workdir=/nonexistent/w")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for line in (
        "glyphs/cjk/erm: batch 64, lr 0.05, steps 6, restart period 6, rho 0",
        "glyphs/latin/sam: batch 64, lr 0.05, steps 6, restart period 6, rho 0.1",
        "glyphs/latin/sam+ft: batch 64, lr 0.01, steps 3, restart period 3, rho 0.1",
    ):
        assert line in out, out[-2000:]


# --------------------------------------------------------------------------------------
# 4, 5. Damaged and foreign entries.
# --------------------------------------------------------------------------------------


def test_truncated_best_checkpoint_is_damaged_named_and_retrained_alone(
    tmp_path, no_training, capsys
):
    c = _tiny(**{"fusion.enabled": False, "evaluation.enabled": False})
    zoo = zoo_lib.Zoo(tmp_path / "zoo")
    for m in c.methods:
        for d in c.domains:
            _write(zoo, c, d, m)
    best = zoo.entry_dir("glyphs", "latin", "sam") / "best"
    files = [os.path.join(r, f) for r, _, fs in os.walk(best) for f in fs]
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)
    assert zoo.status("glyphs", "latin", "sam")[0] == "damaged"
    assert [e.key for e in zoo.list()] == ["glyphs/cjk/erm", "glyphs/cjk/sam", "glyphs/latin/erm"]
    with pytest.raises(zoo_lib.DamagedEntryError) as err:
        zoo.load("glyphs", "latin", "sam")
    path = str(zoo.entry_dir("glyphs", "latin", "sam"))
    assert f"delete {path!r} and re-run" in str(err.value)
    # The train stage retrains that entry only, and says so.
    experiment.run(c, str(tmp_path), ("train",), progress=False)
    assert no_training == [("latin", "sam")]
    assert "glyphs/latin/sam: damaged" in capsys.readouterr().out
    assert zoo.status("glyphs", "latin", "sam")[0] == "complete"


def test_non_finite_stored_backbone_is_refused(tmp_path):
    zoo = zoo_lib.Zoo(tmp_path / "zoo")
    model = models.build_model("conv4", 4, width=0.125)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, *SHAPE)))
    variables = dict(variables, params=jax.tree.map(lambda x: x * jnp.nan, variables["params"]))
    zoo.write(
        "glyphs",
        "latin",
        "erm",
        variables=variables,
        model_config=dict(arch="conv4", width=0.125, dtype="float32", num_classes=4),
        image_shape=SHAPE,
        metadata=dict(config={}, best_validation=dict(accuracy=0.16)),
    )
    with pytest.raises(zoo_lib.DamagedEntryError, match=r"are NaN/inf .* delete"):
        zoo.load("glyphs", "latin", "erm")


def test_dry_run_shows_which_entries_are_stale(tmp_path):
    c = _tiny()
    zoo = zoo_lib.Zoo(tmp_path / "zoo")
    _write(zoo, c, "latin", "sam")
    proc = _main(
        "--config=configs/glyphs.py:tiny",
        "--dry_run",
        f"--workdir={tmp_path}",
        "--config.per_domain.latin.rho=0.2",
    )
    assert proc.returncode == 0, proc.stderr
    assert "glyphs/latin/sam: batch 64, lr 0.05, steps 6, restart period 6, rho 0.2" in proc.stdout
    assert "[STALE: sam.rho: 0.1 -> 0.2]" in proc.stdout
    assert "glyphs/latin/erm: batch 64, lr 0.05, steps 6, restart period 6, rho 0  [absent]" in (
        proc.stdout
    )


def test_restore_failure_names_the_entry_and_fix(tmp_path):
    c = _tiny()
    zoo = zoo_lib.Zoo(tmp_path / "zoo")
    entry = _write(zoo, c, "latin", "sam")
    meta = json.loads((entry.path / "metadata.json").read_text())
    del meta["best_sha256"]  # an entry written before checksums: restore is the check
    (entry.path / "metadata.json").write_text(json.dumps(meta))
    for r, _, fs in os.walk(entry.path / "best"):
        for f in fs:
            if os.path.getsize(os.path.join(r, f)) > 1000:
                open(os.path.join(r, f), "wb").close()
    with pytest.raises(zoo_lib.DamagedEntryError, match=r"glyphs/latin/sam is damaged .* delete"):
        zoo.load("glyphs", "latin", "sam")


@pytest.mark.parametrize("content", ["[]", "null", '{"complete": true}', "3", '"x"'])
def test_metadata_that_is_not_an_entry_is_skipped(tmp_path, content, caplog, no_training):
    c = _tiny(**{"fusion.enabled": False, "evaluation.enabled": False})
    zoo = zoo_lib.Zoo(tmp_path / "zoo")
    _write(zoo, c, "cjk", "sam")
    d = zoo.entry_dir("glyphs", "latin", "sam")
    d.mkdir(parents=True)
    (d / "metadata.json").write_text(content)
    assert [e.key for e in zoo.list()] == ["glyphs/cjk/sam"]
    assert "not a zoo entry" in caplog.text
    assert "glyphs/latin" not in zoo_lib.format_listing(zoo.list())  # what the listing prints
    # The train stage treats it as unfinished and trains it.
    experiment.run(c, str(tmp_path), ("train",), progress=False)
    assert ("latin", "sam") in no_training


# --------------------------------------------------------------------------------------
# 6, 7. Everything validated before compiling; errors a person can read.
# --------------------------------------------------------------------------------------


def test_finetune_families_are_checked_only_when_a_backbone_adaptation_reads_them():
    c = _tiny(methods=("erm",))
    c.fusion.enabled = False
    c.evaluation.finetune_families = ("erm", "sam")  # the Glyphs default names sam
    with pytest.raises(config_lib.ConfigError, match=r"has \['sam'\], not a family"):
        config_lib.validate(c)
    c.evaluation.adaptations = ("ncc", "pa")  # nothing fine-tunes: the key is not read
    config_lib.validate(c)


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.domains=('latn',)", "config.domains has 'latn', not a glyphs domain"),
        ("--config.domains=('latin','thai')", "config.per_domain has no row for it"),
        ("--config.log_every=0", "config.log_every must be a positive integer"),
        ("--config.checkpoint_every=0", "config.checkpoint_every must be a positive integer"),
        ("--config.fusion.source_domain=greek", "config.fusion.source_domain='greek'"),
        ("--config.evaluation.episodes=0", "config.evaluation.episodes"),
        ("--config.validation.batch_size=0", "config.validation.batch_size"),
        ("--config.validation.every=-1", "config.validation.every"),
        ("--config.evaluation.finetune_steps=0", "config.evaluation.finetune_steps"),
        ("--config.evaluation.domains=('latin','klingon')", "config.evaluation.domains"),
        ("--config.evaluation.domains=()", "config.evaluation.domains is empty"),
        ("--config.evaluation.adaptations=()", "config.evaluation.adaptations is empty"),
        ("--config.evaluation.adaptations=('ncc','ncc')", "repeats ['ncc']"),
        ("--config.evaluation.finetune_families=('erm+kd',)", "has ['erm+kd'], not a family"),
        ("--config.evaluation.pa_steps=0", "config.evaluation.pa_steps=0 but"),
        ("--config.evaluation.finetune_episodes=0", "config.evaluation.finetune_episodes=0 but"),
        ("--stages=bogus", "--stages=bogus has ['bogus']"),
    ],
)
def test_bad_values_fail_in_validation(override, message):
    c = _tiny()
    if override.startswith("--stages"):
        with pytest.raises(config_lib.ConfigError, match=message.replace("[", r"\[")):
            experiment.check_stages(["bogus"])
        return
    key, _, value = override.removeprefix("--config.").partition("=")
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value if leaf == "source_domain" else ast.literal_eval(value)
    with pytest.raises(config_lib.ConfigError) as err:
        config_lib.validate(c)
    assert message in str(err.value)


def test_dry_run_validates_and_errors_exit_2_without_traceback(tmp_path):
    for args, message in [
        (("--stages=bogus",), "--stages=bogus"),
        (("--config.evaluation.adaptations=('ncc','ncc')",), "repeats ['ncc']"),
        (("--config.domains=('latin','thai')",), "config.per_domain has no row"),
    ]:
        proc = _main("--config=configs/glyphs.py:tiny", "--dry_run", *args)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr
    proc = _main("--config=configs/glyphs.py:tiny", "--dry_run", "--stages=bogus", "--traceback")
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    # An unwritable workdir (here: a file) is named before any data is read.
    afile = tmp_path / "afile"
    afile.write_text("")
    proc = _main("--config=configs/glyphs.py:tiny", f"--workdir={afile}")
    assert proc.returncode == 2
    assert f"--workdir={afile} is not a writable directory" in proc.stderr
    assert "Traceback" not in proc.stderr and not (afile.parent / "data").exists()


def test_zoo_hints(tmp_path):
    zoo = zoo_lib.Zoo(tmp_path / "work" / "zoo")
    with pytest.raises(FileNotFoundError, match=r"\./run\.sh --config=configs/glyphs\.py "):
        zoo.get("glyphs", "latin", "sam")
    with pytest.raises(FileNotFoundError, match=r"configs/sam_resnet18\.py"):
        zoo.get("meta_dataset", "dtd", "sam+ft")
    _write(zoo, _tiny(), "latin", "sam")
    proc = subprocess.run(
        [sys.executable, "-m", "flatfsc_jax.cli.zoo", f"--zoo={tmp_path / 'work'}"],
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert re.search(r"is a workdir, not a zoo: use --zoo=.*work/zoo", proc.stderr), proc.stderr


# --------------------------------------------------------------------------------------
# 8, 9. Prepared data: checked before training; only our own feature classes.
# --------------------------------------------------------------------------------------


def test_prepared_data_is_verified_and_repaired(tmp_path, capsys):
    from flatfsc_jax.data import glyphs, sources

    data = str(tmp_path / "data")
    glyphs.prepare(data, ["digits"])
    path = sources.prepared_dir(data, "glyphs", "digits")
    sources.verify_prepared(path, ["test"], source="glyphs/digits")
    # A lost dataset_info.json: prepare rebuilds the domain instead of doing nothing.
    os.remove(os.path.join(path, "dataset_info.json"))
    capsys.readouterr()
    glyphs.prepare(data, ["digits"])
    assert "glyphs/digits: prepared" in capsys.readouterr().out
    assert os.path.isfile(os.path.join(path, "dataset_info.json"))
    sources.verify_prepared(path, ["test"], source="glyphs/digits")
    # A missing shard is named before any image is read.
    shard = next(n for n in os.listdir(path) if "-test." in n)
    os.rename(os.path.join(path, shard), os.path.join(tmp_path, shard))
    with pytest.raises(sources.MissingDataError, match=f"{shard} is missing"):
        sources.verify_prepared(path, ["test"], source="glyphs/digits")
    c = _tiny(**{"evaluation.domains": ("digits",)})
    c.data_dir = data
    with pytest.raises(errors.DataError, match="delete .* and prepare it again"):
        experiment.check_data(c, ("evaluate",))
    os.rename(os.path.join(tmp_path, shard), os.path.join(path, shard))
    # features.json naming a class we never write (TFDS would import its module).
    features = os.path.join(path, "features.json")
    text = open(features).read()
    with open(features, "w") as f:
        f.write(text.replace("scalar.Scalar", "evil.Payload"))
    with pytest.raises(sources.MissingDataError, match="trusted input"):
        sources.read_prepared_split(data, "glyphs", "digits", "test")
    with open(features, "w") as f:
        f.write("[]")
    with pytest.raises(sources.MissingDataError, match="features.json .* not a JSON object"):
        sources.verify_prepared(path, ["test"], source="glyphs/digits")


# --------------------------------------------------------------------------------------
# Messages: only our own exception types are "expected"; hints name the right command.
# --------------------------------------------------------------------------------------


def test_only_our_own_errors_are_expected(tmp_path, monkeypatch):
    from flatfsc_jax import main
    from flatfsc_jax.data import benchmarks, sources
    from flatfsc_jax.flatness import zoo as flatness_zoo

    expected = main.expected_errors()
    assert expected == (errors.FlatfscError,)
    ours = (
        config_lib.ConfigError,
        zoo_lib.ZooError,
        zoo_lib.DamagedEntryError,
        zoo_lib.StaleEntryError,
        zoo_lib.MissingEntryError,
        zoo_lib.IncompatibleCheckpointError,
        experiment.WorkdirError,
        resumable.NonFiniteError,
        errors.DataError,
        errors.WorkdirLockedError,
        flatness_zoo.EmptyZooError,
    )
    assert all(issubclass(e, expected) for e in ours)
    # A bug's ValueError / OSError keeps its traceback (not caught as expected).
    assert not issubclass(ValueError, expected) and not issubclass(OSError, expected)
    # The builtin bases callers catch are kept.
    assert issubclass(config_lib.ConfigError, ValueError)
    assert issubclass(zoo_lib.MissingEntryError, FileNotFoundError)

    def missing(*a, **k):
        raise sources.MissingDataError("glyphs/latin train split is missing in /x")

    monkeypatch.setattr(benchmarks, "ensure_prepared", missing)
    with pytest.raises(errors.DataError, match="latin train split is missing in /x"):
        experiment.check_data(_tiny(data_dir=str(tmp_path)), ("train",))


def test_student_hint_names_distillation(tmp_path):
    zoo = zoo_lib.Zoo(tmp_path / "zoo")
    with pytest.raises(zoo_lib.MissingEntryError, match=r"configs/glyphs\.py:kd --stages"):
        zoo.get("glyphs", "cjk", "sam+kd")
    with pytest.raises(zoo_lib.MissingEntryError, match=r"glyphs\.py --stages"):
        zoo.get("glyphs", "cjk", "sam+ft")
    with pytest.raises(zoo_lib.MissingEntryError, match=r"sam_resnet18\.py --config\.fusion\.mode"):
        zoo.get("meta_dataset", "ilsvrc_2012", "sam+kd")


@pytest.mark.parametrize("key", ["tsa_episodes", "tsa_steps"])
def test_tsa_without_episodes_or_steps_is_refused(key):
    c = _tiny(**{"evaluation.adaptations": ("ncc", "tsa"), f"evaluation.{key}": 0})
    with pytest.raises(config_lib.ConfigError, match=rf"config\.evaluation\.{key}=0 but"):
        config_lib.validate(c)
    c.evaluation.adaptations = ("ncc",)  # not requested: not checked
    config_lib.validate(c)
