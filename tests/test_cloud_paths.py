"""gs:// workdirs, zoos and data dirs stay URLs: never a local "gs:" folder."""

from configs import glyphs as glyphs_config
from flatfsc_jax import experiment
from flatfsc_jax import zoo as zoo_lib


def test_gs_paths_are_never_turned_into_local_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert zoo_lib.resolve_path("gs://bucket/x") == "gs://bucket/x"
    assert zoo_lib.resolve_path("work") == str(tmp_path / "work")  # local: absolute

    zoo = zoo_lib.Zoo("gs://bucket/x/zoo")
    assert str(zoo.entry_dir("glyphs", "latin", "sam")) == "gs://bucket/x/zoo/glyphs/latin/sam"

    c = glyphs_config.get_config("tiny")
    c.data_dir = "gs://bucket/data"
    assert experiment.resolve_paths(c, "gs://bucket/x").data_dir == "gs://bucket/data"
    c.data_dir = None  # Glyphs' default: <workdir>/data, in the bucket
    assert experiment.resolve_paths(c, "gs://bucket/x").data_dir == "gs://bucket/x/data"

    made = []

    class FakePath:  # the workdir check goes through epath (gcsfs on a real bucket)
        def __init__(self, path):
            self.path = str(path)

        def mkdir(self, parents=False, exist_ok=False):
            made.append(self.path)

    monkeypatch.setattr(experiment.epath, "Path", FakePath)
    experiment.check_workdir("gs://bucket/x")
    assert made == ["gs://bucket/x"]
    assert not (tmp_path / "gs:").exists()
