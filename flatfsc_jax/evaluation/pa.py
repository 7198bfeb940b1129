"""PA: pre-classifier alignment (URL; Li, Liu & Bilen, ICCV 2021) on cached embeddings.

Per task, a bias-free linear map ``W`` [D, D], initialised to the identity, is trained on
the support set and the queries are then classified by nearest centroid (10 x cosine) on
the mapped features ``x @ W``. Recipe (URL's ``pa``):

* loss: cross-entropy of the support set against its own prototypes, both mapped, with
  ``10 * cos`` logits (the NCC loss of adapt.py, on embeddings instead of images); PA
  always uses the cosine, whatever ``config.evaluation.metric`` says for NCC;
* optimiser: 40 full-batch Adadelta steps (``rho=0.9, eps=1e-6``, PyTorch's defaults);
* learning rate by the *role* of the evaluation domain, as URL does: 0.1 on a seen domain
  (one the backbones were trained on), 1.0 on an unseen one (:data:`LEARNING_RATES`).
  The rate therefore uses one bit of knowledge a pure few-shot learner would not have.

The backbone is never run: embeddings are cached once per (backbone, split) and episodes
are index arrays into them (ncc.py). All episodes of a padded ``EpisodeBatch`` share
fixed shapes, so one ``jax.vmap`` over episodes of one ``jax.jit`` holding the whole
40-step loop (``lax.scan``; no convolutions, so XLA:CPU's slow loop path for
convolutions does not apply) evaluates them all, ``chunk`` episodes per call. Padded
support slots are masked out of the prototypes and the loss, padded queries out of the
accuracy. With ``steps=0`` (or at step 0) ``W`` is the identity and PA equals NCC exactly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flatfsc_jax.checks import check_int, check_number
from flatfsc_jax.evaluation import ncc

DEFAULT_STEPS = 40
# URL's rates (test_extractor_pa.py): by whether the domain is one the backbones saw.
LEARNING_RATES = {"seen": 0.1, "unseen": 1.0}
ADADELTA = dict(rho=0.9, eps=1e-6)  # PyTorch's Adadelta defaults, which URL uses
SCALE = 10.0  # cosine logit scale of the NCC loss and classifier


def learning_rate(seen: bool) -> float:
    """URL's PA learning rate for a seen (True) or unseen (False) domain."""
    return LEARNING_RATES["seen" if seen else "unseen"]


def apply_map(features, w):
    """``features @ w`` in full float32 precision (identity ``w`` returns ``features``)."""
    return jnp.matmul(features, w, precision=jax.lax.Precision.HIGHEST)


def support_ncc_loss(features, labels, mask, max_ways: int):
    """Mean cross-entropy of the unmasked support features against their own prototypes.

    ``features`` [S, D] (already mapped), ``labels`` int [S], ``mask`` bool [S].
    """
    logits = ncc.prototype_logits(
        features, labels, mask, features, max_ways, metric="cosine", scale=SCALE
    )
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    maskf = mask.astype(ce.dtype)
    return jnp.sum(ce * maskf) / jnp.maximum(maskf.sum(), 1.0)


def fit_map(support_emb, support_labels, support_mask, max_ways: int, *, lr, steps: int):
    """The PA map ``W`` [D, D] after ``steps`` Adadelta steps from the identity.

    Also returns the support loss before each step, float [steps]. Traceable: ``lr`` may be
    a traced scalar; ``steps`` and ``max_ways`` are static.
    """
    d = support_emb.shape[-1]
    tx = optax.adadelta(lr, **ADADELTA)

    def loss_fn(w):
        mapped = apply_map(support_emb, w)
        return support_ncc_loss(mapped, support_labels, support_mask, max_ways)

    def step(carry, _):
        w, opt_state = carry
        loss, grad = jax.value_and_grad(loss_fn)(w)
        updates, opt_state = tx.update(grad, opt_state, w)
        return (optax.apply_updates(w, updates), opt_state), loss

    w = jnp.eye(d, dtype=support_emb.dtype)
    (w, _), losses = jax.lax.scan(step, (w, tx.init(w)), None, length=steps)
    return w, losses


def pa_logits(
    support_emb, support_labels, support_mask, query_emb, max_ways: int, *, lr, steps: int
):
    """Query logits [Q, max_ways] of NCC on PA-mapped features (one episode)."""
    w, _ = fit_map(support_emb, support_labels, support_mask, max_ways, lr=lr, steps=steps)
    return ncc.prototype_logits(
        apply_map(support_emb, w),
        support_labels,
        support_mask,
        apply_map(query_emb, w),
        max_ways,
        metric="cosine",
        scale=SCALE,
    )


@functools.partial(jax.jit, static_argnames=("max_ways", "steps"))
def _chunk_accuracies(embeddings, episode_arrays, lr, *, max_ways, steps):
    def one(s_idx, s_lab, s_mask, q_idx, q_lab, q_mask):
        logits = pa_logits(
            embeddings[s_idx], s_lab, s_mask, embeddings[q_idx], max_ways, lr=lr, steps=steps
        )
        return ncc.masked_accuracy(logits, q_lab, q_mask)

    return jax.vmap(one)(*episode_arrays)


def support_buckets(width: int) -> tuple[int, ...]:
    """Padded support widths PA compiles for: a quarter, a half and all of ``width``.

    PA's cost is linear in the padded support size (40 steps of an [S, D] x [D, D]
    product), and variable-way variable-shot support sets are mostly far below the
    domain's largest: on the Glyphs domains these three widths cut the padded rows by
    ~45% at three compilations per domain (power-of-two buckets cut ~50% but need up to
    seven).
    """
    return tuple(sorted({max(1, -(-width // 4)), max(1, -(-width // 2)), width}))


def episode_accuracies(
    embeddings,
    episodes,
    *,
    lr: float,
    steps: int = DEFAULT_STEPS,
    chunk: int = ncc.DEFAULT_CHUNK,
    bucket: bool = True,
) -> np.ndarray:
    """PA-then-NCC query accuracy of every episode on cached ``embeddings`` [N, D]: [E].

    Same contract as ``ncc.episode_accuracies`` (padded ``EpisodeBatch``, ``chunk``
    episodes per call, the last chunk padded). ``bucket=True`` moves each episode's
    support examples to the front and evaluates it at the smallest of
    :func:`support_buckets` that holds them (queries stay at full width: they cost one
    product, the support 80); ``bucket=False``: one width, one compilation. ``lr`` is a
    traced argument, so seen and unseen domains share the compilations.
    """
    check_int("steps", steps, minimum=0)
    check_number("lr", lr, positive=True)
    check_int("chunk", chunk)
    embeddings = jnp.asarray(embeddings, jnp.float32)
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {embeddings.shape}")
    arrays = ncc.check_episodes(episodes, embeddings.shape[0])
    dtypes = (np.int32, np.int32, bool, np.int32, np.int32, bool)
    arrays = [a.astype(t) for a, t in zip(arrays, dtypes, strict=True)]
    num_episodes, width = arrays[0].shape
    n_support = arrays[2].sum(1)
    if bucket:
        # Unmasked support entries first (stable), so a prefix of the row holds them all.
        order = np.argsort(~arrays[2], axis=1, kind="stable")
        arrays[:3] = [np.take_along_axis(a, order, axis=1) for a in arrays[:3]]
        sizes = np.asarray(support_buckets(width))
        size_of = sizes[np.searchsorted(sizes, n_support)]
    else:
        size_of = np.full(num_episodes, width)
    out = np.zeros(num_episodes, np.float32)
    for size in np.unique(size_of):
        which = np.flatnonzero(size_of == size)
        group = [a[which] for a in arrays]
        group[:3] = [a[:, :size] for a in group[:3]]
        out[which] = _accuracies(embeddings, group, lr, int(episodes.max_ways), steps, chunk)
    return out


def _accuracies(embeddings, arrays, lr, max_ways, steps, chunk) -> np.ndarray:
    """``chunk`` episodes per jitted call, the last chunk padded by repeating one."""
    return ncc.map_episode_chunks(
        lambda part: _chunk_accuracies(
            embeddings, part, jnp.float32(lr), max_ways=max_ways, steps=int(steps)
        ),
        arrays,
        chunk,
    )
