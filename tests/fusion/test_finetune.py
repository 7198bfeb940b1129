"""Fusion by fine-tuning: full and LoRA entries start from the general backbone."""

import jax
import numpy as np
import pytest

from configs import glyphs as glyphs_config
from flatfsc_jax import models
from flatfsc_jax import zoo as zoo_lib
from flatfsc_jax.fusion import finetune
from flatfsc_jax.training import loop


def _distance(a, b) -> float:
    """L2 distance between two parameter trees."""
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return float(np.sqrt(sum(np.sum((np.asarray(x) - np.asarray(y)) ** 2) for x, y in pairs)))


@pytest.mark.slow
def test_full_and_lora_fusion_write_plain_backbones(tmp_path):
    c = glyphs_config.get_config("tiny")
    c.data_dir = str(tmp_path / "data")
    c.methods = ("erm",)
    zoo = zoo_lib.Zoo(tmp_path / "zoo")
    from flatfsc_jax.experiment import check_data

    check_data(c, ("train",))
    source = loop.train_and_evaluate(c, zoo, "cjk", "erm", progress=False)
    assert source.metadata["train_classes"] == 280

    entries = {}
    for mode in ("full", "lora"):
        c.fusion.mode = mode
        (entries[mode],) = finetune.fuse(c, zoo, "erm", progress=False)
    assert entries["full"].method == "erm+ft" and entries["lora"].method == "erm+lora"
    assert entries["lora"].metadata["fusion"]["lora_rank"] == c.fusion.lora_rank

    general = zoo.load("glyphs", "cjk", "erm").variables["params"]
    model = models.build_model_from_config(c.model, 10)
    image = np.zeros((1, *zoo.get("glyphs", "latin", "erm+ft").metadata["image_shape"]), np.float32)
    fresh = models.trunk_params(model.init(jax.random.PRNGKey(c.seed), image)["params"])
    for mode, entry in entries.items():
        loaded = zoo.load("glyphs", "latin", entry.method)  # a plain backbone again
        assert "lora" not in loaded.variables
        trunk_new = models.trunk_params(loaded.variables["params"])
        trunk_old = models.trunk_params(general)
        moved = [
            not np.array_equal(a, b)
            for a, b in zip(jax.tree.leaves(trunk_new), jax.tree.leaves(trunk_old), strict=True)
        ]
        assert any(moved), mode  # fine-tuning changed the general backbone
        # ... starting from it, not from scratch: the fused trunk stays far closer to the
        # general trunk than to a fresh initialisation (a run from scratch would be about
        # as far from both).
        assert _distance(trunk_new, trunk_old) < 0.1 * _distance(trunk_new, fresh), mode
        # LoRA changes only convolution kernels (merged adapters); BN affine stays frozen.
        if mode == "lora":
            flat_new = jax.tree_util.tree_leaves_with_path(trunk_new)
            flat_old = dict(jax.tree_util.tree_leaves_with_path(trunk_old))
            for path, value in flat_new:
                if "BatchNorm" in jax.tree_util.keystr(path):
                    np.testing.assert_array_equal(value, flat_old[path])
