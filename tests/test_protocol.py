"""Protocol helpers: PARC support subsets, episode selection, family -> backbone mapping."""

import dataclasses

import jax
import numpy as np

from configs import glyphs as glyphs_config
from flatfsc_jax import parc, protocol
from flatfsc_jax.data import episodes as episodes_lib


def _batch(n_classes=12, per_class=30, n=20, seed=0):
    labels = np.repeat(np.arange(n_classes), per_class)
    spec = episodes_lib.EpisodeSpec(mode="variable")
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
    scores = protocol.parc_scores(emb, protocol.parc_subsets(batch, 0, seed=0), chunk=4)
    for e, ep in enumerate(eps):
        ref = parc.parc_score(emb[ep.support_idx], ep.support_labels)
        np.testing.assert_allclose(scores[e], ref, atol=1e-5)


def test_take_episodes_keeps_padded_shapes():
    _, _, batch = _batch(n=10)
    sub = protocol.take_episodes(batch, [3, 7])
    assert sub.support_idx.shape == (2, batch.support_idx.shape[1])
    np.testing.assert_array_equal(sub.query_idx[1], batch.query_idx[7])
    assert sub.max_ways == batch.max_ways
    assert dataclasses.is_dataclass(sub)


def test_fused_family_uses_the_general_backbone_on_its_own_domain():
    c = glyphs_config.get_config()
    assert protocol.family_backbone(c, "sam+ft", "cjk") == ("cjk", "sam")
    assert protocol.family_backbone(c, "sam+ft", "latin") == ("latin", "sam+ft")
    assert protocol.family_backbone(c, "erm", "latin") == ("latin", "erm")
    assert protocol.families(c, None) == ["erm", "sam", "erm+ft", "sam+ft"]


def test_distilled_family_uses_its_single_student_everywhere():
    c = glyphs_config.get_config()
    for domain in ("cjk", "latin", "thai"):  # general, other seen, unseen
        assert protocol.family_backbone(c, "sam+kd", domain) == ("cjk", "sam+kd")
        assert protocol.family_backbone(c, "erm+kd", domain) == ("cjk", "erm+kd")


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
    from flatfsc_jax import experiment, pa

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
    monkeypatch.setattr(protocol, "families", lambda config, zoo: ["erm", "erm+kd"])
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

    from flatfsc_jax import experiment, pa

    c = glyphs_config.get_config("tiny")
    c.data_dir = str(tmp_path / "data")
    ev = c.evaluation
    ev.domains = ("cjk", "latin", "digits")
    ev.adaptations = ("ncc", "pa")
    ev.pa_steps, ev.pa_episodes = 3, 0
    experiment.check_data(c, ("evaluate",))
    monkeypatch.setattr(protocol, "families", lambda config, zoo: ["erm", "erm+ft"])
    seen_pairs = []
    real_pa = pa.episode_accuracies

    def recording_pa(embeddings, episodes, *, lr, steps):
        backbone = hashlib.sha1(np.asarray(embeddings).tobytes()).hexdigest()
        for row in range(len(episodes.ways)):
            task = episodes.support_idx[row][episodes.support_mask[row]].tobytes()
            seen_pairs.append((backbone, task))
        return real_pa(embeddings, episodes, lr=lr, steps=steps)

    monkeypatch.setattr(pa, "episode_accuracies", recording_pa)
    results = protocol.evaluate_zoo(c, _FakeZoo(), progress=False)

    assert len(seen_pairs) == len(set(seen_pairs))  # nothing adapted twice
    cjk = results["domains"]["cjk"]["families"]
    assert cjk["erm+ft"] == cjk["erm"]  # the same backbone, the same numbers
    # cjk's episodes were adapted for one family only; latin's for both (two backbones).
    assert len(seen_pairs) < 2 * len(results["domains"]) * ev.episodes
    for dom in results["domains"].values():
        for accs in dom["families"].values():
            assert len(accs["pa"]) == ev.episodes and not np.isnan(accs["pa"]).any()
