"""The model seam: architecture facts, LoRA identity start and merge, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flatfsc_jax import models


def _abstract_init(model, shape):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))


def test_resnet18_trunk_has_paper_parameter_count():
    # torchvision ResNet-18 trunk (11,176,512) with the 7x7 stem replaced by a 5x5 one.
    variables = _abstract_init(models.build_model("resnet18", 64), (1, 84, 84, 3))
    assert models.count_params(models.trunk_params(variables["params"])) == 11_171_904
    assert models.count_params(variables["params"]["head"]) == 512 * 64 + 64


def test_resnet18_shapes_and_no_maxpool():
    model = models.build_model("resnet18", 5, width=0.25)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 36, 36, 3)))
    stem = variables["params"]["Conv_0"]["kernel"]
    assert stem.shape == (5, 5, 3, 16)
    apply = jax.jit(model.apply, static_argnames="train")
    (logits, emb), stats = apply(variables, jnp.ones((2, 36, 36, 3)), train=True)
    assert logits.shape == (2, 5) and emb.shape == (2, model.embedding_dim) == (2, 128)
    # 36 -> 17 (5x5/2, pad 1), then stages keep 17 -> 9 -> 5 -> 3: no max-pool after the stem.
    probe = models.ResNet((2, 2, 2, 2), 0, 0.25)
    feats = jax.eval_shape(
        lambda: probe.apply(
            {
                "params": models.trunk_params(variables["params"]),
                "batch_stats": variables["batch_stats"],
            },
            jnp.ones((1, 36, 36, 3)),
            train=False,
            capture_intermediates=True,
            mutable=["intermediates"],
        )[1]
    )
    conv0 = feats["intermediates"]["Conv_0"]["__call__"][0]
    assert conv0.shape == (1, 17, 17, 16)
    last = feats["intermediates"]["BasicBlock_7"]["__call__"][0]
    assert last.shape == (1, 3, 3, 128)
    # Batch statistics changed in train mode, untouched in eval mode.
    assert not np.allclose(
        stats["BatchNorm_0"]["mean"], variables["batch_stats"]["BatchNorm_0"]["mean"]
    )
    _, same = model.apply(variables, jnp.ones((2, 36, 36, 3)), train=False)
    assert same is variables["batch_stats"]


def test_bn_and_init_follow_the_paper():
    model = models.build_model("resnet18", 3, width=0.25)
    v = model.init(jax.random.key(1), jnp.zeros((1, 16, 16, 3)))
    bn = v["params"]["BatchNorm_0"]
    assert np.all(bn["scale"] == 1) and np.all(bn["bias"] == 0)
    k = np.asarray(v["params"]["BasicBlock_7"]["Conv_0"]["kernel"])  # 3x3x128x128
    fan_out = 3 * 3 * 128
    assert abs(k.std() - np.sqrt(2 / fan_out)) / np.sqrt(2 / fan_out) < 0.05


@pytest.mark.parametrize("arch", ["resnet10", "conv4"])  # resnet18 = same blocks, x2
def test_lora_starts_at_identity_and_merges_exactly(arch):
    base = models.build_model(arch, 4, width=0.125)
    lora = models.build_model(arch, 4, width=0.125, lora_rank=2)
    x = jax.random.normal(jax.random.key(0), (3, 16, 16, 1))
    v = jax.jit(lora.init)(jax.random.key(0), x)
    plain = {k: v[k] for k in ("params", "batch_stats")}
    np.testing.assert_array_equal(jax.jit(lora.embed)(v, x), jax.jit(base.embed)(plain, x))
    # Expected adapter size: r * (k*k*cin + cout) per convolution.
    convs = [
        p
        for p in jax.tree_util.tree_leaves_with_path(v["params"])
        if jax.tree_util.keystr(p[0]).endswith("['kernel']") and p[1].ndim == 4
    ]
    expected = sum(2 * (k.shape[0] * k.shape[1] * k.shape[2] + k.shape[3]) for _, k in convs)
    assert models.count_params(v["lora"]) == expected
    moved = dict(v, lora=jax.tree.map(lambda a: a + 0.05, v["lora"]))
    merged = models.merge_lora(moved)
    assert "lora" not in merged
    np.testing.assert_allclose(
        jax.jit(base.embed)(merged, x), jax.jit(lora.embed)(moved, x), atol=1e-5
    )


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(arch="vgg"), "arch='vgg'"),
        (dict(arch="resnet18", width=0.0), "width must be"),
        (dict(arch="resnet18", lora_rank=-1), "lora_rank must be"),
        (dict(arch="resnet18", dtype="float16"), "dtype must be"),
    ],
)
def test_bad_model_arguments_name_the_argument(kwargs, key):
    arch = kwargs.pop("arch")
    with pytest.raises(ValueError, match=f"^{key}"):
        models.build_model(arch, 3, **kwargs)


def test_bfloat16_compute_keeps_float32_params():
    model = models.build_model("resnet10", 3, width=0.125, dtype="bfloat16")
    v = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(v["params"]))
    (logits, emb), _ = model.apply(v, jnp.ones((2, 28, 28, 1)), train=True)
    assert emb.dtype == jnp.float32 and np.isfinite(np.asarray(logits, np.float32)).all()


@pytest.mark.parametrize(
    "size, k, stride, pad",
    [(2, 3, 1, 1), (2, 3, 2, 1), (3, 3, 2, 1), (1, 3, 1, 1), (4, 5, 2, 1), (9, 3, 2, 1)],
)
def test_small_map_convolution_equals_native_convolution(size, k, stride, pad):
    x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
    w = jax.random.normal(jax.random.key(1), (k, k, 3, 4))
    ref = jax.lax.conv_general_dilated(
        x, w, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    np.testing.assert_allclose(models.conv2d(x, w, stride, pad), ref, atol=1e-5)
    grad = jax.grad(lambda w_: jnp.sum(models.conv2d(x, w_, stride, pad) ** 2))(w)
    grad_ref = jax.grad(
        lambda w_: jnp.sum(
            jax.lax.conv_general_dilated(
                x,
                w_,
                (stride, stride),
                ((pad, pad), (pad, pad)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
            ** 2
        )
    )(w)
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-4, atol=1e-4)
