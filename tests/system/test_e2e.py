"""End to end through the command line, on the tiny Glyphs config (flax imagenet style).

One run trains the zoo, fuses, evaluates and reports; a second run reuses every zoo
entry; the Meta-Dataset config fails fast without data.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _main(*args, timeout=900, cwd=ROOT):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "flatfsc_jax.main", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_tiny_glyphs_run_end_to_end_and_rerun_reuses_the_zoo(tmp_path):
    work = tmp_path / "work"
    # The suite's shared cache (conftest.py), through main's flag: the notebooks' tiny run
    # compiles the same programs.
    cache = f"--compilation_cache={os.environ['JAX_COMPILATION_CACHE_DIR']}"
    # A relative --workdir (like the default "work"), resolved against the current directory.
    first = _main(f"--config={ROOT}/configs/glyphs.py:tiny", "--workdir=work", cache, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-5000:]
    out = first.stdout
    for key in ("glyphs/cjk/erm", "glyphs/latin/sam", "glyphs/latin/sam+ft"):
        assert f"{key}: best validation accuracy" in out
    assert "Adaptation: **ncc**" in out and "Adaptation: **finetune**" in out
    assert "| **average unseen** |" in out and "sam - erm" in out
    report = work / "report"
    for name in ("results.json", "report.md", "report.csv", "headline.png"):
        assert (report / name).stat().st_size > 0
    results = json.loads((report / "results.json").read_text())
    digits = results["domains"]["digits"]
    assert not digits["seen"] and set(digits["families"]) == {"erm", "sam", "erm+ft", "sam+ft"}
    n = results["episodes"]
    assert all(len(a["ncc"]) == n for a in digits["families"].values())
    assert sum(digits["selection"]["sam"].values()) == n  # PARC chose a backbone per task
    assert (
        "glyphs/latin/sam"
        in subprocess.run(
            [sys.executable, "-m", "flatfsc_jax.cli.zoo", f"--zoo={work / 'zoo'}"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        ).stdout
    )

    zoo_before = _zoo_files(work / "zoo")
    second = _main(
        "--config=configs/glyphs.py:tiny", f"--workdir={work}", cache, "--stages=train,fuse"
    )
    assert second.returncode == 0, second.stderr[-5000:]
    assert second.stdout.count("complete, reusing it") == 4  # 2 domains x erm/sam
    assert "[fuse] glyphs/latin/sam+ft: best validation accuracy" in second.stdout
    # Nothing was trained again: no zoo file was added, removed or rewritten.
    assert _zoo_files(work / "zoo") == zoo_before


def _zoo_files(zoo):
    """Every file of a zoo directory with its size and modification time."""
    return {
        str(p.relative_to(zoo)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(zoo.rglob("*"))
        if p.is_file()
    }


def test_meta_dataset_config_fails_fast_listing_missing_sources(tmp_path):
    proc = _main(
        "--config=configs/sam_resnet18.py",
        f"--workdir={tmp_path}",
        f"--config.data_dir={tmp_path / 'empty'}",
        "--compilation_cache=",
        timeout=120,
    )
    assert proc.returncode != 0
    err = proc.stderr
    for source in ("ilsvrc_2012", "omniglot", "traffic_sign", "mscoco", "cifar100"):
        assert source in err
    assert "python -m flatfsc_jax.cli.prepare" in err
