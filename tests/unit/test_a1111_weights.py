"""Full safety weights in the A1111 extension (``weights.py`` + core ``safet2i.lora.full_weights``)
with tiny real torch modules: a transformers ``CLIPTextModel`` under A1111's hijack layout and an
LDM-named UNet-like module; the diffusers → LDM key map against diffusers' own converter."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "extension"))

from safet2i.lora import full_weights as core  # noqa: E402
from safet2i.lora.arch import UNetConfig  # noqa: E402
from safet2i_a1111 import config as C  # noqa: E402
from safet2i_a1111 import weights as W  # noqa: E402


def tiny_clip(seed: int, hidden: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=99, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1)
    model = CLIPTextModel(cfg).eval()
    if not hasattr(model, "text_model"):     # transformers 5 dropped the wrapper: the 4.x layout the webuis use
        outer = torch.nn.Module()
        outer.text_model = model
        return outer
    return model


class Wrapped(torch.nn.Module):
    """A1111's EmbeddingsWithFixes: the original embedding under ``.wrapped``."""

    def __init__(self, inner):
        super().__init__()
        self.wrapped = inner


def a1111_cond_stage(clip):
    emb = clip.text_model.embeddings
    emb.token_embedding = Wrapped(emb.token_embedding)
    inner = torch.nn.Module()
    inner.transformer = clip
    outer = torch.nn.Module()
    outer.wrapped = inner       # FrozenCLIPEmbedderWithCustomWords.wrapped.transformer
    return outer


class LdmUNet(torch.nn.Module):
    def __init__(self, seed: int, ch: int = 8):
        super().__init__()
        torch.manual_seed(seed)
        self.input_blocks = torch.nn.ModuleList([torch.nn.ModuleList([torch.nn.Conv2d(4, ch, 3)])])
        self.out = torch.nn.ModuleList([torch.nn.GroupNorm(2, ch), torch.nn.SiLU(), torch.nn.Conv2d(ch, 4, 3)])
        with torch.no_grad():
            for prm in self.parameters():
                prm.normal_()


def sd_model(te=None, unet=None):
    return SimpleNamespace(is_sd1=True, is_sd2=False, is_sdxl=False, cond_stage_model=te,
                           model=SimpleNamespace(diffusion_model=unet))


@pytest.fixture
def folder(tmp_path, monkeypatch):
    root = tmp_path / "safety_models"
    root.mkdir()
    monkeypatch.setattr(W, "roots", lambda: {"safety_models": root})
    return root


def save(folder, name, tensors) -> str:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / name))
    return f"safety_models/{name}"


def bits(t):
    return t.detach().contiguous().view(torch.uint8 if t.element_size() == 1 else
                                        {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(bits(a[k]), bits(b[k])), k


# --------------------------------------------------------------------------- text encoder

@pytest.mark.parametrize("host_dtype", [torch.float32, torch.float16])
def test_text_encoder_replaced_bit_for_bit_and_restored(folder, host_dtype):
    host_clip = tiny_clip(0).to(host_dtype)
    te = a1111_cond_stage(host_clip)
    te.other = torch.nn.Linear(3, 3)        # outside the CLIP: never touched
    file_sd = tiny_clip(1).state_dict()
    file_sd["text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)  # old transformers files
    choice = save(folder, "advunlearn_text_encoder.safetensors", file_sd)
    model = sd_model(te=te)
    before = snapshot(te)
    sw = W.prepare(choice, model)
    assert sw.part == "text_encoder" and sw.rep.ignored == ["text_model.embeddings.position_ids"]
    assert_same(snapshot(te), before)                      # prepare changes nothing
    W.apply(sw)
    after = snapshot(te)
    for k, h in sw.rep.pairs.items():
        assert torch.equal(bits(after[h]), bits(file_sd[k].to(host_dtype))), k
        assert after[h].dtype == host_dtype
    assert len(sw.rep.pairs) == sw.rep.total == len(file_sd) - 1
    assert "wrapped.transformer.text_model.embeddings.token_embedding.wrapped.weight" in sw.rep.pairs.values()
    untouched = {k for k in before if k not in sw.rep.pairs.values()}
    assert untouched and all(torch.equal(after[k], before[k]) for k in untouched)
    assert "verified]" in sw.infotext() and f"text_encoder {sw.rep.total}/{sw.rep.total}" in sw.infotext()
    sw.restore()
    assert_same(snapshot(te), before)


class ForgeTokenEmbedding(torch.nn.Module):
    """Forge's CLIPEmbeddingForTextualInversion: the embedding under ``.wrapped`` and its weight
    registered again as ``.weight`` (one Parameter, two state-dict names)."""

    def __init__(self, inner):
        super().__init__()
        self.wrapped = inner
        self.weight = inner.weight


def test_forge_token_embedding_alias_is_replaced_proven_and_restored(folder):
    clip = tiny_clip(0)
    emb = clip.text_model.embeddings
    emb.token_embedding = ForgeTokenEmbedding(emb.token_embedding)
    te = torch.nn.Module()
    te.clip_l = torch.nn.Module()
    te.clip_l.transformer = clip
    names = [k for k in te.state_dict() if "token_embedding" in k]
    assert len(names) == 2                          # the host lists the one tensor twice
    before = snapshot(te)
    file_sd = tiny_clip(1).state_dict()
    sw = W.prepare(save(folder, "te.safetensors", file_sd), sd_model(te=te))
    assert sw.rep.missing == [] and len(sw.rep.pairs) == sw.rep.total == len(file_sd)
    (alias, kept), = sw.rep.aliases.items()
    assert sorted((alias, kept)) == sorted(names)
    W.apply(sw)
    after = snapshot(te)
    for name in names:                              # both names hold the file's embedding
        assert torch.equal(after[name], file_sd["text_model.embeddings.token_embedding.weight"]), name
    assert sw.differing(every=True) == []
    assert "verified]" in sw.infotext() and f"text_encoder {sw.rep.total}/{sw.rep.total}" in sw.infotext()
    sw.restore()
    assert_same(snapshot(te), before)


def test_inference_tensors_are_checked_at_every_check(folder):
    """Forge loads and samples under ``torch.inference_mode``: its tensors have no version
    counter, so a proven tensor cannot be remembered and is compared again each time."""
    with torch.inference_mode():
        te = a1111_cond_stage(tiny_clip(0))
        before = snapshot(te)
        file_sd = tiny_clip(1).state_dict()
        sw = W.prepare(save(folder, "te.safetensors", file_sd), sd_model(te=te))
        W.apply(sw)
        assert sw.differing() == [] and not any(sw.proven.values())     # nothing to remember
        q = te.wrapped.transformer.text_model.encoder.layers[0].self_attn.q_proj.weight
        kept = q.clone()
        q.add_(1.0)
        assert sw.differing() == ["wrapped.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"]
        q.copy_(kept)
        sw.restore()
        assert_same(snapshot(te), before)


def test_an_alias_that_differs_after_the_copy_is_refused(tmp_path):
    """The core proves each second name too: a host whose two names are two tensors that only
    looked like one (here: the alias map handed in by hand) is refused and left as it was."""
    host = {"a.weight": torch.zeros(2, 2), "b.weight": torch.zeros(2, 2)}
    rep = core.plan("te", "text_encoder", {"a.weight": torch.ones(2, 2)}, host, {"a.weight": "a.weight"},
                    ["a.weight"], "host", aliases={"b.weight": "a.weight"})
    with pytest.raises(core.WeightsError, match="differ from the file"):
        core.apply(rep, host)
    assert torch.equal(host["a.weight"], torch.zeros(2, 2)) and not rep.applied


def test_a1111_lora_backups_are_unmerged_first(folder):
    te = a1111_cond_stage(tiny_clip(0))
    q = te.wrapped.transformer.text_model.encoder.layers[0].self_attn.q_proj
    original = q.weight.detach().clone()
    q.network_weights_backup = original.clone()          # the webui's Lora merged a LoRA into q
    q.network_bias_backup = q.bias.detach().clone()
    q.network_current_names = (("lora", 1.0),)
    with torch.no_grad():
        q.weight.add_(1.0)
    file_sd = tiny_clip(1).state_dict()
    sw = W.prepare(save(folder, "te.safetensors", file_sd), sd_model(te=te))
    W.apply(sw)
    assert q.network_weights_backup is None and q.network_current_names == ()
    assert torch.equal(q.weight, file_sd["text_model.encoder.layers.0.self_attn.q_proj.weight"])
    sw.restore()
    assert torch.equal(q.weight, original)                # the unmerged original, not original + LoRA


@pytest.mark.parametrize("position_ids", [False, True])
def test_transformers5_layout_text_encoder_through_the_a1111_path(folder, position_ids):
    """transformers >= 5 saves CLIPTextModel without ``text_model.``: renamed by the core loader,
    matched and copied exactly like a 4.x file (its position_ids, if any, ignored)."""
    te = a1111_cond_stage(tiny_clip(0))
    before = snapshot(te)
    v4 = tiny_clip(1).state_dict()
    v5 = {k[len("text_model."):]: v for k, v in v4.items()}
    assert all(not k.startswith("text_model.") for k in v5)
    if position_ids:
        v5["embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    sw = W.prepare(save(folder, "advunlearn_v5.safetensors", v5), sd_model(te=te))
    assert sw.part == "text_encoder" and sw.rep.missing == []
    assert sw.rep.ignored == (["text_model.embeddings.position_ids"] if position_ids else [])
    assert len(sw.rep.pairs) == sw.rep.total == len(v4)
    W.apply(sw)
    after = snapshot(te)
    for k, h in sw.rep.pairs.items():
        assert torch.equal(bits(after[h]), bits(v4[k])), k
    sw.restore()
    assert_same(snapshot(te), before)


def test_text_projection_in_the_file_must_exist_in_the_host(folder):
    """A ``CLIPTextModelWithProjection`` file carries ``text_projection``; A1111's SD1 CLIP
    (a transformers ``CLIPTextModel``) has none, so the file is refused, never half-applied."""
    te = a1111_cond_stage(tiny_clip(0))
    before = snapshot(te)
    file_sd = dict(tiny_clip(1).state_dict(), **{"text_projection.weight": torch.ones(32, 32)})
    with pytest.raises(core.WeightsError, match="match no tensor") as ei:
        W.prepare(save(folder, "with_projection.safetensors", file_sd), sd_model(te=te))
    assert "text_projection.weight (no such weight in the model)" in str(ei.value)
    assert_same(snapshot(te), before)


# --------------------------------------------------------------------------- UNet

def test_unet_ldm_names_replaced_and_restored(folder):
    host = LdmUNet(0)
    before = snapshot(host)
    file_sd = LdmUNet(1).state_dict()
    sw = W.prepare(save(folder, "esdu.safetensors", {f"model.diffusion_model.{k}": v for k, v in file_sd.items()}),
                   sd_model(unet=host), "unet")
    W.apply(sw)
    assert_same(snapshot(host), file_sd)
    sw.restore()
    assert_same(snapshot(host), before)
    sw.restore()                                          # idempotent
    assert_same(snapshot(host), before)


def test_diffusers_unet_key_map_agrees_with_diffusers_converter():
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = UNet2DConditionModel(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, sample_size=8)
    sd = unet.state_dict()
    names = core.unet_key_map(UNetConfig.from_diffusers(unet.config))
    assert [k for k in sd if k not in names] == []                      # every tensor of the UNet is mapped
    ckpt = {f"model.diffusion_model.{names[k]}": v for k, v in sd.items()}
    back = convert_ldm_unet_checkpoint(ckpt, dict(unet.config))
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


# --------------------------------------------------------------------------- refusals

def test_refusals_are_clear_and_change_nothing(folder, tmp_path):
    te = a1111_cond_stage(tiny_clip(0))
    model = sd_model(te=te, unet=LdmUNet(0))
    before = snapshot(te)
    good = tiny_clip(1).state_dict()

    def refused(choice, part="auto", match=""):
        with pytest.raises(Exception) as ei:
            W.prepare(choice, model, part)
        assert match in str(ei.value), str(ei.value)
        assert_same(snapshot(te), before)

    (folder / "esd.ckpt").write_bytes(b"PK\x03\x04junk")
    refused("safety_models/esd.ckpt", match="only .safetensors")
    torch.save({"a": torch.ones(1)}, str(folder / "pickled.safetensors"))
    refused("safety_models/pickled.safetensors", match="pickle")
    refused(save(folder, "wide.safetensors", tiny_clip(1, hidden=48).state_dict()), match="shape (77, 32) in the model, (77, 48) in the file")
    refused(save(folder, "sd2.safetensors", {"text_model.x.weight": torch.ones(3)}), match="NOTHING")
    partial = {k: v for k, v in good.items() if "layers.1." not in k}
    refused(save(folder, "partial.safetensors", partial), match="partial file")
    extra = dict(good, **{"text_model.encoder.layers.7.mlp.fc1.weight": torch.ones(37, 32)})
    refused(save(folder, "extra.safetensors", extra), match="match no tensor")
    refused(save(folder, "te.safetensors", good), part="unet", match="holds text_encoder weights")
    lora = {"lora_unet_down_blocks_0_attn1_to_q.lora_down.weight": torch.ones(2, 4)}
    refused(save(folder, "lora.safetensors", lora), match="is a LoRA")
    outside = tmp_path / "outside.safetensors"
    save_file(good, str(outside))
    os.symlink(outside, folder / "link.safetensors")
    refused("safety_models/link.safetensors", match="outside")
    refused("safety_models/../outside.safetensors", match="refused")
    refused(str(outside), match="refused")
    refused("safety_models/" + str(outside), match="refused")


def test_sd2_openclip_text_encoder_is_refused(folder):
    oc = torch.nn.Module()
    oc.model = torch.nn.Linear(4, 4)      # open_clip names, no text_model.*
    model = SimpleNamespace(is_sd1=False, is_sd2=True, is_sdxl=False, cond_stage_model=oc)
    with pytest.raises(W.WeightsLayerError, match="OpenCLIP"):
        W.prepare(save(folder, "te.safetensors", tiny_clip(1).state_dict()), model)


# --------------------------------------------------------------------------- arguments

def test_arguments_are_appended_validated_and_round_trip():
    names = C.JobConfig.arg_names()
    w = names.index("weights_enabled")
    assert names[w:w + 3] == ["weights_enabled", "weights_file", "weights_part"]   # later arguments come after
    assert w == names.index("lora_allow_partial") + 1
    old = C.JobConfig.from_args([getattr(C.JobConfig(), n) for n in names[:w]])   # older API calls
    assert old.weights_enabled is False
    args = [getattr(C.JobConfig(), n) for n in names[:w]] + ["false", "None", "auto"]
    assert C.JobConfig.from_args(args).weights_enabled is False
    with pytest.raises(ValueError, match="no file"):
        C.JobConfig.from_args(args[:-3] + ["true", "None", "auto"])
    with pytest.raises(ValueError, match="part"):
        C.JobConfig.from_args(args[:-3] + [False, "None", "vae"])
    cfg = C.JobConfig.from_args(args[:-3] + ["true", "safety_models/a b.safetensors", "unet"])
    info = cfg.infotext()
    assert info["SafeT2I weights"] == "safety_models/a b.safetensors" and info["SafeT2I weights part"] == "unet"
    info["SafeT2I weights"] += " [sha256 0123456789ab unet 10/10 verified]"
    back = C.parse_infotext(info)
    assert back["weights_enabled"] is True and back["weights_file"] == "safety_models/a b.safetensors"
    assert back["weights_part"] == "unet"
    assert "weights_enabled" not in C.parse_infotext({"Steps": "2"})     # a missing key never switches it off
