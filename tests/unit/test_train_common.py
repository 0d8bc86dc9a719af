"""safet2i.train.common: checkpoints survive an interruption at any point of a save."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from safet2i.train import common  # noqa: E402
from safet2i.train.common import TrainError  # noqa: E402


def test_checkpoint_save_is_whole_at_every_point(tmp_path, monkeypatch):
    ck = common.Checkpoint(tmp_path / "run.partial", "h1")
    assert ck.load() is None
    ck.save({"w": torch.ones(3)}, {"step": 1})
    ck.save({"w": torch.full((3,), 2.0)}, {"step": 2})
    files = sorted(p.name for p in (tmp_path / "run.partial").iterdir())
    assert files == ["checkpoint-000002.safetensors", "checkpoint.json"]    # the older tensors are gone
    tensors, state = ck.load()
    assert state["step"] == 2 and torch.equal(tensors["w"], torch.full((3,), 2.0))

    # interrupted after the new tensors were written, before the JSON that names them
    from safet2i import fileio

    real_write = fileio.atomic_write

    def boom(target, write):
        if str(target).endswith("checkpoint.json"):
            raise KeyboardInterrupt
        real_write(target, write)

    monkeypatch.setattr(fileio, "atomic_write", boom)
    with pytest.raises(KeyboardInterrupt):
        ck.save({"w": torch.full((3,), 3.0)}, {"step": 3})
    monkeypatch.undo()
    assert (tmp_path / "run.partial" / "checkpoint-000003.safetensors").is_file()   # written, not yet named
    tensors, state = ck.load()                                            # the last whole checkpoint
    assert state["step"] == 2 and torch.equal(tensors["w"], torch.full((3,), 2.0))
    ck.save({"w": torch.full((3,), 4.0)}, {"step": 4})                      # and the stray file is cleaned up
    assert sorted(p.name for p in (tmp_path / "run.partial").iterdir()) == [
        "checkpoint-000003.safetensors", "checkpoint.json"]
    assert common.Checkpoint(tmp_path / "run.partial", "h1").load()[1]["step"] == 4
    with pytest.raises(common.TrainError, match="another run"):
        common.Checkpoint(tmp_path / "run.partial", "h2").load()
    (tmp_path / "run.partial" / "checkpoint-000003.safetensors").write_bytes(b"changed")
    with pytest.raises(common.TrainError, match="does not match"):
        ck.load()
    ck.remove()
    assert not (tmp_path / "run.partial").exists()


def test_output_paths_refuse_an_earlier_runs_outputs_and_log_but_not_an_unfinished_log(tmp_path):
    from safet2i.train.common import output_paths

    out = tmp_path / "s.safetensors"
    paths = output_paths(out, ["kohya", "peft"], overwrite=False)
    assert paths == {"kohya": out, "peft": tmp_path / "s.peft.safetensors"}
    log = tmp_path / "s.log.json"
    log.write_text(json.dumps({"finished": True, "steps": []}))
    with pytest.raises(TrainError, match=r"s\.log\.json \(the loss log of an earlier run\) exists"):
        output_paths(out, ["kohya"], overwrite=False)
    assert output_paths(out, ["kohya"], overwrite=True) == {"kohya": out}
    log.write_text("not json")                          # unreadable: somebody's file, kept
    with pytest.raises(TrainError, match="loss log"):
        output_paths(out, ["kohya"], overwrite=False)
    log.write_text(json.dumps({"finished": False, "steps": []}))   # an interrupted run's: it resumes
    assert output_paths(out, ["kohya"], overwrite=False) == {"kohya": out}
    other = tmp_path / "elsewhere.json"
    other.write_text("{}")
    with pytest.raises(TrainError, match="elsewhere"):
        output_paths(out, ["kohya"], overwrite=False, log_path=other)
    (tmp_path / "s.peft.safetensors").write_bytes(b"x")
    with pytest.raises(TrainError, match=r"s\.peft\.safetensors exists"):
        output_paths(out, ["kohya", "peft"], overwrite=False, log_path=tmp_path / "new.json")
