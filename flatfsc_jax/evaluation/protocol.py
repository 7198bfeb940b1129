"""The paper's evaluation protocol over a zoo: seen domains, unseen domains, PARC, adaptation.

For every evaluation domain (its *test* classes) the same ``config.evaluation.episodes``
variable-way variable-shot episodes are sampled once (seeded) and every backbone family
is evaluated on them, so families are compared with paired differences:

* a *family* is a backbone training method: ``erm``, ``sam`` and, with fusion,
  ``erm+ft`` / ``sam+ft`` (or ``+lora``), or ``erm+kd`` / ``sam+kd`` (distillation);
* a seen domain uses the family's own backbone for that domain (for a fused family the
  general domain uses its un-fused backbone, which is where fusion starts); a ``+kd``
  family has a single student, stored as ``<fusion.source_domain>/<m>+kd``, which serves
  every domain, seen and unseen (so no PARC selection);
* an unseen domain uses, per task, the family's backbone with the highest PARC score on
  that task's support set (``config.evaluation.parc_support``; the paper), or, with
  ``parc_support=False``, one backbone per dataset chosen by the mean PARC score;
* adaptations: ``ncc`` on embeddings cached once per (backbone, domain) and evaluated
  with ``jax.vmap`` over padded episodes; ``pa`` (pa.py) trains URL's linear map on the
  same cached embeddings, vmapped likewise, on the first ``pa_episodes`` episodes (None: all);
  ``finetune`` / ``lora`` fine-tune on each task's support set (adapt.py) on the first
  ``config.evaluation.finetune_episodes`` episodes and ``tsa`` trains task-specific
  adapters (tsa.py) on the first ``tsa_episodes`` (the same ones for every family; these
  three run the backbone at test time, so ``finetune_families`` restricts them). PA and
  TSA take URL's / TSA's learning rates for the domain's role: seen (in
  ``config.domains``) or unseen.

Results are plain data (``dict``): ``results["domains"][domain]["families"][family]
[adaptation] = list of per-episode accuracies``; ``flatfsc_jax.reporting.tables`` renders
them.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from flatfsc_jax import families, models
from flatfsc_jax import zoo as zoo_lib
from flatfsc_jax.data import benchmarks
from flatfsc_jax.data import episodes as episodes_lib
from flatfsc_jax.evaluation import adapt, pa, parc, tsa
from flatfsc_jax.evaluation import ncc as ncc_lib
from flatfsc_jax.profiling import PROFILE

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# PARC on padded episodes (vectorised over tasks).
# ---------------------------------------------------------------------------------------


def parc_subsets(batch, max_support: int, seed: int):
    """Per-episode random subsets of at most ``max_support`` support examples for PARC.

    PARC's cost grows with the square of the support size (all sample pairs, then a sort
    of them); a seeded uniform subsample keeps scoring 500-image supports cheap. Returns
    ``(support_idx, support_labels, support_mask)`` of width ``max_support`` (or the
    batch's own arrays when ``max_support`` is 0 or not smaller than the padded width).
    """
    width = batch.support_idx.shape[1]
    if not max_support or max_support >= width:
        return batch.support_idx, batch.support_labels, batch.support_mask
    rng = np.random.default_rng(seed)
    n = len(batch.ways)
    idx = np.zeros((n, max_support), batch.support_idx.dtype)
    lab = np.zeros((n, max_support), batch.support_labels.dtype)
    mask = np.zeros((n, max_support), bool)
    for e in range(n):
        valid = np.flatnonzero(batch.support_mask[e])
        take = rng.permutation(valid)[:max_support]
        idx[e, : len(take)] = batch.support_idx[e, take]
        lab[e, : len(take)] = batch.support_labels[e, take]
        mask[e, : len(take)] = True
    return idx, lab, mask


# ---------------------------------------------------------------------------------------
# The protocol.
# ---------------------------------------------------------------------------------------


def evaluation_seed(config) -> int:
    """Seed of the test episodes and PARC subsets: ``config.evaluation.seed``, fixed
    while ``config.seed`` (training) varies, so training seeds are compared on the same
    episodes and their spread measures training variation only."""
    return int(config.evaluation.get("seed", 0))


# Adaptations that run the backbone per task (restricted by finetune_families).
BACKBONE_ADAPTATIONS = ("finetune", "lora", "tsa")
# Adaptations on cached embeddings: one batched call per domain (adapt_on_embeddings).
EMBEDDING_ADAPTATIONS = ("ncc", "pa")


def bucket_supports() -> bool:
    """Whether the backbone adaptations (fine-tuning, LoRA, TSA) pad each episode's
    support set to a power-of-two bucket (``episodes.compact_episode``) instead of the
    domain's full width: on by default on accelerators, off on CPU.

    Bucketing costs one compilation per bucket; on an accelerator compiles are cheap next
    to 600 MD episodes padded to the 500-image maximum support, while on a
    CPU at Glyphs scale the few extra compilations dominate 10 episodes
    (docs/scale.md#cost-of-the-full-reproduction).
    """
    return jax.default_backend() != "cpu"


def num_episodes(ev, adaptation: str, total: int) -> int:
    """How many of the ``total`` test episodes (the first ones) an adaptation runs on."""
    n = {
        "ncc": total,
        "pa": ev.pa_episodes or total,
        "finetune": ev.finetune_episodes,
        "lora": ev.finetune_episodes,
        "tsa": ev.tsa_episodes,
    }[adaptation]
    return min(int(n), total)


# ---------------------------------------------------------------------------------------
# Backbone selection: which backbone of a family serves each episode of a domain.
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Selection:
    """Which backbone a family uses for each episode of one domain.

    Attributes:
      candidates: the ``(domain, method)`` zoo entries the family may use there.
      choice: int [E], per episode the index of its backbone in ``candidates``.
    """

    candidates: list[tuple[str, str]]
    choice: np.ndarray

    def counts(self) -> dict[str, int]:
        """``"domain/method"`` -> number of episodes it serves (``results`` "selection")."""
        return {
            f"{c[0]}/{c[1]}": int(np.sum(self.choice == i)) for i, c in enumerate(self.candidates)
        }


def candidate_backbones(config, family: str, domain: str) -> list[tuple[str, str]]:
    """The zoo entries ``(domain, method)`` a family chooses among on a domain: its own
    backbone on a seen domain, one per seen domain on an unseen one (a ``+kd`` family
    has a single student for all)."""
    seen = tuple(config.domains)
    if domain in seen:
        return [families.family_backbone(config, family, domain)]
    return list(dict.fromkeys(families.family_backbone(config, family, d) for d in seen))


def select_backbones(config, family: str, domain: str, parc_score, num: int) -> Selection:
    """The backbone of each of the ``num`` episodes of a domain for one family.

    ``parc_score(candidate)`` gives a candidate's PARC score of every episode (float [E]);
    it is called only when there is a choice. Per episode the highest score wins
    (``config.evaluation.parc_support``), or one backbone for the whole dataset by the
    mean score.
    """
    candidates = candidate_backbones(config, family, domain)
    if len(candidates) == 1:
        return Selection(candidates, np.zeros(num, np.int64))
    scores = np.stack([parc_score(c) for c in candidates])
    if config.evaluation.parc_support:
        choice = np.argmax(scores, axis=0)
    else:
        choice = np.full(num, int(np.argmax(scores.mean(axis=1))))
    return Selection(candidates, choice)


def adapt_on_embeddings(config, domain, selections: dict, batch, embeddings, adapted) -> None:
    """NCC and PA of every (backbone, episode) pair the given families select on a domain.

    ``selections``: family -> :class:`Selection`; ``embeddings``: backbone -> embeddings of
    the domain's test split. The pairs not yet in ``adapted`` (``(adaptation, backbone) ->
    {episode: accuracy}``) are evaluated in one batched call per adaptation over
    :func:`ncc.tasks_on_one_table` and stored there. One call per domain, not one per
    (family, backbone): on unseen domains PARC spreads a family's episodes over all its
    candidates, and every small call would compile its own shapes.
    """
    ev = config.evaluation
    for adaptation in ev.adaptations:
        if adaptation not in EMBEDDING_ADAPTATIONS:
            continue
        n = num_episodes(ev, adaptation, len(batch))
        tasks = []
        for selection in selections.values():
            for i, c in enumerate(selection.candidates):
                done = adapted.setdefault((adaptation, c), {})
                chosen = np.flatnonzero(selection.choice[:n] == i)
                tasks += [(c, int(j)) for j in chosen if int(j) not in done]
        tasks = list(dict.fromkeys(tasks))
        if not tasks:
            continue
        table, task_batch = ncc_lib.tasks_on_one_table(embeddings, batch, tasks)
        with PROFILE.section(f"evaluate/{adaptation}"):
            if adaptation == "ncc":
                acc = ncc_lib.episode_accuracies(table, task_batch, metric=ev.metric)
            else:
                seen = domain in tuple(config.domains)
                acc = pa.episode_accuracies(
                    table, task_batch, lr=pa.learning_rate(seen), steps=ev.pa_steps
                )
        for (c, j), a in zip(tasks, acc, strict=True):
            adapted[(adaptation, c)][j] = a


# ---------------------------------------------------------------------------------------
# Family evaluation: the adaptations of one family on a domain, given its selection.
# ---------------------------------------------------------------------------------------


def evaluate_family(
    config,
    family: str,
    domain: str,
    selection: Selection,
    batch: episodes_lib.EpisodeBatch,
    split,
    *,
    embeddings,
    backbone,
    adapted: dict | None = None,
) -> dict[str, list[float]]:
    """Accuracies of one family on the episodes of one domain, per adaptation.

    Args:
      config: the full config (``config.evaluation`` sets the adaptations and their
        episode counts; ``config.domains`` the domain's role for PA / TSA rates).
      family: the family (``finetune_families`` restricts the backbone adaptations).
      domain: the evaluation domain (seen or unseen: PA's and TSA's learning rates).
      selection: the backbone of every episode (:func:`select_backbones`).
      batch: the domain's test episodes; ``split`` its test split.
      embeddings: ``(domain, method)`` -> embeddings of ``split`` (ncc, pa).
      backbone: ``(domain, method)`` -> its ``LoadedBackbone`` trunk (finetune, lora, tsa).
      adapted: ``(adaptation, backbone) -> {episode: accuracy}``, shared by the families
        of one domain: an episode already adapted with a backbone is not adapted again
        (its accuracy depends only on the backbone and the episode). Updated here.
    Returns:
      ``adaptation -> per-episode accuracies`` of the first ``num_episodes`` episodes.
    """
    ev = config.evaluation
    seen = domain in tuple(config.domains)
    adapted = {} if adapted is None else adapted
    adapt_on_embeddings(config, domain, {family: selection}, batch, embeddings, adapted)
    accs = {}
    for adaptation in ev.adaptations:
        restricted = ev.finetune_families and family not in ev.finetune_families
        if adaptation in BACKBONE_ADAPTATIONS and restricted:
            continue  # not adapted at test time (config.evaluation.finetune_families)
        acc = np.full(len(batch), np.nan)
        n = num_episodes(ev, adaptation, len(batch))
        for i, c in enumerate(selection.candidates):
            chosen = np.flatnonzero(selection.choice[:n] == i)
            done = adapted.setdefault((adaptation, c), {})
            acc[chosen] = [done.get(int(j), np.nan) for j in chosen]
            idx = np.asarray([j for j in chosen if int(j) not in done], np.int64)
            if len(idx) == 0:
                continue
            # NCC and PA were all done above (adapt_on_embeddings); the backbone
            # adaptations run per backbone, since each has its own weights.
            sub = batch.take(idx)
            with PROFILE.section(f"evaluate/{adaptation}"):
                if adaptation == "tsa":
                    lr_alpha, lr_beta = tsa.learning_rates(seen)
                    acc[idx] = tsa.episode_accuracies(
                        backbone(c).model,
                        backbone(c).variables,
                        split,
                        sub,
                        lr_alpha=lr_alpha,
                        lr_beta=lr_beta,
                        steps=ev.tsa_steps,
                        bucket=bucket_supports(),
                    )
                    continue
                acc[idx] = adapt.adapt_episodes(
                    backbone(c).model,
                    backbone(c).variables,
                    split,
                    sub,
                    mode="full" if adaptation == "finetune" else "lora",
                    steps=ev.finetune_steps,
                    learning_rate=ev.finetune_lr,
                    lora_rank=ev.lora_rank,
                    metric=ev.metric,
                    bucket=bucket_supports(),
                )
        for i, c in enumerate(selection.candidates):
            chosen = np.flatnonzero(selection.choice[:n] == i)
            adapted[(adaptation, c)].update((int(j), acc[j]) for j in chosen)
        accs[adaptation] = acc[:n].tolist()
    return accs


# ---------------------------------------------------------------------------------------
# The whole protocol over a zoo.
# ---------------------------------------------------------------------------------------


def evaluate_zoo(config, zoo: zoo_lib.Zoo, *, progress=True) -> dict:
    """Runs the protocol; returns plain-data results (see the module docstring)."""
    ev = config.evaluation
    seen = tuple(config.domains)
    fams = families.families(config)
    cache: dict = {}

    def backbone(key):
        """The entry's trunk (no head): every backbone of one architecture is then the
        same static ``Model``, so jitted embedding / fine-tuning compile once for all."""
        if key not in cache:
            with PROFILE.section("evaluate/load"):
                loaded = zoo.load(config.benchmark, *key)
            m = loaded.entry.metadata["model"]
            trunk = models.build_model(m["arch"], 0, width=m["width"], dtype=m["dtype"])
            variables = {
                "params": models.trunk_params(loaded.variables["params"]),
                "batch_stats": loaded.variables["batch_stats"],
            }
            cache[key] = zoo_lib.LoadedBackbone(trunk, variables, loaded.entry)
        return cache[key]

    results = {
        "benchmark": config.benchmark,
        "families": fams,
        "adaptations": list(ev.adaptations),
        "seen_domains": list(seen),
        "episodes": int(ev.episodes),
        "episode_spec": ev.get("episode_spec", "md"),
        "finetune_episodes": int(ev.finetune_episodes),
        "pa_episodes": int(ev.pa_episodes or ev.episodes),
        "tsa_episodes": int(ev.tsa_episodes),
        "domains": {},
    }
    domains = list(ev.domains)
    bar = tqdm(total=len(domains) * len(fams), desc="evaluate", disable=not progress)
    for domain in domains:
        results["domains"][domain] = _evaluate_domain(config, domain, fams, backbone, bar)
    bar.close()
    return results


def _evaluate_domain(config, domain: str, fams: list[str], backbone, bar) -> dict:
    """``results["domains"][domain]``: every family on the domain's test episodes."""
    ev = config.evaluation
    t0 = time.perf_counter()
    with PROFILE.section("evaluate/episodes"):
        split = benchmarks.load_split(
            config.benchmark,
            domain,
            "test",
            config.data_dir,
            **benchmarks.split_options(config.benchmark, config.data.class_splits),
        )
        batch = episodes_lib.EpisodeBatch.sample(
            split,
            ev.episodes,
            seed=evaluation_seed(config) + 1000,
            spec=episodes_lib.episode_spec(ev.get("episode_spec", "md")),
        )
        # From here on the split is the rows the episodes use and the episodes index
        # them: embeddings, PARC and adaptation read only those images, so host memory
        # follows the episodes, not the split (7.7M images on MD QuickDraw).
        rows, batch = ncc_lib.used_rows(batch)
        split = ncc_lib.SplitRows(split, rows)
    parc_support_sets = parc_subsets(batch, ev.parc_max_support, evaluation_seed(config) + 2000)
    embeds: dict = {}  # (domain, method) of a backbone -> embeddings of this split
    parc_cache: dict = {}  # (domain, method) -> PARC score per episode
    # (adaptation, backbone) -> {episode: accuracy}. Families share backbones (a fused
    # family starts from the general domain's own backbone, and PARC often picks it for
    # both ERM and ERM+FT), and an episode's adapted accuracy depends only on the
    # backbone and the episode, so each pair is adapted once per domain.
    adapted: dict = {}

    # Families share backbones (a fused family uses the general domain's own backbone):
    # embed and PARC-score each backbone once per domain.
    def embed(c):
        if c not in embeds:
            loaded = backbone(c)  # loading has its own section (not nested)
            with PROFILE.section("evaluate/embed"):
                embeds[c] = ncc_lib.embed_split(
                    loaded.model, loaded.variables, split, batch_size=config.validation.batch_size
                )
        return embeds[c]

    def parc_score(c):
        if c not in parc_cache:
            with PROFILE.section("evaluate/parc"):
                parc_cache[c] = parc.parc_scores_padded(embeds[c], *parc_support_sets)
        return parc_cache[c]

    seen = domain in tuple(config.domains)
    dom = {"seen": seen, "ways": batch.ways.tolist(), "families": {}, "selection": {}}
    if split.provenance is not None:  # where the data came from, for the report
        dom["provenance"] = dict(split.provenance)
    selections = {}
    for fam in fams:
        bar.set_description(f"evaluate {domain} {fam}: embed, select")
        for c in candidate_backbones(config, fam, domain):
            embed(c)
        selections[fam] = select_backbones(config, fam, domain, parc_score, len(batch))
        dom["selection"][fam] = selections[fam].counts()
    # NCC and PA of every family in one batched call per adaptation.
    adapt_on_embeddings(config, domain, selections, batch, embeds, adapted)
    for fam in fams:
        bar.set_description(f"evaluate {domain} {fam}")
        dom["families"][fam] = evaluate_family(
            config,
            fam,
            domain,
            selections[fam],
            batch,
            split,
            embeddings=embeds,
            backbone=backbone,
            adapted=adapted,
        )
        bar.update(1)
    dom["seconds"] = time.perf_counter() - t0
    return dom
