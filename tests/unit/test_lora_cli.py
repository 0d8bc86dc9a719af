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


# --------------------------------------------------------------------------- transformers (issue 18)
# Real widths, a few modules each (ΔW compared module by module in float64, computed here from the
# files' own tensors; the way back from kohya to diffusers names is diffusers' own converter).

FLUX_PEFT = {f"transformer_blocks.0.attn.{m}": (3072, 3072) for m in ("to_q", "to_k", "to_v", "add_q_proj")}
FLUX_PEFT["single_transformer_blocks.0.attn.to_k"] = (3072, 3072)
WAN_PEFT = {f"blocks.0.{a}.{m}": (1536, 1536) for a in ("attn1", "attn2") for m in ("to_q", "to_k", "to_v", "to_out.0")}
WAN_PEFT.update({"blocks.0.ffn.net.0.proj": (8960, 1536), "blocks.0.ffn.net.2": (1536, 8960)})


def _peft_file(path, shapes, seed):
    from lora_fixtures import make_factors, write_dit_layout

    factors = make_factors(shapes, rank=2, seed=seed, std=0.05)
    save_file(write_dit_layout(factors, "peft-transformer"), str(path))
    return {f.name: f for f in factors}


def _delta(up, down, alpha=None) -> torch.Tensor:
    up, down = up.double(), down.double()
    return up @ down * (1.0 if alpha is None else float(alpha) / down.shape[0])


def _close(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    """ΔW equal up to the float32 rounding of the factors: max |got − want| ≤ 1e-6 · max |want|."""
    assert got.shape == want.shape, what
    err, scale = float((got - want).abs().max()), float(want.abs().max())
    assert scale > 0 and err <= 1e-6 * scale, f"{what}: ΔW differs by {err:.3g} (max |ΔW| {scale:.3g})"


def _same_peft_deltas(converted: dict, factors: dict) -> None:
    """diffusers-named lora_A/lora_B (alpha folded, as diffusers' converters write them) against the
    source factors: every source module equal in float64 (rtol 1e-6), every other module zero."""
    seen = set()
    for k in converted:
        if not k.endswith(".lora_A.weight"):
            continue
        mod = k.removeprefix("transformer.")[:-len(".lora_A.weight")]
        up = converted[k.replace(".lora_A.", ".lora_B.")]
        if mod not in factors:
            assert not up.any(), mod            # a piece the file does not patch: zero rows
            continue
        want = _delta(factors[mod].up, factors[mod].down)
        _close(_delta(up, converted[k]), want, mod)
        seen.add(mod)
    assert seen == set(factors)


def test_base_accepts_every_architecture_the_core_knows(capsys):
    from safet2i.cli import build_parser
    from safet2i.lora import manifest
    from safet2i.lora.arch import titles

    assert tuple(titles()) == manifest.ARCHS
    for cmd in (["lora", "inspect", "f"], ["lora", "convert", "f", "--to", "kohya"]):
        for arch in titles():
            assert build_parser().parse_args([*cmd, "--base", arch]).base == arch
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args([*cmd, "--base", "flux"])
        assert exc.value.code == 64 and "wan2.2-5b" in capsys.readouterr().err
        with pytest.raises(SystemExit):
            build_parser().parse_args([*cmd, "--help"])
        help_text = " ".join(capsys.readouterr().out.split())
        assert "one of: " + ", ".join(titles()) in help_text.replace("One of", "one of")


def test_flux_peft_file_inspect_and_kohya_round_trip(tmp_path, capsys):
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    factors = _peft_file(tmp_path / "flux.safetensors", FLUX_PEFT, seed=1)
    info = inspect(capsys, tmp_path / "flux.safetensors", "--base", "flux-schnell")
    assert info["families"] == ["Flux.1"] and info["architectures"] == ["flux-dev", "flux-schnell"]
    assert info["fit"]["flux-dev"] == "5/5" and info["coverage"]["matched"] == 5 and info["load_check"] == "ok"
    assert "transformer (diffusers) names" in info["formats"]
    for base, why in (("sd3-medium", "module names"), ("wan-14b", "module names"), ("sdxl", "module names")):
        assert inspect(capsys, tmp_path / "flux.safetensors", "--base", base)["load_check"].startswith("REFUSED"), base
        assert why in inspect(capsys, tmp_path / "flux.safetensors", "--base", base)["load_check"]
    assert main(["lora", "inspect", str(tmp_path / "flux.safetensors")]) == 0
    assert "Flux.1" in capsys.readouterr().out

    out = tmp_path / "flux.kohya.safetensors"
    assert main(["lora", "convert", str(tmp_path / "flux.safetensors"), "--to", "kohya", "--base", "flux-dev"]) == 0
    assert "5 target weights" in capsys.readouterr().out
    kohya = load_file(str(out))
    stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in kohya}
    assert stems == {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_txt_attn_qkv",
                     "lora_unet_single_blocks_0_linear1"}
    # BFL's stacking, written out here: img qkv = [q; k; v], txt qkv = [add_q; add_k; add_v],
    # linear1 = [q; k; v; mlp]; rows of pieces the file does not patch are zero
    h = 3072
    rows = {"lora_unet_double_blocks_0_img_attn_qkv": ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                                                       "transformer_blocks.0.attn.to_v"],
            "lora_unet_double_blocks_0_txt_attn_qkv": ["transformer_blocks.0.attn.add_q_proj", None, None],
            "lora_unet_single_blocks_0_linear1": [None, "single_transformer_blocks.0.attn.to_k", None, None]}
    for stem, pieces in rows.items():
        up, down, alpha = kohya[stem + ".lora_up.weight"], kohya[stem + ".lora_down.weight"], kohya[stem + ".alpha"]
        assert up.shape[0] == h * (3 if len(pieces) == 3 else 7)
        for i, mod in enumerate(pieces):
            part = up[i * h:(i + 1) * h]
            if mod is None:
                assert not part.any()
                continue
            want = _delta(factors[mod].up, factors[mod].down)
            _close(_delta(part, down, alpha), want, mod)
        assert not up[3 * h:].any()                                            # linear1's mlp rows
    # and back: diffusers' own kohya Flux converter gives the source's ΔW per module
    _same_peft_deltas(_convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in kohya.items()}), factors)
    # kohya -> kohya again (split into pieces, fused back): the same tensors
    assert main(["lora", "convert", str(out), "--to", "kohya", "--out", str(tmp_path / "again.safetensors")]) == 0
    again = load_file(str(tmp_path / "again.safetensors"))
    assert again.keys() == kohya.keys() and all(torch.equal(again[k], kohya[k]) for k in kohya)


def test_wan_peft_file_inspect_and_kohya_round_trip(tmp_path, capsys):
    from diffusers.loaders.lora_conversion_utils import _convert_musubi_wan_lora_to_diffusers

    factors = _peft_file(tmp_path / "wan.safetensors", WAN_PEFT, seed=2)
    info = inspect(capsys, tmp_path / "wan.safetensors", "--base", "wan2.1-1.3b")
    assert info["families"] == ["Wan 2.1 / 2.2"] and info["architectures"] == ["wan2.1-1.3b"]
    assert info["coverage"]["matched"] == 10 and info["load_check"] == "ok" and info["fit"]["wan-14b"] == "0/10"
    other = inspect(capsys, tmp_path / "wan.safetensors", "--base", "wan-14b")
    assert other["coverage"]["matched"] == 0 and "made for Wan 2.1 T2V 1.3B" in other["load_check"]
    assert "module names" in inspect(capsys, tmp_path / "wan.safetensors", "--base", "qwen-image")["load_check"]

    # no --base: the one family every fitting architecture belongs to names the output
    assert main(["lora", "convert", str(tmp_path / "wan.safetensors"), "--to", "kohya"]) == 0
    assert "10 target weights" in capsys.readouterr().out
    kohya = load_file(str(tmp_path / "wan.kohya.safetensors"))
    native = {"attn1": "self_attn", "attn2": "cross_attn", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o",
              "ffn.net.0.proj": "ffn_0", "ffn.net.2": "ffn_2"}
    for mod, f in factors.items():
        rest = mod.removeprefix("blocks.0.")
        stem = "lora_unet_blocks_0_" + ("_".join(native[p] for p in rest.split(".", 1)) if "attn" in rest else
                                        native[rest])
        got = _delta(kohya[stem + ".lora_up.weight"], kohya[stem + ".lora_down.weight"], kohya[stem + ".alpha"])
        want = _delta(f.up, f.down)
        _close(got, want, mod)
    assert len(kohya) == 3 * len(factors)
    _same_peft_deltas(_convert_musubi_wan_lora_to_diffusers({k: v.clone() for k, v in kohya.items()}), factors)
