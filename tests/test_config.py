"""Configs: files load, per-domain tables apply, overrides work, bad values name the key."""

import copy
import functools
import subprocess
import sys

import pytest
from absl import flags

from flatfsc_jax import config_lib, entry_keys

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _load(spec, *overrides):
    """get_config(arg) of a config file, with ``--config.a.b=v`` style overrides applied."""
    path, _, arg = spec.partition(":")
    import importlib.util

    mod_spec = importlib.util.spec_from_file_location("cfg", ROOT / path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    config = mod.get_config(arg or None)
    for o in overrides:
        key, _, value = o.removeprefix("--config.").partition("=")
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise KeyError(f"{key} is not a config key")
        old = node[leaf]
        if isinstance(old, str):
            node[leaf] = value
        elif old is None:  # an unset placeholder: numbers only here
            node[leaf] = float(value) if any(ch in value for ch in ".en") else int(value)
        else:
            node[leaf] = type(old)(value)
    return config


def _run_main(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "flatfsc_jax.main", *args, "--compilation_cache="],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def test_sam_config_carries_the_paper_table():
    c = _load("configs/sam_resnet18.py:omniglot")
    assert c.domains == ("omniglot",) and c.methods == ("sam",)
    e = config_lib.domain_config(c, "omniglot", "sam")
    assert (e.batch_size, e.lr, e.num_steps, e.restart_period, e.sam.rho) == (
        16,
        3e-2,
        50_000,
        3_000,
        0.01,
    )
    assert c.model.arch == "resnet18" and c.model.width == 1.0
    config_lib.validate(c)


def test_override_from_the_command_line():
    proc = _run_main(
        "--config=configs/sam_resnet18.py:omniglot",
        "--config.per_domain.omniglot.rho=0.1",
        "--config.per_domain.omniglot.lr=0.5",
        "--dry_run",
    )
    assert proc.returncode == 0, proc.stderr
    # The effective values of the one entry, as --dry_run prints them.
    assert (
        "meta_dataset/omniglot/sam: batch 16, lr 0.5, steps 50000, restart period 3000, rho 0.1"
        in proc.stdout
    )
    c = _load(
        "configs/sam_resnet18.py:omniglot",
        "--config.per_domain.omniglot.rho=0.1",
        "--config.per_domain.omniglot.lr=0.01",
    )
    assert config_lib.domain_config(c, "omniglot", "sam").sam.rho == 0.1
    assert config_lib.domain_config(c, "omniglot", "sam").lr == 0.01
    assert config_lib.domain_config(c, "omniglot", "erm").sam.rho == 0.0


def test_all_domains_use_their_rows():
    c = _load("configs/sam_resnet18.py", "--config.per_domain.dtd.rho=0.2")
    assert c.domains == config_lib.META_DATASET_SEEN
    dtd = config_lib.domain_config(c, "dtd", "sam")
    assert (dtd.batch_size, dtd.restart_period, dtd.sam.rho) == (32, 1_500, 0.2)
    img = config_lib.domain_config(c, "ilsvrc_2012", "sam")
    assert (img.batch_size, img.num_steps, img.sam.rho) == (64, 480_000, 0.05)
    erm = _load("configs/erm_resnet18.py:quickdraw")
    assert erm.methods == ("erm",) and erm.per_domain.quickdraw.lr == 1e-2


def test_glyphs_configs_validate():
    for spec in ("configs/glyphs.py", "configs/glyphs.py:tiny"):
        c = _load(spec)
        assert c.benchmark == "glyphs"
        config_lib.validate(c, num_processes=1)
    c.evaluation.adaptations = ("ncc", "url")
    with pytest.raises(ValueError, match=r"config\.evaluation\.adaptations has 'url'"):
        config_lib.validate(c)


def test_tsa_override_of_the_glyphs_docstring_parses():
    override = "--config.evaluation.adaptations=('ncc','pa','finetune','tsa')"
    proc = _run_main("--config=configs/glyphs.py", override, "--dry_run")
    assert proc.returncode == 0, proc.stderr
    assert "- tsa" in proc.stdout and "- pa" in proc.stdout, proc.stdout


@pytest.mark.parametrize(
    "override, key",
    [
        ("--config.per_domain.omniglot.rho=-0.1", "config.per_domain.omniglot.rho"),
        ("--config.per_domain.omniglot.lr=nan", "config.per_domain.omniglot.lr"),
        ("--config.per_domain.omniglot.lr=inf", "config.per_domain.omniglot.lr"),
        ("--config.model.arch=vgg16", "config.model.arch"),
        ("--config.benchmark=imagenet", "config.benchmark"),
        ("--config.sam.m=5", "config.sam.m"),
        ("--config.per_domain.omniglot.batch_size=0", "config.per_domain.omniglot.batch_size"),
        ("--config.fusion.mode=distil", "config.fusion.mode"),
        ("--config.evaluation.pa_steps=-1", "config.evaluation.pa_steps"),
        ("--config.evaluation.tsa_episodes=-5", "config.evaluation.tsa_episodes"),
        ("--config.flat.method=asam", "config.flat.method"),
        ("--config.flat.k=0", "config.flat.k"),
        ("--config.flat.clean_mix=1.5", "config.flat.clean_mix"),
        ("--config.flat.average=polyak", "config.flat.average"),
        ("--config.flat.late_start=-1", "config.flat.late_start"),
        ("--config.evaluation.episode_spec=10shot", "config.evaluation.episode_spec"),
    ],
)
def test_bad_values_name_the_key(override, key):
    c = _load("configs/sam_resnet18.py:omniglot", override)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        config_lib.validate(c)


def test_flat_settings_of_an_entry():
    """config.flat is the algorithm of "sam" entries: rho from the row, late_start None is
    the final restart cycle, ERM entries stay ERM and store the defaults."""
    c = _load(
        "configs/sam_resnet18.py:omniglot", "--config.flat.method=sam_late", "--config.flat.k=3"
    )
    row = c.per_domain.omniglot
    flat = config_lib.flat_settings(config_lib.domain_config(c, "omniglot", "sam"))
    assert (flat.method, flat.k, flat.rho) == ("sam_late", 3, row.rho)
    last_cycle = (row.num_steps - 1) // row.restart_period * row.restart_period
    assert flat.start_step == last_cycle and flat.momentum == c.momentum
    erm = config_lib.domain_config(c, "omniglot", "erm")
    assert config_lib.flat_settings(erm) is None
    assert erm.flat.to_dict() == config_lib.base_config().flat.to_dict()
    c.flat.rho = 0.3  # the radius is the row's: a config.flat.rho would have two meanings
    with pytest.raises(ValueError, match=r"config\.flat\.rho is not a flat-method key"):
        config_lib.validate(c)


def test_batch_must_divide_over_processes_not_devices():
    """Only processes split a batch (each process's mesh takes the devices that divide its
    slice: tests/training/test_mesh.py), so batch 8 is valid on any number of devices."""
    c = _load("configs/sam_resnet18.py:aircraft")  # batch 8
    with pytest.raises(
        ValueError, match=r"config\.per_domain\.aircraft\.batch_size=8 is not divisible by the 3"
    ):
        config_lib.validate(c, num_processes=3)
    config_lib.validate(c, num_processes=8)


def test_unknown_domain_and_key_are_rejected():
    with pytest.raises(ValueError, match="domain 'omniglott' is unknown"):
        _load("configs/sam_resnet18.py:omniglott")
    proc = _run_main("--config=configs/sam_resnet18.py:omniglot", "--config.sam.rhoo=0.1")
    assert proc.returncode != 0 and 'Did you mean "rho" instead of "rhoo"' in proc.stderr


def test_main_rejects_bad_value_before_compiling(tmp_path):
    """The command line fails fast (no JAX compile) and names the problem."""
    proc = _run_main(
        "--config=configs/sam_resnet18.py:omniglot",
        "--config.per_domain.omniglot.rho=-1",
        f"--workdir={tmp_path}",
    )
    assert proc.returncode == 2
    assert "config.per_domain.omniglot.rho must be a finite number >= 0" in proc.stderr
    assert "Traceback" not in proc.stderr


def _parse(*args):
    """The config as ``main.py``'s ``config_flags`` parses it (no subprocess)."""
    from ml_collections import config_flags

    argv = ["main", *args]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=fv, sys_argv=argv)
    fv(argv)
    return fv.config


UNSET_KEYS = {
    "sam.m": 4,
    "validation.every": 100,
    "fusion.distill.validation_every": 7,
    "evaluation.finetune_lr": 1e-3,
    "evaluation.pa_episodes": 50,
    "evaluation.parc_max_support": 20,
}


def test_unset_optional_keys_are_none_and_take_typed_overrides():
    node = lambda c, key: functools.reduce(lambda n, k: n[k], key.split("."), c)  # noqa: E731
    c = _parse(f"--config={ROOT}/configs/sam_resnet18.py")
    assert [key for key in UNSET_KEYS if node(c, key) is not None] == []
    config_lib.validate(c)
    c = _parse(
        f"--config={ROOT}/configs/glyphs.py",
        *(f"--config.{key}={value}" for key, value in UNSET_KEYS.items()),
    )
    for key, value in UNSET_KEYS.items():
        assert node(c, key) == value and type(node(c, key)) is type(value), key
    config_lib.validate(c)
    c.sam.m = None  # back to unset from Python
    config_lib.validate(c)
    with pytest.raises(flags.IllegalFlagValueError, match="sam.m"):
        _parse(f"--config={ROOT}/configs/glyphs.py", "--config.sam.m=2.5")
    # The old sentinel 0 now names what None means.
    c = _parse(f"--config={ROOT}/configs/glyphs.py", "--config.sam.m=0")
    with pytest.raises(config_lib.ConfigError, match=r"config\.sam\.m must be None \(one"):
        config_lib.validate(c)


def test_entries_stored_with_the_old_zero_sentinels_are_not_stale():

    c = config_lib.domain_config(_load("configs/glyphs.py"), "latin", "sam").to_dict()
    old = copy.deepcopy(c)
    old["sam"]["m"], old["validation"]["every"] = 0, 0
    assert entry_keys.config_changes(old, c) == []
    old["validation"]["every"] = 250
    assert entry_keys.config_changes(old, c) == ["validation.every: 250 -> None"]


def test_class_splits_key_is_validated_and_reaches_load_split():
    from flatfsc_jax.data import benchmarks

    config = _load("configs/sam_resnet18.py:miniature")
    assert config.data.class_splits == "prepared" and tuple(config.domains) == ("omniglot", "dtd")
    config_lib.validate(config)
    assert benchmarks.split_options("meta_dataset", "prepared") == {"class_splits": "prepared"}
    assert benchmarks.split_options("meta_dataset", "shipped") == {}
    with pytest.raises(config_lib.ConfigError, match=r"config\.data\.class_splits='prepard'"):
        config_lib.validate(
            _load("configs/sam_resnet18.py:omniglot", "--config.data.class_splits=prepard")
        )
    with pytest.raises(config_lib.ConfigError, match="meta_dataset' only"):
        config_lib.validate(_load("configs/glyphs.py:tiny", "--config.data.class_splits=prepared"))


def test_paper_config_plans_the_whole_table_and_dry_runs():
    """configs/paper.py: 16 backbones, 14 fine-tuned fusions, 2 distilled students, 13 domains."""
    from flatfsc_jax import experiment

    c = _load("configs/paper.py")
    config_lib.validate(c)
    planned = experiment.plan(c)
    counts = {}
    for p in planned:
        counts[p.entry_method] = counts.get(p.entry_method, 0) + 1
    assert counts == {"erm": 8, "sam": 8, "erm+ft": 7, "sam+ft": 7, "erm+kd": 1, "sam+kd": 1}
    assert {p.domain for p in planned if not p.fused} == set(config_lib.META_DATASET_SEEN)
    assert len(c.evaluation.domains) == 13 and c.evaluation.enabled
    proc = _run_main("--config=configs/paper.py", "--dry_run")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n  meta_dataset/") == 32, proc.stdout[-3000:]
    assert "meta_dataset/ilsvrc_2012/sam+kd: batch 448+64" in proc.stdout
