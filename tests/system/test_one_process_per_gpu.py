"""One process per GPU (docs/scale.md#one-process-per-gpu): two processes, each on its own
device (as CUDA_VISIBLE_DEVICES=k pins one GPU) with ``--entries=k/2``, fill one zoo
concurrently; one evaluation run on 8 devices (embedding and episodes sharded over them)
then equals a one-process, one-device run of the same config."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _main(*args, devices=1):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return subprocess.Popen(
        [sys.executable, "-m", "flatfsc_jax.main", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait(proc):
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-5000:]
    return out


@pytest.mark.slow
def test_processes_with_shares_of_the_entries_fill_one_zoo(tmp_path):
    common = [
        f"--config={ROOT}/configs/glyphs.py:tiny",
        f"--config.data_dir={tmp_path / 'data'}",
        "--config.fusion.enabled=False",
        "--config.evaluation.adaptations=('ncc',)",
        "--config.evaluation.domains=('cjk','latin')",
        "--config.methods=('erm',)",
        f"--compilation_cache={os.environ['JAX_COMPILATION_CACHE_DIR']}",
    ]
    # Reference (also prepares the shared data directory): one process, one device.
    ref = tmp_path / "ref"
    _wait(_main(*common, f"--workdir={ref}", "--stages=train,evaluate"))
    # Two processes, one per "GPU", disjoint shares, concurrently.
    work = tmp_path / "work"
    shares = [
        _main(*common, f"--workdir={work}", "--stages=train", f"--entries={k}/2") for k in range(2)
    ]
    outs = [_wait(p) for p in shares]
    trained = [
        {line.split()[1][:-1] for line in o.splitlines() if "best validation" in line} for o in outs
    ]
    assert trained[0] and trained[1] and not trained[0] & trained[1]
    assert trained[0] | trained[1] == {f"glyphs/{d}/erm" for d in ("cjk", "latin")}
    _wait(_main(*common, f"--workdir={work}", "--stages=evaluate", devices=8))

    got = json.loads((work / "report" / "results.json").read_text())
    want = json.loads((ref / "report" / "results.json").read_text())
    for domain, dom in want["domains"].items():
        for fam, accs in dom["families"].items():
            np.testing.assert_allclose(
                got["domains"][domain]["families"][fam]["ncc"], accs["ncc"], atol=1e-6
            )
