"""Fusion by distillation (URL): CKA / KL / annealing against NumPy, the student step, a
tiny end-to-end student that Zoo.load embeds, and exact resume."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import glyphs as glyphs_config
from flatfsc_jax import config_lib, families, models
from flatfsc_jax import zoo as zoo_lib
from flatfsc_jax.data import benchmarks
from flatfsc_jax.data.sources import preprocess
from flatfsc_jax.fusion import distill, finetune, kd_losses
from flatfsc_jax.training import loop
from flatfsc_jax.training import step as step_lib

# ----------------------------------------------------------------------------------------
# NumPy references (float64), written from URL's models/cka.py and DistillKL formulas.
# ----------------------------------------------------------------------------------------


def np_sq_dists(x):
    diff = x[:, None, :] - x[None, :, :]
    return np.sum(diff * diff, axis=-1)


def np_lower_median_nonzero(sq):
    v = np.sort(sq[sq != 0])  # torch.median(KX[KX != 0]): the lower of the two middles
    return v[(len(v) - 1) // 2] if len(v) else 0.0


def np_rbf(x, sigma=None):
    sq = np_sq_dists(x)
    if sigma is None:
        sigma = np.sqrt(max(np_lower_median_nonzero(sq), 1e-12))
    return np.exp(-sq / (2 * sigma * sigma))


def np_cka(x, y):
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    kx, ky = h @ np_rbf(x) @ h, h @ np_rbf(y) @ h
    var = lambda k: np.sqrt(max(np.sum(k * k), 1e-12))  # noqa: E731
    return np.sum(kx * ky) / (var(kx) * var(ky))


def np_kl(s, t, temp):
    def softmax(z):
        z = z - z.max(-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(-1, keepdims=True)

    ps, pt = softmax(s / temp), softmax(t / temp)
    return np.sum(pt * (np.log(pt) - np.log(ps))) * temp**2 / len(s)


def _normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_bandwidth_is_the_lower_median_of_nonzero_squared_distances():
    rs = np.random.RandomState(0)
    x = rs.randn(6, 4)
    x[5] = x[2]  # a duplicate row: its zero distance must not count
    sq = np_sq_dists(x)
    # 15 pairs, one zero: 14 distinct non-zero values (each twice in the matrix); the
    # lower median and NumPy's averaging median differ, so the convention is tested.
    want = np_lower_median_nonzero(sq)
    assert want != pytest.approx(np.median(sq[sq != 0]))
    got = kd_losses.median_bandwidth(kd_losses.squared_distances(jnp.asarray(x, jnp.float32)))
    np.testing.assert_allclose(float(got) ** 2, want, rtol=1e-5)
    # All rows equal: no non-zero distance, the clamp (URL: sqrt(1e-12)).
    same = jnp.ones((4, 3), jnp.float32)
    assert float(kd_losses.median_bandwidth(kd_losses.squared_distances(same))) == pytest.approx(
        1e-6
    )


@pytest.mark.parametrize("n, dx, dy", [(8, 5, 7), (33, 16, 16)])
def test_cka_rbf_matches_numpy(n, dx, dy):
    rs = np.random.RandomState(n)
    x = _normalize(rs.randn(n, dx))
    y = _normalize(np.tanh(x @ rs.randn(dx, dy)) + 0.5 * rs.randn(n, dy))
    got = float(kd_losses.cka_rbf(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)))
    np.testing.assert_allclose(got, np_cka(x, y), rtol=2e-5, atol=1e-6)
    assert 0.0 < got < 1.0
    # Invariances of RBF-CKA with the median bandwidth: itself = 1; rotation and scale.
    q, _ = np.linalg.qr(rs.randn(dx, dx))
    xf = jnp.asarray(x, jnp.float32)
    assert float(kd_losses.cka_rbf(xf, xf)) == pytest.approx(1.0, abs=1e-5)
    rotated = jnp.asarray(3.0 * x @ q, jnp.float32)
    assert float(kd_losses.cka_rbf(rotated, jnp.asarray(y, jnp.float32))) == pytest.approx(
        got, abs=1e-5
    )


def test_no_gradient_flows_through_the_bandwidth():
    rs = np.random.RandomState(1)
    x = jnp.asarray(_normalize(rs.randn(10, 6)), jnp.float32)
    y = jnp.asarray(_normalize(rs.randn(10, 6)), jnp.float32)
    sx = float(kd_losses.median_bandwidth(kd_losses.squared_distances(x)))
    sy = float(kd_losses.median_bandwidth(kd_losses.squared_distances(y)))

    def cka_fixed_sigma(a):  # an independent jnp CKA with the bandwidths as constants
        def k(z, s):
            sq = jnp.sum((z[:, None] - z[None]) ** 2, -1)
            return jnp.exp(-sq / (2 * s * s))

        h = jnp.eye(10) - 1 / 10
        ka, kb = h @ k(a, sx) @ h, h @ k(y, sy) @ h
        return jnp.sum(ka * kb) / jnp.sqrt(jnp.sum(ka * ka) * jnp.sum(kb * kb))

    want = jax.grad(cka_fixed_sigma)(x)
    got = jax.grad(lambda a: kd_losses.cka_rbf(a, y))(x)
    assert float(jnp.max(jnp.abs(want))) > 1e-3
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-6)
    np.testing.assert_array_equal(
        jax.grad(lambda s: kd_losses.median_bandwidth(s))(kd_losses.squared_distances(x)), 0.0
    )


def test_kl_distillation_matches_numpy():
    rs = np.random.RandomState(2)
    s, t = 3 * rs.randn(7, 11), 3 * rs.randn(7, 11)
    got = kd_losses.kl_distillation(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), 4.0)
    np.testing.assert_allclose(float(got), np_kl(s, t, 4.0), rtol=1e-5)
    same = kd_losses.kl_distillation(jnp.asarray(s, jnp.float32), jnp.asarray(s, jnp.float32), 4.0)
    assert abs(float(same)) < 1e-6


def test_annealing_weights():
    w = [float(kd_losses.annealing_weight(t, 10, 2.0)) for t in (0, 5, 10, 19, 20, 35)]
    np.testing.assert_allclose(w, [1.0, 0.75, 0.5, 0.05, 0.0, 0.0], atol=1e-7)
    assert float(kd_losses.annealing_weight(48_000 * 5, 48_000, 5.0)) == 0.0


# ----------------------------------------------------------------------------------------
# The optimiser and the student step
# ----------------------------------------------------------------------------------------


def _tiny_config(domains=("cjk", "latin")):
    c = glyphs_config.get_config("tiny,kd")
    config_lib.with_table(
        c,
        {d: dict(glyphs_config.GLYPHS_TABLE[d], num_steps=6, restart_period=6) for d in domains},
        domains,
    )
    glyphs_config.with_distillation(c)
    return c


def test_student_sgd_and_adaptor_adam_first_step():
    c = _tiny_config()
    c.fusion.distill.lr, c.fusion.distill.adaptor_lr = 0.5, 0.1
    tx = distill.make_optimizer(c)
    params = {
        "trunk": {"w": jnp.array([1.0, -2.0])},
        "heads": {"cjk": {"kernel": jnp.array([0.5])}},
        "adaptors": {"cjk": jnp.array([2.0, 3.0])},
    }
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.25), params)
    grads["adaptors"]["cjk"] = jnp.array([0.25, 4.0])
    updates, _ = tx.update(grads, tx.init(params), params)
    wd, awd = c.weight_decay, c.fusion.distill.adaptor_weight_decay
    # SGD with coupled decay, first step: -lr * (g + wd * w).
    np.testing.assert_allclose(updates["trunk"]["w"], -0.5 * (0.25 + wd * np.array([1.0, -2.0])))
    np.testing.assert_allclose(updates["heads"]["cjk"]["kernel"], -0.5 * (0.25 + wd * 0.5))
    # Adam's first step is -lr * g' / (|g'| + eps) with g' = g + wd * w: -lr whatever g.
    np.testing.assert_allclose(updates["adaptors"]["cjk"], [-0.1, -0.1], rtol=1e-5)
    assert awd > 0


@pytest.mark.parametrize("rho", [0.0, 0.05])
def test_student_step_loss_matches_an_independent_recomputation(rho):
    domains = ("cjk", "latin")
    classes = {"cjk": 7, "latin": 5}
    sizes = {"cjk": 12, "latin": 8}
    student = models.build_model("conv4", 0, width=0.125)
    teacher_models = {d: models.build_model("conv4", n, width=0.125) for d, n in classes.items()}
    rs = np.random.RandomState(3)
    sample = jnp.zeros((1, 16, 16, 1))
    teachers = {
        d: teacher_models[d].init(jax.random.key(10 + i), sample) for i, d in enumerate(domains)
    }
    batch = {
        d: {
            "images": jnp.asarray(rs.uniform(-1, 1, (sizes[d], 16, 16, 1)), jnp.float32),
            "labels": jnp.asarray(rs.randint(0, classes[d], sizes[d]), jnp.int32),
        }
        for d in domains
    }
    recipe = distill.Recipe(
        domains=domains,
        lambda_f=(4.0, 1.0),
        lambda_p=(4.0, 1.0),
        anneal=(5.0, 1.0),
        restart_period=4,
        temperature=4.0,
    )
    c = _tiny_config()
    tx = distill.make_optimizer(c)
    params, bs = distill.init_params(student, classes, jax.random.key(0), sample)
    state = step_lib.TrainState(jnp.asarray(3, jnp.int32), params, bs, tx.init(params))

    # Independent recomputation (NumPy losses) of the step's clean loss at step 3.
    x = jnp.concatenate([batch[d]["images"] for d in domains])
    (_, z), new_bs = student.apply({"params": params["trunk"], "batch_stats": bs}, x, train=True)
    z = np.asarray(z, np.float64)
    want, start = 0.0, 0
    for i, d in enumerate(domains):
        zd = z[start : start + sizes[d]]
        start += sizes[d]
        head = jax.tree.map(lambda a: np.asarray(a, np.float64), params["heads"][d])
        logits = zd @ head["kernel"] + head["bias"]
        logp = logits - logits.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        ce = -np.mean(logp[np.arange(sizes[d]), np.asarray(batch[d]["labels"])])
        (t_logits, t_feats), _ = teacher_models[d].apply(
            teachers[d], batch[d]["images"], train=False
        )
        t_logits, t_feats = np.asarray(t_logits, np.float64), np.asarray(t_feats, np.float64)
        f = _normalize(zd @ np.asarray(params["adaptors"][d], np.float64))
        w = max(0.0, 1 - 3 / (4 * recipe.anneal[i]))
        cka = np_cka(f, _normalize(t_feats))
        kl = np_kl(logits, t_logits, 4.0)
        want += ce + w * (recipe.lambda_f[i] * (1 - cka) + recipe.lambda_p[i] * kl)

    step = distill.compile_distill_step(
        student, teacher_models, recipe, tx, step_lib.make_mesh(), rho=rho
    )
    teachers_before = jax.tree.map(np.asarray, teachers)
    new_state, metrics = step(state, batch, teachers)
    np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-4)
    assert float(metrics["kd_weight/latin"]) == pytest.approx(0.25)
    # BN saw the concatenated batch once: the running statistics of the clean pass.
    for a, b in zip(jax.tree.leaves(new_state.batch_stats), jax.tree.leaves(new_bs), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    if rho:
        assert float(metrics["perturbed_loss"]) > float(metrics["loss"])
    else:
        assert float(metrics["sharpness"]) == 0.0
    for a, b in zip(jax.tree.leaves(teachers), jax.tree.leaves(teachers_before), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(new_state.step) == 4


def test_config_errors_name_the_key():
    c = _tiny_config()
    config_lib.validate(c)
    c.fusion.mode = "full,distil"
    with pytest.raises(ValueError, match=r"config\.fusion\.mode"):
        config_lib.validate(c)
    c = _tiny_config()
    del c.fusion.distill.batch_size["latin"]
    with pytest.raises(ValueError, match=r"config\.fusion\.distill\.batch_size\.latin is missing"):
        config_lib.validate(c)
    c = _tiny_config()
    c.fusion.distill.batch_size.cjk = 3
    with pytest.raises(ValueError, match=r"batch_size\.cjk=3 is not divisible by the 2"):
        config_lib.validate(c, num_processes=2)
    c = _tiny_config()
    c.fusion.distill.temperature = 0.0
    with pytest.raises(ValueError, match=r"config\.fusion\.distill\.temperature"):
        config_lib.validate(c)
    assert families.fused_families(_tiny_config()) == ["erm+ft", "sam+ft", "erm+kd", "sam+kd"]


# ----------------------------------------------------------------------------------------
# End to end: teachers -> student -> zoo entry; interrupted run resumes exactly
# ----------------------------------------------------------------------------------------


class _Stop(Exception):
    pass


@pytest.mark.slow
def test_tiny_distillation_writes_a_loadable_entry_and_resumes_exactly(tmp_path, monkeypatch):
    from flatfsc_jax.data import pipeline
    from flatfsc_jax.experiment import check_data

    c = _tiny_config()
    c.data_dir = str(tmp_path / "data")
    c.methods = ("erm",)
    c.fusion.mode = "distill"
    d = c.fusion.distill
    d.num_steps, d.restart_period, d.validation_every = 4, 2, 2
    d.batch_size.cjk, d.batch_size.latin = 32, 16
    c.checkpoint_every = 2
    check_data(c, ("train",))
    zoo, zoo2 = zoo_lib.Zoo(tmp_path / "zoo"), zoo_lib.Zoo(tmp_path / "zoo2")
    for i, dom in enumerate(c.domains):  # random teachers: the recipe, not their quality
        split = benchmarks.load_split(c.benchmark, dom, "train", c.data_dir)
        model = models.build_model_from_config(c.model, split.num_classes)
        variables = model.init(jax.random.key(i), jnp.zeros((1, *split.image_shape)))
        for z in (zoo, zoo2):
            z.write(
                "glyphs",
                dom,
                "erm",
                variables=variables,
                model_config=models.model_metadata(c, split.num_classes),
                image_shape=split.image_shape,
                metadata={},
            )

    from flatfsc_jax.profiling import PROFILE

    PROFILE.reset()
    (entry,) = finetune.fuse(c, zoo, "erm", progress=False)
    assert entry.key == "glyphs/cjk/erm+kd"
    # The job's time split sees the student (compile, steps, validation, checkpoints).
    for part in ("compile", "steps", "validation", "checkpoint"):
        assert PROFILE.seconds[f"distill/{part}"] > 0, part
    meta = entry.metadata
    assert meta["fusion"]["mode"] == "distill" and meta["batch_size"] == {"cjk": 32, "latin": 16}
    assert set(meta["best_validation"]["per_domain"]) == {"cjk", "latin"}
    loaded = zoo.load("glyphs", "cjk", "erm+kd")  # a plain backbone with the CJK head
    assert loaded.variables["params"]["head"]["kernel"].shape[-1] == 280
    split = benchmarks.load_split(c.benchmark, "latin", "test", c.data_dir)
    images = preprocess(np.stack([split.images[i] for i in range(5)]))
    emb = np.asarray(loaded.embed(images))
    assert emb.shape == (5, loaded.model.embedding_dim) and np.all(np.isfinite(emb))
    teacher = zoo.load("glyphs", "cjk", "erm").variables["params"]
    assert not np.array_equal(loaded.variables["params"]["head"]["bias"], teacher["head"]["bias"])
    log = loop.read_metrics(entry.path)
    assert [r["step"] for r in log if "val_accuracy" in r] == [2, 4]
    assert {"cka/cjk", "kl/latin", "kd_weight/cjk"} <= set(log[-1])

    # Interrupted in step 4 (the last checkpoint is step 2's; step 3 was already logged),
    # then rerun: identical final parameters, and nothing logged twice.
    make = pipeline.make_train_iterator
    calls = {"n": 0}

    class Interrupting:
        def __init__(self, it):
            self.it = it

        def __next__(self):
            calls["n"] += 1
            if calls["n"] > 3 * len(c.domains):  # the fourth step's batches
                raise _Stop
            return next(self.it)

        def __getattr__(self, name):
            return getattr(self.it, name)

    monkeypatch.setattr(
        pipeline, "make_train_iterator", lambda *a, **k: Interrupting(make(*a, **k))
    )
    with pytest.raises(_Stop):
        finetune.fuse(c, zoo2, "erm", progress=False)
    assert not zoo2.is_complete("glyphs", "cjk", "erm+kd")
    monkeypatch.setattr(pipeline, "make_train_iterator", make)
    (resumed,) = finetune.fuse(c, zoo2, "erm", progress=False)
    a = jax.tree.leaves(zoo.load("glyphs", "cjk", "erm+kd").variables)
    b = jax.tree.leaves(zoo2.load("glyphs", "cjk", "erm+kd").variables)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert resumed.metadata["best_validation"] == meta["best_validation"]
    log2 = loop.read_metrics(resumed.path)
    assert [r["step"] for r in log2 if "val_accuracy" in r] == [2, 4]
    assert 3 in [r["step"] for r in log2]  # the record the interrupted run had written
    assert [(r["step"], sorted(r)) for r in log2] == [(r["step"], sorted(r)) for r in log]


def test_distilled_family_uses_the_one_student_for_every_domain():

    c = _tiny_config()
    assert families.families(c) == ["erm", "sam", "erm+ft", "sam+ft", "erm+kd", "sam+kd"]
    for domain in c.domains:
        assert families.family_backbone(c, "sam+kd", domain) == ("cjk", "sam+kd")
    assert families.family_backbone(c, "sam+ft", "latin") == ("latin", "sam+ft")
