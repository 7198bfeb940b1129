"""Per-episode adaptation (fine-tuning, LoRA, TSA) spread over every local device.

Each episode trains its own copy of the adapted weights from the same start, so episodes
are independent tasks. A *round* puts one episode on each local device
(``ncc.local_mesh``) and runs the adaptation's programs under ``jax.shard_map``: every
device computes exactly the one-episode program (no convolutions batched over
per-episode weights, which vmap would make), and one compilation serves every device.
Episodes are grouped by their padded shape (``episodes.compact_episode``), so one
compilation also serves a whole group; the last round of a group is filled by repeating
one of its episodes and those results are dropped. On one device a round is one episode:
the program the loop always ran.

An adaptation is an :class:`EpisodeProgram`: three pure functions of one episode, held
by a frozen dataclass so that equal programs share their compilations.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from flatfsc_jax.data import episodes as episodes_lib
from flatfsc_jax.data import sources
from flatfsc_jax.evaluation import ncc

EPISODE_KEYS = (
    "support_images",
    "support_labels",
    "support_mask",
    "query_images",
    "query_labels",
    "query_mask",
)


class EpisodeProgram(Protocol):
    """How one episode is adapted and scored. Hashable (a frozen dataclass): it is a static
    argument of the jitted round.

    ``shared`` is what every episode starts from (variables, learning rates), replicated
    on every device; ``episode`` holds the ``EPISODE_KEYS`` of one episode, its images
    float32 in [-1, 1]; ``carry`` is the episode's training state.
    """

    def init(self, shared, episode, carry) -> Any:
        """The training state before the first step (``carry`` is None)."""

    def step(self, shared, episode, carry) -> Any:
        """One optimiser step: the next training state."""

    def accuracy(self, shared, episode, carry) -> jax.Array:
        """Query accuracy of the adapted model, a float32 scalar."""


def support(episode) -> tuple:
    """``(images, labels, mask)`` of an episode's support set, as the step functions take."""
    return episode["support_images"], episode["support_labels"], episode["support_mask"]


def query_accuracy(logits, episode) -> jax.Array:
    """Fraction of the episode's unmasked queries whose arg-max logit is their label."""
    mask = episode["query_mask"]
    hit = (jnp.argmax(logits, -1) == episode["query_labels"]) & mask
    return hit.sum() / jnp.maximum(mask.sum(), 1)


@functools.partial(jax.jit, static_argnames=("program", "phase", "mesh"))
def _round(program, phase, mesh, shared, episode, carry):
    """``program.<phase>`` of every episode of a round, one episode per device."""
    fn = getattr(program, phase)

    def one_device(shared, episode, carry):
        first = functools.partial(jax.tree.map, lambda a: a[0])
        out = fn(shared, first(episode), first(carry))
        return jax.tree.map(lambda a: a[None], out)

    # check_vma=False: init's state comes from the replicated start only, yet each device
    # holds its own copy (it is trained apart).
    return jax.shard_map(
        one_device,
        mesh=mesh,
        in_specs=(P(), P("data"), P("data")),
        out_specs=P("data"),
        check_vma=False,
    )(shared, episode, carry)


@jax.jit
def _preprocess(images_uint8):
    # On the device: uint8 crosses the host boundary (4x fewer bytes); keeps the sharding.
    return sources.preprocess(images_uint8)


def _rounds(compact: list[tuple], size: int) -> list[list[int]]:
    """Episode numbers in rounds of at most ``size``, each round of one padded shape."""
    groups = collections.defaultdict(list)
    for e, parts in enumerate(compact):
        groups[(len(parts[0]), len(parts[3]))].append(e)
    return [
        group[start : start + size]
        for _, group in sorted(groups.items())
        for start in range(0, len(group), size)
    ]


def episode_accuracies(
    program: EpisodeProgram,
    shared,
    split_data,
    arrays,
    *,
    steps: int,
    bucket: bool = True,
) -> np.ndarray:
    """Query accuracy [E] of ``program`` adapted ``steps`` steps on each episode.

    ``arrays``: the six episode arrays, checked against ``split_data``
    (``ncc.check_episodes``); ``bucket`` as ``episodes.compact_episode``. A thread reads
    the next round's images while the devices adapt this one.
    """
    num_episodes = len(arrays[0])
    mesh = ncc.local_mesh()
    compact = [episodes_lib.compact_episode(arrays, e, bucket=bucket) for e in range(num_episodes)]
    rounds = _rounds(compact, mesh.size)
    shared = ncc.replicate(shared, mesh)

    def read(members: list[int]) -> dict:
        filled = members + [members[0]] * (mesh.size - len(members))
        stacked = [np.stack(column) for column in zip(*(compact[e] for e in filled), strict=True)]
        s_idx, q_idx = stacked[0], stacked[3]
        # One read of the round's images; the index arrays become the images.
        images = split_data.get_images(np.concatenate([s_idx.ravel(), q_idx.ravel()]))
        stacked[0] = images[: s_idx.size].reshape(*s_idx.shape, *images.shape[1:])
        stacked[3] = images[s_idx.size :].reshape(*q_idx.shape, *images.shape[1:])
        return dict(zip(EPISODE_KEYS, stacked, strict=True))

    accs = np.zeros(num_episodes, np.float64)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(read, rounds[0]) if rounds else None
        for k, members in enumerate(rounds):
            episode = pending.result()
            if k + 1 < len(rounds):
                pending = reader.submit(read, rounds[k + 1])
            episode = {key: ncc.shard_rows(value, mesh) for key, value in episode.items()}
            for key in ("support_images", "query_images"):
                episode[key] = _preprocess(episode[key])
            run = functools.partial(_round, program, mesh=mesh, shared=shared, episode=episode)
            carry = run(phase="init", carry=None)
            for _ in range(steps):
                carry = run(phase="step", carry=carry)
            accs[members] = np.asarray(run(phase="accuracy", carry=carry))[: len(members)]
    return accs
