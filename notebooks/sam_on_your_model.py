# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # SAM on your own model
#
# `flatfsc_jax.sam.sam_update` is a pure function of a loss function: it knows nothing
# about backbones, zoos or episodes. This notebook uses it on a model of our own, a small
# flax MLP classifying two noisy spirals, trains it with plain ERM and with SAM, and
# compares the training curves and the flatness of the two solutions with
# `flatfsc_jax.flatness.measures` and `flatfsc_jax.flatness.landscape`. Nothing here needs
# the zoo.
#
# The contract: `loss_fn(params, batch) -> (loss, aux)`, any optax optimiser `tx`, and
#
# ```python
# params, opt_state, aux, diagnostics = sam.sam_update(
#     loss_fn, params, opt_state, batch, tx, rho=rho
# )
# ```
#
# `rho=0` is plain ERM (one gradient, no perturbation), so one training step serves both.

# %%
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

from flatfsc_jax import flat_methods, sam
from flatfsc_jax.flatness import landscape
from flatfsc_jax.flatness import measures as measures_lib

RHO = 0.1
STEPS = 1500
BATCH_SIZE = 32

# %% [markdown]
# ## A toy problem: two spirals with label noise
#
# 300 training points with 15% of the labels flipped, so that a network can overfit
# them, and 2000 clean test points.


# %%
def spirals(n, label_noise, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    angle = np.sqrt(rng.uniform(0.05, 1.0, n)) * 3 * np.pi
    radius = angle / (3 * np.pi)
    points = radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], 1)
    points[labels == 1] *= -1  # the second spiral is the first rotated by 180 degrees
    points += rng.normal(0, 0.03, points.shape)
    flipped = rng.uniform(size=n) < label_noise
    return points.astype(np.float32), np.where(flipped, 1 - labels, labels).astype(np.int32)


x_train, y_train = spirals(300, label_noise=0.15, seed=0)
x_test, y_test = spirals(2000, label_noise=0.0, seed=1)
plt.figure(figsize=(4, 4))
plt.scatter(*x_train.T, c=y_train, cmap="coolwarm", s=10)
plt.title("training set")
plt.gca().set_aspect("equal")

# %% [markdown]
# ## The model, the loss and one training step


# %%
class MLP(nn.Module):
    hidden: int = 128

    @nn.compact
    def __call__(self, x):
        for _ in range(3):
            x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(2)(x)


model = MLP()


def loss_fn(params, batch):
    x, y = batch
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), None


tx = optax.sgd(0.05, momentum=0.9)


@functools.partial(jax.jit, static_argnames="rho")
def train_step(params, opt_state, batch, rho):
    params, opt_state, _, diagnostics = sam.sam_update(
        loss_fn, params, opt_state, batch, tx, rho=rho
    )
    return params, opt_state, diagnostics


@jax.jit
def accuracy(params, x, y):
    return jnp.mean(jnp.argmax(model.apply({"params": params}, x), -1) == y)


# %% [markdown]
# ## ERM and SAM from the same initialisation, on the same mini-batches


# %%
def train(rho, seed=0):
    params = model.init(jax.random.key(seed), x_train[:1])["params"]
    opt_state = tx.init(params)
    order = np.random.default_rng(seed)
    history = {"step": [], "loss": [], "train_accuracy": [], "test_accuracy": []}
    for step in range(1, STEPS + 1):
        idx = order.choice(len(x_train), BATCH_SIZE, replace=False)
        params, opt_state, diagnostics = train_step(
            params, opt_state, (x_train[idx], y_train[idx]), rho
        )
        if step % 50 == 0:
            history["step"].append(step)
            history["loss"].append(float(loss_fn(params, (x_train, y_train))[0]))
            history["train_accuracy"].append(float(accuracy(params, x_train, y_train)))
            history["test_accuracy"].append(float(accuracy(params, x_test, y_test)))
    return params, history


runs = {"ERM": train(rho=0.0), f"SAM (rho={RHO})": train(rho=RHO)}
for name, (_, history) in runs.items():
    print(
        f"{name:14s} final training loss {history['loss'][-1]:.3f}, train accuracy "
        f"{history['train_accuracy'][-1]:.3f}, test accuracy {history['test_accuracy'][-1]:.3f}"
    )

# %%
fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
for name, (_, history) in runs.items():
    axes[0].plot(history["step"], history["loss"], label=name)
    axes[1].plot(history["step"], history["train_accuracy"], label=name)
    axes[2].plot(history["step"], history["test_accuracy"], label=name)
for ax, title in zip(axes, ["training loss", "training accuracy", "test accuracy"], strict=True):
    ax.set(title=title, xlabel="step")
    ax.legend()
fig.tight_layout()

# %% [markdown]
# ## Which solution is flatter?
#
# `flatness` takes any `loss(params) -> scalar`: here the full training loss. The
# rho-sharpness uses the same rho for both networks; the 1-D landscapes use a
# filter-normalised random direction per network, from the same seed.


# %%
def full_training_loss(params):
    return loss_fn(params, (x_train, y_train))[0]


key = jax.random.key(0)
alphas = np.linspace(-1.0, 1.0, 41)
curves = {}
for name, (params, _) in runs.items():
    sharpness = measures_lib.rho_sharpness(full_training_loss, params, rho=RHO, steps=10)
    top = measures_lib.top_hessian_eigenvalue(full_training_loss, params, iters=50, seed=0)
    trace = measures_lib.hessian_trace(full_training_loss, params, samples=50, seed=0)
    print(
        f"{name:14s} rho-sharpness {float(sharpness['sharpness']):.4f}  top eigenvalue "
        f"{float(top['eigenvalue']):8.2f}  trace {float(trace['trace']):8.1f} ± "
        f"{1.96 * float(trace['std_error']):.1f}"
    )
    direction = landscape.random_direction(params, key)
    curves[name] = landscape.loss_landscape_1d(full_training_loss, params, direction, alphas)

# %%
fig, axes = plt.subplots(1, 1 + len(runs), figsize=(14, 3.8))
for name, losses in curves.items():
    axes[0].plot(alphas, losses, label=name)
axes[0].set(title="training loss along a random direction", xlabel=r"$\alpha$", ylabel="loss")
axes[0].legend()
grid = np.linspace(-1.1, 1.1, 200, dtype=np.float32)
mesh = np.stack(np.meshgrid(grid, grid), -1).reshape(-1, 2)
for ax, (name, (params, _)) in zip(axes[1:], runs.items(), strict=True):
    probability = jax.nn.softmax(model.apply({"params": params}, mesh))[:, 1]
    ax.contourf(grid, grid, np.asarray(probability).reshape(200, 200), levels=20, cmap="coolwarm")
    ax.scatter(*x_train.T, c=y_train, cmap="coolwarm", s=6, edgecolors="k", linewidths=0.2)
    ax.set(title=f"{name}: decision function", aspect="equal")
fig.tight_layout()

# %% [markdown]
# ## A cheaper route to flatness: the one-line swap
#
# `flatfsc_jax.flat_methods` offers SAM's cheaper relatives (SAM-late, every-k, LookSAM,
# Momentum-SAM, RWP, GSAM, EMA/SWA; docs/flat_methods.md) with `sam_update`'s shape of
# interface. Swapping one in changes the update call (plus creating the method's state
# once): here Momentum-SAM, which perturbs along the momentum buffer and so takes one
# gradient per step instead of SAM's two. Its buffer is `optax.sgd`'s trace (momentum
# 0.9, no weight decay), and its radius is on another scale than SAM's.

# %%
flat = flat_methods.FlatMethod(method="msam", rho=10 * RHO, momentum=0.9)
flat_gradient = flat_methods.make_flat_gradient(flat)


@jax.jit
def flat_train_step(params, opt_state, flat_state, batch, step):
    # was: params, opt_state, _, diagnostics = sam.sam_update(
    #          loss_fn, params, opt_state, batch, tx, rho=rho)
    params, opt_state, flat_state, _, diagnostics = flat_methods.flat_update(
        flat_gradient, loss_fn, params, opt_state, flat_state, batch, tx, step
    )
    return params, opt_state, flat_state, diagnostics


params = model.init(jax.random.key(0), x_train[:1])["params"]
opt_state, flat_state = tx.init(params), flat_methods.init_state(flat, params)
order = np.random.default_rng(0)  # the same mini-batches as ERM and SAM above
evaluations = 0.0
for step in range(STEPS):
    idx = order.choice(len(x_train), BATCH_SIZE, replace=False)
    params, opt_state, flat_state, diagnostics = flat_train_step(
        params, opt_state, flat_state, (x_train[idx], y_train[idx]), step
    )
    evaluations += float(diagnostics.gradient_evaluations)
sharpness = measures_lib.rho_sharpness(full_training_loss, params, rho=RHO, steps=10)
print(
    f"MSAM: {evaluations / STEPS:.2f} gradients per step (SAM: 2), test accuracy "
    f"{float(accuracy(params, x_test, y_test)):.3f}, rho-sharpness "
    f"{float(sharpness['sharpness']):.4f}"
)
