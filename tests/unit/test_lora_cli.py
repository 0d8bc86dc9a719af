"""``safet2i lora inspect|convert`` and ``safet2i convert`` on synthetic files with real layouts."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from safet2i.cli import main
from safet2i.lora.arch import inventory


def duo_sd1(path, rank=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in inventory("sd1")["unet"].items():
        if ".attn1." in name:
            sd[f"unet.{name}.lora.down.weight"] = torch.randn(rank, m.shape[1], generator=g)
            sd[f"unet.{name}.lora.up.weight"] = torch.randn(m.shape[0], rank, generator=g)
    save_file(sd, str(path))
    return sd


def inspect(capsys, *argv) -> dict:
    assert main(["lora", "inspect", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_duo_release_layout(tmp_path, capsys):
    duo_sd1(tmp_path / "duo_nudity_beta500.safetensors")
    info = inspect(capsys, tmp_path / "duo_nudity_beta500.safetensors", "--base", "sdxl")
    assert info["formats"] == ["diffusers"] and info["architectures"] == ["sd1", "sd2"]
    assert info["targets"] == 64 and info["ranks"] == [32] and info["scales"] == [1.0]
    assert info["manifest"] == "duo-nudity-b500" and info["manifest_check"] == "unverified"
    assert info["fit"]["sd1"] == "64/64" and info["coverage"]["matched"] == 20   # only SDXL's 1280/640 shapes coincide
    reasons = {u["reason"] for u in info["coverage"]["unmatched"]}
    assert "no such weight in the model" in reasons and any(r.startswith("shape") for r in reasons)
    assert main(["lora", "inspect", str(tmp_path / "duo_nudity_beta500.safetensors")]) == 0
    assert "duo-nudity-b500" in capsys.readouterr().out


def test_known_name_with_other_contents_is_refused(tmp_path, capsys):
    duo_sd1(tmp_path / "duo_nudity_beta500.safetensors", rank=4)
    assert main(["lora", "inspect", str(tmp_path / "duo_nudity_beta500.safetensors")]) == 4
    assert "rank [4] instead of 32" in capsys.readouterr().err


def test_convert_to_kohya_round_trips(tmp_path, capsys):
    sd = duo_sd1(tmp_path / "a.safetensors", rank=4)
    assert main(["lora", "convert", str(tmp_path / "a.safetensors"), "--to", "kohya"]) == 0
    assert "64 target weights" in capsys.readouterr().out
    out = load_file(str(tmp_path / "a.kohya.safetensors"))
    assert len(out) == 64 * 3 and all(k.startswith("lora_unet_") for k in out)
    k = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0"
    assert torch.equal(out[k + ".lora_down.weight"], sd["unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0.lora.down.weight"])
    assert float(out[k + ".alpha"]) == 4.0                                  # alpha = rank: scale stays 1
    info = inspect(capsys, tmp_path / "a.kohya.safetensors")
    assert info["formats"] == ["kohya"] and info["scales"] == [1.0] and info["architectures"] == ["sd1", "sd2"]
    before = (tmp_path / "a.kohya.safetensors").read_bytes()
    assert main(["lora", "convert", str(tmp_path / "a.safetensors"), "--to", "kohya"]) == 4
    assert "exists" in capsys.readouterr().err and (tmp_path / "a.kohya.safetensors").read_bytes() == before


def test_convert_pickle_and_refuse_pickles(tmp_path, capsys):
    torch.save({"state_dict": {"w": torch.arange(6.0).reshape(2, 3)}, "global_step": 5}, tmp_path / "m.ckpt")
    assert main(["lora", "inspect", str(tmp_path / "m.ckpt")]) == 4
    assert "safet2i convert" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "m.ckpt")]) == 0
    assert torch.equal(load_file(str(tmp_path / "m.safetensors"))["w"], torch.arange(6.0).reshape(2, 3))
    assert main(["convert", str(tmp_path / "m.ckpt")]) == 4                 # never overwrites


class Payload:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_convert_refuses_code_in_pickles(tmp_path, capsys):
    torch.save({"w": torch.ones(2), "x": Payload()}, tmp_path / "evil.pt")
    assert main(["convert", str(tmp_path / "evil.pt")]) == 4
    captured = capsys.readouterr()
    assert "weights_only" in captured.err and "pickle code ran" not in captured.out
    assert not (tmp_path / "evil.safetensors").exists()


@pytest.mark.parametrize("base", ["sd1", "sd2", "sdxl"])
def test_every_architecture_recognises_its_own_cross_attention(tmp_path, capsys, base):
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, m in inventory(base)["unet"].items():
        if ".attn2.to_k" in name:
            sd[f"lora_unet_{name.replace('.', '_')}.lora_down.weight"] = torch.randn(2, m.shape[1], generator=g)
            sd[f"lora_unet_{name.replace('.', '_')}.lora_up.weight"] = torch.randn(m.shape[0], 2, generator=g)
    save_file(sd, str(tmp_path / "x.safetensors"))
    assert inspect(capsys, tmp_path / "x.safetensors")["architectures"] == [base]
