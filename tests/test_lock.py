"""One writer per workdir (docs/zoo.md#reliability): a second run fails at once naming the
first one's pid; the dry run and a finished run leave the workdir free."""

import os
import subprocess
import sys
import textwrap

import pytest

from configs import glyphs as glyphs_config
from flatfsc_jax import errors, experiment, lock, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOLD = textwrap.dedent(
    """
    import sys, time
    from flatfsc_jax import lock
    with lock.workdir_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(60)
    """
)


@pytest.fixture
def held(tmp_path):
    """A workdir whose lock another process holds; yields (workdir, that pid)."""
    work = tmp_path / "work"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(work)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    yield work, proc.pid
    proc.kill()
    proc.wait()


def test_second_run_fails_at_once_naming_the_pid(held):
    work, pid = held
    with pytest.raises(errors.WorkdirLockedError, match=rf"another run \(pid {pid}\) uses"):
        experiment.run(glyphs_config.get_config("tiny"), str(work), progress=False)
    assert issubclass(errors.WorkdirLockedError, main.expected_errors())
    # Nothing was started: no zoo, no report.
    assert sorted(os.listdir(work)) == [".lock"]


def test_report_command_takes_the_lock(held):
    work, pid = held
    (work / "report").mkdir()
    (work / "report" / "results.json").write_text(
        '{"domains": {}, "families": ["erm"], "adaptations": ["ncc"]}'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "flatfsc_jax.cli.report", f"--workdir={work}"],
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert f"another run (pid {pid}) uses this workdir" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_lock_is_free_after_the_holder_and_records_the_pid(tmp_path):
    with lock.workdir_lock(str(tmp_path)):
        assert (tmp_path / ".lock").read_text().strip() == f"pid {os.getpid()}"
        with pytest.raises(errors.WorkdirLockedError):  # a second holder, even here
            with lock.workdir_lock(str(tmp_path)):
                pass
    with lock.workdir_lock(str(tmp_path)):  # released: taken again
        pass


def test_shares_of_one_zoo_hold_the_lock_together_but_never_with_a_whole_run(tmp_path):
    work = str(tmp_path)
    with lock.workdir_lock(work, shared=True), lock.workdir_lock(work, shared=True):
        with pytest.raises(errors.WorkdirLockedError, match="one of the --entries shares"):
            with lock.workdir_lock(work):
                pass
    with lock.workdir_lock(work):
        with pytest.raises(errors.WorkdirLockedError, match=rf"pid {os.getpid()}\)"):
            with lock.workdir_lock(work, shared=True):
                pass


def test_no_lock_on_cloud_storage():
    with lock.workdir_lock("gs://bucket/run"):  # no flock there: nothing is created
        pass


def test_dry_run_does_not_take_the_lock(held):
    work, _ = held
    main.dry_run(glyphs_config.get_config("tiny"), str(work), ("train",))
