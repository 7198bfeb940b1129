"""Backbones (flax.linen) behind one narrow seam.

Everything outside this file uses a :class:`Model`:

    model = build_model(config.model, num_classes)
    variables = model.init(rng, sample_images)        # {'params', 'batch_stats'[, 'lora']}
    (logits, embedding), new_batch_stats = model.apply(variables, images, train=True)

and never imports linen internals. Architectures:

* ``resnet18``: the SUR/URL/paper backbone (docs/design.md#shared-settings): 5x5
  stride-2 stem (padding 1, no bias) + BN + ReLU, *no* max-pool, BasicBlocks [2, 2, 2, 2]
  with widths 64/128/256/512, global average pool -> 512-d embedding, linear head. Its
  trunk has 11,171,904 trainable parameters at ``width=1``.
* ``resnet10``: the same with one block per stage; the cheap CPU variant.
* ``conv4``: the classic 4 x (conv3x3-BN-ReLU-maxpool) few-shot backbone.

``width`` multiplies every channel count (0.25 gives a 128-d ResNet embedding) so the
embedded CPU benchmark can use the paper's architecture at a laptop's budget.

LoRA: with ``lora_rank > 0`` every convolution gets a low-rank additive update
``W + (alpha / r) * reshape(A @ B)`` with ``A`` Kaiming-initialised and ``B`` zero, so the
adapted network starts *exactly* at the pre-trained one. Adapters live in their own
variable collection ``'lora'``; fine-tuning differentiates only that collection.

TSA (task-specific adapters, residual-matrix form; Li, Liu & Bilen, CVPR 2022): with
``tsa=True`` every 3x3 convolution of the four ResNet stages (16 in ResNet-18, 8 in
ResNet-10; every convolution of Conv4) gets a parallel 1x1 convolution ``alpha`` with the
same stride whose output is added before BN. ``alpha`` starts at ``1e-4 * eye(C_out,
C_in)`` (rectangular identity when the widths differ), so the adapted network starts
within ~1e-4 of the pre-trained one. The stem and the downsample convolutions get none.
Adapters live in collection ``'tsa'`` (built by ``Model.with_tsa``); see
``flatfsc_jax/evaluation/tsa.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

ARCHITECTURES = ("resnet18", "resnet10", "conv4")

# PyTorch's kaiming_normal_(mode='fan_out', nonlinearity='relu').
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch BatchNorm momentum 0.1 == flax momentum 0.9.
_BN_MOMENTUM = 0.9
_BN_EPS = 1e-5
# TSA's adapter initialisation: alpha = 1e-4 * I (its reference code's reset()).
TSA_INIT_SCALE = 1e-4


class Conv(nn.Module):
    """Bias-free convolution with an optional LoRA update in collection 'lora' and an
    optional residual TSA adapter (a strided 1x1 convolution) in collection 'tsa'."""

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    lora_rank: int = 0
    lora_alpha: float = 1.0
    dtype: Any = jnp.float32
    tsa: bool = False

    @nn.compact
    def __call__(self, x):
        k, cin = self.kernel_size, x.shape[-1]
        kernel = self.param("kernel", _conv_init, (k, k, cin, self.features), jnp.float32)
        if self.lora_rank > 0:
            fan_in = k * k * cin
            a = self.variable(
                "lora",
                "a",
                lambda: nn.initializers.he_uniform()(
                    self.make_rng("params"), (fan_in, self.lora_rank), jnp.float32
                ),
            )
            b = self.variable("lora", "b", jnp.zeros, (self.lora_rank, self.features), jnp.float32)
            delta = (a.value @ b.value).reshape(kernel.shape)
            kernel = kernel + (self.lora_alpha / self.lora_rank) * delta
        y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, self.padding)
        if self.tsa:
            alpha = self.variable(
                "tsa",
                "alpha",
                lambda: TSA_INIT_SCALE * jnp.eye(cin, self.features, dtype=jnp.float32),
            )
            # A 1x1 convolution with stride s is a matmul on every s-th pixel; for the
            # 3x3 / padding-1 convolutions it sits beside, the output sizes agree.
            s = self.stride
            y = y + x[:, ::s, ::s, :].astype(self.dtype) @ alpha.value.astype(self.dtype)
        return y


def conv2d(x, kernel, stride: int, padding: int):
    """NHWC x HWIO convolution with symmetric zero padding.

    Feature maps smaller than the kernel (the last ResNet stage at 28 px is 2x2) are
    computed as an explicit im2col matmul: XLA:CPU lowers such convolutions to a slow
    path (its backward pass was over half of a 28-px ResNet-10 step; bench/step.py), and
    the matmul is the same arithmetic. Larger maps use the native convolution.
    """
    k = kernel.shape[0]
    h, w = x.shape[1], x.shape[2]
    out_h = (h + 2 * padding - k) // stride + 1
    out_w = (w + 2 * padding - k) // stride + 1
    if min(h, w, out_h, out_w) >= k:
        pad = ((padding, padding), (padding, padding))
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(stride, stride),
            padding=pad,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    # Patches in (kh, kw, cin) order, matching kernel.reshape(-1, cout).
    patches = jnp.concatenate(
        [
            xp[
                :,
                i : i + stride * (out_h - 1) + 1 : stride,
                j : j + stride * (out_w - 1) + 1 : stride,
            ]
            for i in range(k)
            for j in range(k)
        ],
        axis=-1,
    )
    return patches @ kernel.reshape(-1, kernel.shape[-1])


def _norm(train: bool, dtype):
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=_BN_MOMENTUM,
        epsilon=_BN_EPS,
        dtype=dtype,
        param_dtype=jnp.float32,
    )


class BasicBlock(nn.Module):
    features: int
    stride: int
    lora_rank: int = 0
    dtype: Any = jnp.float32
    tsa: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        def conv(f, k, s, p):  # TSA adapters beside the 3x3 convolutions, not the 1x1 one
            return Conv(f, k, s, p, self.lora_rank, dtype=self.dtype, tsa=self.tsa and k == 3)

        y = conv(self.features, 3, self.stride, 1)(x)
        y = nn.relu(_norm(train, self.dtype)(y))
        y = conv(self.features, 3, 1, 1)(y)
        y = _norm(train, self.dtype)(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = conv(self.features, 1, self.stride, 0)(x)
            x = _norm(train, self.dtype)(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """SUR/URL ResNet: 5x5/2 stem without max-pool, BasicBlocks, GAP embedding."""

    stage_sizes: Sequence[int]
    num_classes: int
    width: float = 1.0
    lora_rank: int = 0
    dtype: Any = jnp.float32
    tsa: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        widths = [max(1, round(w * self.width)) for w in (64, 128, 256, 512)]
        x = Conv(widths[0], 5, 2, 1, self.lora_rank, dtype=self.dtype)(x)
        x = nn.relu(_norm(train, self.dtype)(x))
        for i, (n_blocks, feats) in enumerate(zip(self.stage_sizes, widths, strict=True)):
            for j in range(n_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                x = BasicBlock(feats, stride, self.lora_rank, self.dtype, self.tsa)(x, train)
        embedding = jnp.mean(x, axis=(1, 2)).astype(jnp.float32)
        return _head(embedding, self.num_classes)


class Conv4(nn.Module):
    """4 x (conv3x3 - BN - ReLU - maxpool 2) with 64 * width channels."""

    num_classes: int
    width: float = 1.0
    lora_rank: int = 0
    dtype: Any = jnp.float32
    tsa: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        feats = max(1, round(64 * self.width))
        for _ in range(4):
            x = Conv(feats, 3, 1, 1, self.lora_rank, dtype=self.dtype, tsa=self.tsa)(x)
            x = nn.relu(_norm(train, self.dtype)(x))
            if min(x.shape[1:3]) >= 2:
                x = nn.max_pool(x, (2, 2), (2, 2))
        embedding = jnp.mean(x, axis=(1, 2)).astype(jnp.float32)
        return _head(embedding, self.num_classes)


def _head(embedding, num_classes):
    if num_classes == 0:  # trunk only: fusion / evaluation never need the head
        return None, embedding
    logits = nn.Dense(num_classes, name="head")(embedding)
    return logits, embedding


@dataclasses.dataclass(frozen=True)
class Model:
    """The seam: ``init`` and ``apply``; the linen module is an implementation detail."""

    module: nn.Module
    arch: str
    embedding_dim: int

    @property
    def lora_rank(self) -> int:
        return self.module.lora_rank

    def with_lora_rank(self, rank: int) -> Model:
        """The same architecture with LoRA adapters of ``rank`` (0: none)."""
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank!r}")
        return dataclasses.replace(self, module=self.module.clone(lora_rank=rank))

    @property
    def tsa(self) -> bool:
        return self.module.tsa

    def with_tsa(self, enabled: bool = True) -> Model:
        """The same architecture with (or without) TSA adapters in collection 'tsa'."""
        return dataclasses.replace(self, module=self.module.clone(tsa=bool(enabled)))

    def init(self, rng: jax.Array, sample_images: jax.Array) -> dict:
        """Variables for images shaped like ``sample_images`` (N, H, W, C)."""
        variables = self.module.init({"params": rng}, sample_images, train=False)
        return dict(variables)

    def apply(self, variables: dict, images: jax.Array, train: bool):
        """Returns ``((logits, embedding), new_batch_stats)``.

        ``train=True`` normalises with batch statistics and returns the updated running
        statistics; ``train=False`` uses the running statistics and returns them unchanged.
        """
        if train:
            out, updates = self.module.apply(variables, images, train=True, mutable=["batch_stats"])
            return out, updates["batch_stats"]
        out = self.module.apply(variables, images, train=False)
        return out, variables.get("batch_stats", {})

    def embed(self, variables: dict, images: jax.Array) -> jax.Array:
        """Frozen (eval-mode) embeddings, the input of every few-shot classifier."""
        (_, embedding), _ = self.apply(variables, images, train=False)
        return embedding


def build_model(
    arch: str,
    num_classes: int,
    *,
    width: float = 1.0,
    lora_rank: int = 0,
    dtype: str = "float32",
) -> Model:
    """Builds a backbone by name; raises ``ValueError`` naming the bad argument."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch={arch!r} is unknown; choose one of {ARCHITECTURES}")
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width!r}")
    if lora_rank < 0:
        raise ValueError(f"lora_rank must be >= 0, got {lora_rank!r}")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    jdtype = jnp.dtype(dtype)
    if arch == "conv4":
        module = Conv4(num_classes, width, lora_rank, jdtype)
        dim = max(1, round(64 * width))
    else:
        stages = (2, 2, 2, 2) if arch == "resnet18" else (1, 1, 1, 1)
        module = ResNet(stages, num_classes, width, lora_rank, jdtype)
        dim = max(1, round(512 * width))
    return Model(module=module, arch=arch, embedding_dim=dim)


def build_model_from_config(model_config, num_classes: int, *, lora_rank: int | None = None):
    """``build_model`` from a ``config.model`` ConfigDict (arch, width, dtype, lora_rank)."""
    rank = model_config.get("lora_rank", 0) if lora_rank is None else lora_rank
    return build_model(
        model_config.arch,
        num_classes,
        width=model_config.get("width", 1.0),
        lora_rank=rank,
        dtype=model_config.get("dtype", "float32"),
    )


def model_metadata(config, num_classes: int) -> dict:
    """A zoo entry's ``model`` metadata: what ``build_model`` needs to rebuild it."""
    return dict(
        arch=config.model.arch,
        width=float(config.model.width),
        dtype=config.model.dtype,
        num_classes=int(num_classes),
    )


def count_params(tree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def trunk_params(params: dict) -> dict:
    """The parameters without the classification head."""
    return {k: v for k, v in params.items() if k != "head"}


def merge_lora(variables: dict, lora_alpha: float = 1.0) -> dict:
    """Folds LoRA adapters into the convolution kernels: a plain backbone again.

    Returns variables without the 'lora' collection whose ``apply`` equals the adapted
    model's, so fused/adapted backbones are stored and used like any other.
    """
    if "lora" not in variables:
        return variables

    def fold(params, lora):
        out = {}
        for name, value in params.items():
            if isinstance(value, dict):
                out[name] = fold(value, lora.get(name, {}))
            else:
                out[name] = value
        if "kernel" in params and "a" in lora:
            rank = lora["a"].shape[-1]
            delta = (lora["a"] @ lora["b"]).reshape(params["kernel"].shape)
            out["kernel"] = params["kernel"] + (lora_alpha / rank) * delta
        return out

    merged = {k: v for k, v in variables.items() if k != "lora"}
    merged["params"] = fold(variables["params"], variables["lora"])
    return merged
