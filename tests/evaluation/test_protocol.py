"""Protocol: PARC support subsets, backbone selection (family -> backbone, PARC choice),
family evaluation on a fake zoo of embeddings, and the whole protocol on random trunks."""

import types

import jax
import numpy as np

from configs import glyphs as glyphs_config
from flatfsc_jax import families
from flatfsc_jax.data import episodes as episodes_lib
from flatfsc_jax.data import sampling
from flatfsc_jax.evaluation import parc, protocol


def _batch(n_classes=12, per_class=30, n=20, seed=0):
    labels = np.repeat(np.arange(n_classes), per_class)
    spec = sampling.EpisodeSpec(mode="variable")
    sampler = episodes_lib.EpisodeSampler(labels, spec, seed=seed)
    eps = sampler.sample(n)
    return labels, eps, episodes_lib.pad_episodes(eps, **episodes_lib.bucket_sizes(labels, spec))


def test_parc_subsets_are_random_subsets_of_the_support():
    labels, eps, batch = _batch()
    idx, lab, mask = protocol.parc_subsets(batch, 40, seed=0)
    assert idx.shape == (len(eps), 40)
    for e, ep in enumerate(eps):
        chosen = idx[e][mask[e]]
        assert len(chosen) == min(40, len(ep.support_idx))
        assert set(chosen) <= set(ep.support_idx.tolist())
        lookup = dict(zip(ep.support_idx.tolist(), ep.support_labels.tolist(), strict=True))
        assert [lookup[i] for i in chosen] == lab[e][mask[e]].tolist()
    again = protocol.parc_subsets(batch, 40, seed=0)
    np.testing.assert_array_equal(again[0], idx)
    full = protocol.parc_subsets(batch, 0, seed=0)
    assert full[0] is batch.support_idx


def test_parc_scores_on_padded_episodes_equal_unpadded_parc():
    labels, eps, batch = _batch(n=6)
    emb = np.random.default_rng(1).normal(size=(len(labels), 8)).astype(np.float32)
    scores = parc.parc_scores_padded(emb, *protocol.parc_subsets(batch, 0, seed=0), chunk=4)
    for e, ep in enumerate(eps):
        ref = parc.parc_score(emb[ep.support_idx], ep.support_labels)
        np.testing.assert_allclose(scores[e], ref, atol=1e-5)


def test_fused_family_uses_the_general_backbone_on_its_own_domain():
    c = glyphs_config.get_config()
    assert families.family_backbone(c, "sam+ft", "cjk") == ("cjk", "sam")
    assert families.family_backbone(c, "sam+ft", "latin") == ("latin", "sam+ft")
    assert families.family_backbone(c, "erm", "latin") == ("latin", "erm")
    assert families.families(c) == ["erm", "sam", "erm+ft", "sam+ft"]


def test_distilled_family_uses_its_single_student_everywhere():
    c = glyphs_config.get_config()
    for domain in ("cjk", "latin", "thai"):  # general, other seen, unseen
        assert families.family_backbone(c, "sam+kd", domain) == ("cjk", "sam+kd")
        assert families.family_backbone(c, "erm+kd", domain) == ("cjk", "erm+kd")


def test_episode_counts_per_adaptation():
    c = glyphs_config.get_config()
    ev = c.evaluation
    ev.pa_episodes, ev.finetune_episodes, ev.tsa_episodes = None, 10, 7
    counts = {
        a: protocol.num_episodes(ev, a, 600) for a in ("ncc", "pa", "finetune", "lora", "tsa")
    }
    assert counts == {"ncc": 600, "pa": 600, "finetune": 10, "lora": 10, "tsa": 7}
    ev.pa_episodes = 50
    assert protocol.num_episodes(ev, "pa", 600) == 50
    assert protocol.num_episodes(ev, "pa", 20) == 20


def _zoo_config():
    """Two seen domains (cjk, the general one, and latin), fusion by fine-tuning."""
    c = glyphs_config.get_config()
    c.domains = ("cjk", "latin")
    c.fusion.source_domain = "cjk"
    return c


def _embedding_zoo(labels):
    """Embeddings of one split by backbone: ``latin/sam+ft`` separates the classes (a
    one-hot of the class plus small noise), every other backbone is pure noise."""
    rng = np.random.default_rng(0)
    noise = {
        key: rng.normal(size=(len(labels), 16)).astype(np.float32)
        for key in (("cjk", "sam"), ("latin", "sam"), ("cjk", "erm"), ("latin", "erm"))
    }
    good = np.eye(16, dtype=np.float32)[labels] + 0.01 * rng.normal(size=(len(labels), 16))
    return {**noise, ("latin", "sam+ft"): good.astype(np.float32)}


def test_backbone_selection_maps_fused_families_and_picks_the_parc_best():
    c = _zoo_config()
    labels, _, batch = _batch(n=6)
    zoo = _embedding_zoo(labels)
    subsets = protocol.parc_subsets(batch, 0, seed=0)
    scored = []

    def parc_score(key):
        scored.append(key)
        return parc.parc_scores_padded(zoo[key], *subsets)

    # Seen domains: the family's own backbone (the general domain: the un-fused one), no PARC.
    for domain, want in (("cjk", ("cjk", "sam")), ("latin", ("latin", "sam+ft"))):
        sel = protocol.select_backbones(c, "sam+ft", domain, parc_score, len(batch))
        assert sel.candidates == [want] and sel.counts() == {f"{want[0]}/{want[1]}": 6}
    assert scored == []
    # Unseen: PARC over one backbone per seen domain; the separable one wins every task.
    assert protocol.candidate_backbones(c, "sam+ft", "digits") == [
        ("cjk", "sam"),
        ("latin", "sam+ft"),
    ]
    sel = protocol.select_backbones(c, "sam+ft", "digits", parc_score, len(batch))
    # ... except on a 1-shot task, where PARC has no evidence (0 for every backbone) and
    # the tie goes to the first candidate.
    one_shot = batch.support_mask.sum(1) == batch.ways
    assert one_shot.sum() == 1
    assert sel.choice.tolist() == np.where(one_shot, 0, 1).tolist()
    assert sel.counts() == {"cjk/sam": 1, "latin/sam+ft": 5}
    assert sorted(scored) == [("cjk", "sam"), ("latin", "sam+ft")]
    # A +kd family has one student everywhere: no choice, no PARC.
    sel = protocol.select_backbones(c, "sam+kd", "digits", None, len(batch))
    assert sel.counts() == {"cjk/sam+kd": 6}
    # Per task (parc_support) vs one backbone per dataset by the mean score.
    scores = {("cjk", "erm"): np.array([3.0, 0, 3, 0]), ("latin", "erm"): np.ones(4)}
    per_task = protocol.select_backbones(c, "erm", "digits", scores.get, 4)
    assert per_task.choice.tolist() == [0, 1, 0, 1]
    c.evaluation.parc_support = False
    per_dataset = protocol.select_backbones(c, "erm", "digits", scores.get, 4)
    assert per_dataset.choice.tolist() == [0, 0, 0, 0]  # mean 1.5 > 1


def test_family_evaluation_follows_the_selection_and_finetune_families(monkeypatch):
    from flatfsc_jax.evaluation import adapt
    from flatfsc_jax.evaluation import ncc as ncc_lib

    c = _zoo_config()
    ev = c.evaluation
    ev.adaptations = ("ncc", "finetune")
    ev.finetune_families = ("sam+ft",)
    ev.finetune_episodes = 3
    labels, _, batch = _batch(n=6)
    zoo = _embedding_zoo(labels)
    calls = []

    def fake_adapt(model, variables, split, episodes, **kwargs):
        calls.append((model, variables, len(episodes)))
        return np.full(len(episodes), 0.5 if model == "latin/sam+ft" else 0.25)

    monkeypatch.setattr(adapt, "adapt_episodes", fake_adapt)

    def backbone(key):  # a LoadedBackbone stand-in: only passed on to adapt_episodes
        return types.SimpleNamespace(model=f"{key[0]}/{key[1]}", variables=key)

    split = object()  # only passed on to adapt_episodes
    sel = protocol.Selection([("cjk", "sam"), ("latin", "sam+ft")], np.array([0, 1, 1, 0, 1, 1]))
    accs = protocol.evaluate_family(
        c, "sam+ft", "digits", sel, batch, split, embeddings=zoo, backbone=backbone
    )
    assert list(accs) == ["ncc", "finetune"]
    # NCC on all 6 tasks, each with its selected backbone's embeddings.
    for i, key in enumerate(sel.candidates):
        idx = np.flatnonzero(sel.choice == i)
        want = ncc_lib.episode_accuracies(zoo[key], batch.take(idx))
        np.testing.assert_array_equal(np.asarray(accs["ncc"])[idx], want)
    assert min(accs["ncc"][i] for i in (1, 2, 4, 5)) > 0.9  # the separable backbone
    # Fine-tuning on the first 3 tasks only, one call per backbone with its tasks.
    assert accs["finetune"] == [0.25, 0.5, 0.5]
    assert calls == [("cjk/sam", ("cjk", "sam"), 1), ("latin/sam+ft", ("latin", "sam+ft"), 2)]
    # A family outside finetune_families is not fine-tuned.
    sel = protocol.Selection([("latin", "erm")], np.zeros(6, np.int64))
    accs = protocol.evaluate_family(
        c, "erm", "latin", sel, batch, split, embeddings=zoo, backbone=backbone
    )
    assert list(accs) == ["ncc"] and len(calls) == 2
    # Families of one domain share the adaptation cache: a task already adapted with a
    # backbone is not adapted again.
    ev.finetune_families = ()
    sel = protocol.Selection([("cjk", "sam"), ("latin", "sam+ft")], np.array([0, 1, 1, 0, 1, 1]))
    cache: dict = {}
    first = protocol.evaluate_family(
        c, "sam", "digits", sel, batch, split, embeddings=zoo, backbone=backbone, adapted=cache
    )
    again = protocol.evaluate_family(
        c, "sam+ft", "digits", sel, batch, split, embeddings=zoo, backbone=backbone, adapted=cache
    )
    assert again == first and len(calls) == 4


class _FakeZoo:
    """Random conv4 trunks for any (domain, method); records what was loaded."""

    def __init__(self):
        self.loaded = []

    def load(self, benchmark, domain, method):
        from flatfsc_jax import models
        from flatfsc_jax import zoo as zoo_lib

        self.loaded.append((domain, method))
        meta = {"model": {"arch": "conv4", "width": 0.125, "dtype": "float32"}}
        model = models.build_model("conv4", 0, width=0.125)
        seed = len(self.loaded)
        variables = jax.jit(model.init)(jax.random.PRNGKey(seed), np.zeros((1, 28, 28, 1)))
        entry = zoo_lib.ZooEntry(benchmark, domain, method, None, meta)
        return zoo_lib.LoadedBackbone(model, dict(variables), entry)


def test_evaluate_zoo_dispatches_pa_and_tsa_with_the_domain_role(tmp_path, monkeypatch):
    from flatfsc_jax import experiment
    from flatfsc_jax.evaluation import pa

    c = glyphs_config.get_config("tiny")
    c.data_dir = str(tmp_path / "data")
    ev = c.evaluation
    ev.domains = ("cjk", "latin", "digits")  # general, seen, unseen
    ev.adaptations = ("ncc", "pa", "tsa")
    ev.finetune_families = ()
    ev.pa_steps = 0  # PA from the identity: must reproduce NCC exactly
    ev.tsa_episodes, ev.tsa_steps = 2, 1
    ev.pa_episodes = None  # all episodes (the Glyphs default caps PA at 100)
    experiment.check_data(c, ("evaluate",))
    monkeypatch.setattr(families, "families", lambda config: ["erm", "erm+kd"])
    rates = []
    real_pa = pa.episode_accuracies

    def recording_pa(embeddings, episodes, *, lr, steps):
        rates.append(lr)
        return real_pa(embeddings, episodes, lr=lr, steps=steps)

    monkeypatch.setattr(pa, "episode_accuracies", recording_pa)
    zoo = _FakeZoo()
    results = protocol.evaluate_zoo(c, zoo, progress=False)

    # The +kd family loaded one backbone, the student, and skipped PARC on "digits".
    assert [k for k in zoo.loaded if k[1] == "erm+kd"] == [("cjk", "erm+kd")]
    assert results["domains"]["digits"]["selection"]["erm+kd"] == {"cjk/erm+kd": ev.episodes}
    assert len(results["domains"]["digits"]["selection"]["erm"]) == 2  # PARC over cjk, latin
    for domain, dom in results["domains"].items():
        for fam, accs in dom["families"].items():
            assert accs["pa"] == accs["ncc"], (domain, fam)
            assert len(accs["ncc"]) == ev.episodes and len(accs["tsa"]) == 2
            assert all(0.0 <= a <= 1.0 for a in accs["tsa"])
    # URL's rates by domain role: 0.1 on the seen cjk / latin, 1.0 on the unseen digits.
    assert set(rates[:2]) == {0.1} and 1.0 in rates and set(rates) == {0.1, 1.0}
    assert results["pa_episodes"] == ev.episodes and results["tsa_episodes"] == 2


def test_evaluate_zoo_adapts_each_backbone_and_episode_once(tmp_path, monkeypatch):
    """ERM and ERM+FT share the general backbone (on its own domain, and as a PARC
    candidate on unseen ones): PA runs once per (backbone, episode) of a domain, and the
    shared results are the same numbers."""
    import hashlib

    from flatfsc_jax import experiment
    from flatfsc_jax.evaluation import pa

    c = glyphs_config.get_config("tiny")
    c.data_dir = str(tmp_path / "data")
    ev = c.evaluation
    ev.domains = ("cjk", "latin", "digits")
    ev.adaptations = ("ncc", "pa")
    ev.pa_steps, ev.pa_episodes = 3, 0
    experiment.check_data(c, ("evaluate",))
    monkeypatch.setattr(families, "families", lambda config: ["erm", "erm+ft"])
    seen_pairs, calls = [], []
    real_pa = pa.episode_accuracies

    def recording_pa(embeddings, episodes, *, lr, steps):
        # A task is its support embeddings: they name the backbone and the episode, in
        # whichever table and call they arrive.
        table = np.asarray(embeddings)
        for row in range(len(episodes.ways)):
            support = table[episodes.support_idx[row][episodes.support_mask[row]]]
            seen_pairs.append(hashlib.sha1(support.tobytes()).hexdigest())
        calls.append(len(episodes.ways))
        return real_pa(embeddings, episodes, lr=lr, steps=steps)

    monkeypatch.setattr(pa, "episode_accuracies", recording_pa)
    results = protocol.evaluate_zoo(c, _FakeZoo(), progress=False)

    assert len(seen_pairs) == len(set(seen_pairs))  # nothing adapted twice
    assert len(calls) == len(results["domains"])  # one batched call per domain
    cjk = results["domains"]["cjk"]["families"]
    assert cjk["erm+ft"] == cjk["erm"]  # the same backbone, the same numbers
    # cjk's episodes were adapted for one family only; latin's for both (two backbones).
    assert len(seen_pairs) < 2 * len(results["domains"]) * ev.episodes
    for dom in results["domains"].values():
        for accs in dom["families"].values():
            assert len(accs["pa"]) == ev.episodes and not np.isnan(accs["pa"]).any()
