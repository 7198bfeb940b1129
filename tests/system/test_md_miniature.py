"""Meta-Dataset as its users hold it, end to end on a miniature in MD's records format.

The miniature (``meta_dataset.miniature``) has all 13 sources in MD's layout
(``<source>/{dataset_spec.json, <class_id>.tfrecords}``), Omniglot's two-level spec and
ImageNet's hierarchical spec with a small DAG. The test runs the documented commands
unchanged: ``cli.prepare --from_records``, then ``main`` with
``configs/sam_resnet18.py:miniature`` (two training domains, NCC on all 13 test domains,
the report). The test episodes the run evaluated are re-drawn from their seed and must
obey MD's rules: Omniglot one alphabet per episode; ImageNet the leaves below one node
spanning 5..392 leaves, at most 50 ways.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from flatfsc_jax import config_lib
from flatfsc_jax.data import benchmarks, episodes
from flatfsc_jax.data.meta_dataset import ALL_SOURCES, miniature
from flatfsc_jax.evaluation import protocol

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*args, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_miniature_meta_dataset_from_records_to_report(tmp_path):
    mini = miniature.write_miniature(str(tmp_path / "records"))
    data_dir = str(tmp_path / "data")
    prepared = _run(
        "flatfsc_jax.cli.prepare",
        f"--from_records={mini.root}",
        "--sources=all",
        f"--data_dir={data_dir}",
        "--workers=1",
    )
    for source in ALL_SOURCES:
        assert source in prepared

    cache = f"--compilation_cache={os.environ['JAX_COMPILATION_CACHE_DIR']}"
    out = _run(
        "flatfsc_jax.main",
        f"--config={ROOT}/configs/sam_resnet18.py:miniature",
        f"--config.data_dir={data_dir}",
        f"--workdir={tmp_path / 'work'}",
        cache,
    )
    for key in ("meta_dataset/omniglot/sam", "meta_dataset/dtd/sam"):
        assert f"{key}: best validation accuracy" in out

    report = tmp_path / "work" / "report"
    results = json.loads((report / "results.json").read_text())
    assert set(results["domains"]) == set(ALL_SOURCES)
    table = (report / "report.md").read_text()
    for source in ALL_SOURCES:  # the two trained domains are seen, the others unseen
        seen = source in ("omniglot", "dtd")
        assert f"| {source}{'' if seen else ' (unseen)'} |" in table, source
    assert "Data provenance" in table and "records (" in table

    # The episodes the run evaluated, re-drawn from the protocol's seed (their ways must
    # match the recorded ones), obey MD's rules.
    config = config_lib.sibling_module(
        os.path.join(ROOT, "configs", "x.py"), "sam_resnet18"
    ).get_config("miniature")
    seed = protocol.evaluation_seed(config) + 1000
    n = results["episodes"]

    def evaluated(domain):
        """The run's episodes, then 40 more from the same code path (every alphabet and
        eligible node gets drawn; six episodes alone could miss one)."""
        split = benchmarks.load_split(
            "meta_dataset", domain, "test", data_dir, class_splits="prepared"
        )
        batch = episodes.EpisodeBatch.sample(split, n, seed=seed)
        assert batch.ways.tolist() == results["domains"][domain]["ways"], domain
        more = episodes.EpisodeBatch.sample(split, 40, seed=seed + 1)
        rows = np.concatenate([np.asarray(batch.classes), np.asarray(more.classes)])
        return split, [row[row >= 0].tolist() for row in rows]

    omniglot, drawn = evaluated("omniglot")
    groups = np.asarray(omniglot.class_groups)
    assert len(set(groups.tolist())) == 2  # two alphabets to choose from
    alphabets = [{int(groups[c]) for c in classes} for classes in drawn]
    assert all(len(a) == 1 for a in alphabets) and len(set().union(*alphabets)) == 2

    imagenet, drawn = evaluated("ilsvrc_2012")
    hierarchy = {k: set(np.asarray(v).tolist()) for k, v in imagenet.class_hierarchy.items()}
    eligible = [leaves for leaves in hierarchy.values() if 5 <= len(leaves) <= 392]
    assert eligible and any(len(leaves) < 5 for leaves in hierarchy.values())
    for classes in drawn:  # all leaves below the node (it spans <= 50)
        assert len(classes) <= 50 and set(classes) in eligible, classes
    assert {frozenset(c) for c in drawn} == {frozenset(leaves) for leaves in eligible}
