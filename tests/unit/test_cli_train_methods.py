"""``safet2i train duo|sc-dpo|dag-tokens`` through the main command line on the micro lab model
(plumbing: files written, loadable with full coverage, errors are exit 4 with a message)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from safet2i.cli import main


def _pairs_folder(root, world, n=3):
    for sub in ("unsafe", "safe"):
        (root / sub).mkdir(parents=True)
    for i in range(n):
        Image.fromarray(world.sample(i, "direct").image).save(root / "unsafe" / f"{i}.png")
        Image.fromarray(world.sample(i, "benign").image).save(root / "safe" / f"{i}.png")


def test_train_duo_from_a_pairs_folder(micro_lab, tmp_path, capsys):
    from safet2i.diffusers_adapter import load_safety_lora
    from safet2i.lab import World
    from safet2i.lab.model import load_pipeline

    cfg, folder, _judge, _ = micro_lab
    _pairs_folder(tmp_path / "pairs", World(cfg.world))
    out = tmp_path / "duo.safetensors"
    argv = ["train", "duo", "--model", str(folder), "--out", str(out), "--pairs", str(tmp_path / "pairs"),
            "--steps", "3", "--rank", "2", "--lr", "1e-3", "--prior-weight", "1", "--device", "cpu", "-q",
            "--format", "kohya", "--format", "peft"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "no models/safety_models.toml entry" in text and "unknown" in text   # the lab is not SD1/SD2/SDXL
    log = json.loads(out.with_suffix(".log.json").read_text())
    assert len(log["steps"]) == 3 and log["pairs"] == 3
    pipe = load_pipeline(folder)
    for f in (out, tmp_path / "duo.peft.safetensors"):
        h = load_safety_lora(pipe, f)
        assert not h.coverage.unmatched and h.coverage.applied
        h.undo()
    assert main(argv) == 4                                    # never overwrites
    assert "exists" in capsys.readouterr().err


def test_train_duo_refuses_unpaired_folders(micro_lab, tmp_path, capsys):
    from safet2i.lab import World

    cfg, folder, _judge, _ = micro_lab
    _pairs_folder(tmp_path / "pairs", World(cfg.world))
    (tmp_path / "pairs" / "safe" / "0.png").rename(tmp_path / "pairs" / "safe" / "zz.png")
    rc = main(["train", "duo", "--model", str(folder), "--out", str(tmp_path / "d.safetensors"), "--pairs",
               str(tmp_path / "pairs"), "--steps", "1", "-q"])
    assert rc == 4 and "unpaired" in capsys.readouterr().err
    rc = main(["train", "duo", "--model", str(folder), "--out", str(tmp_path / "d.safetensors"),
               "--unsafe-prompt", "a red square", "-q"])
    assert rc == 4 and "--safe-prompt" in capsys.readouterr().err


def test_train_duo_keeps_an_earlier_runs_saved_pairs(micro_lab, tmp_path, capsys):
    _cfg, folder, _judge, _ = micro_lab
    (tmp_path / "pairs" / "unsafe").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "pairs" / "unsafe" / "00000.png")
    before = (tmp_path / "pairs" / "unsafe" / "00000.png").read_bytes()
    rc = main(["train", "duo", "--model", str(folder), "--out", str(tmp_path / "d.safetensors"),
               "--unsafe-prompt", "a red square", "--safe-prompt", "a blue square", "--save-pairs",
               str(tmp_path / "pairs"), "--steps", "1", "-q"])
    err = capsys.readouterr().err
    assert rc == 4 and "--save-pairs" in err and "already holds 1 pair images" in err and "--overwrite" in err
    assert (tmp_path / "pairs" / "unsafe" / "00000.png").read_bytes() == before
    assert not (tmp_path / "d.safetensors").exists() and not (tmp_path / "d.safetensors.partial").exists()


def test_train_dag_tokens_on_the_lab(micro_lab, tmp_path, capsys):
    from safet2i.train.dag_tokens import load_dag_tokens

    _cfg, folder, _judge, _ = micro_lab
    out = tmp_path / "tokens.safetensors"
    rc = main(["train", "dag-tokens", "--model", str(folder), "--out", str(out), "--lab", "--lab-unsafe", "2",
               "--lab-safe", "1", "--steps", "3", "--evaluate", "--device", "cpu", "-q"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "optimised" in text and "raw concept tokens" in text
    tokens = load_dag_tokens(out)
    assert tokens.positions and np.isfinite(tokens.context.numpy()).all()


@pytest.fixture(scope="module")
def lab_cost(micro_lab, tmp_path_factory):
    """A small learned cost model of the micro lab's world (its sidecar)."""
    from safet2i.train.cost_model import TrainConfig, train_cost_model
    from safet2i.train.data import from_world

    cfg = micro_lab[0]
    tr = from_world(16, split="train", size=cfg.world.size, concept="red", seed=0)
    held = from_world(4, split="heldout", size=cfg.world.size, concept="red", seed=0)
    model = train_cost_model(tr, held, TrainConfig(epochs=1, size=cfg.world.size, progress=False))
    return model.export(tmp_path_factory.mktemp("cost") / "c.onnx")


def test_train_sc_dpo_with_the_lab_reward(micro_lab, lab_cost, tmp_path, capsys):
    from safet2i.lab import World

    cfg, folder, _judge, judge_file = micro_lab
    world = World(cfg.world)
    (tmp_path / "harmful.txt").write_text("# concept prompts\n" + "\n".join(world.sample(i, "direct").caption
                                                                          for i in range(2)) + "\n")
    (tmp_path / "clean.txt").write_text(world.sample(0, "benign").caption + "\n")
    out = tmp_path / "sc.safetensors"
    rc = main(["train", "sc-dpo", "--model", str(folder), "--out", str(out), "--harmful-prompts",
               str(tmp_path / "harmful.txt"), "--clean-prompts", str(tmp_path / "clean.txt"), "--cost-model",
               str(lab_cost), "--reward", "lab", "--lab-judge", str(judge_file), "--rounds", "1", "--steps", "2",
               "--candidates", "2", "--batch-size", "2", "--sample-steps", "2", "--rank", "2",
               "--lam-mode", "lagrange", "--device", "cpu", "-q"])
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "SC-DPO: 1 rounds x 2 steps" in text and "lambda" in text
    log = json.loads(out.with_suffix(".log.json").read_text())
    assert len(log["steps"]) == 2 and log["rounds"][0]["harmful_pairs"] <= 2
    rc = main(["train", "sc-dpo", "--model", str(folder), "--out", str(tmp_path / "x.safetensors"),
               "--harmful-prompts", str(tmp_path / "harmful.txt"), "--cost-model", str(lab_cost),
               "--reward", "other", "-q"])
    assert rc == 4 and "--reward" in capsys.readouterr().err


def test_train_shielddiff_on_the_lab(micro_lab, lab_cost, tmp_path, capsys):
    from safet2i.diffusers_adapter import load_safety_lora
    from safet2i.lab.model import load_pipeline

    _cfg, folder, _judge, judge_file = micro_lab
    out = tmp_path / "shield.safetensors"
    rc = main(["train", "shielddiff", "--model", str(folder), "--out", str(out), "--lab-prompts", "1",
               "--cost-model", str(lab_cost), "--reward", "lab", "--lab-judge", str(judge_file), "--epochs", "1",
               "-k", "2", "--steps", "2", "--rank", "2", "--device", "cpu", "-q"])
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "mean rewards before" in text and "no models/safety_models.toml entry" in text
    h = load_safety_lora(load_pipeline(folder), out)
    assert not h.coverage.unmatched and h.coverage.applied
