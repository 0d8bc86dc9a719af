"""A1111 safety LoRA layer (extension/safet2i_a1111/lora.py): choice resolution, coverage,
conversion of DUO's diffusers keys to kohya keys, prompt tags, proof of loading.

The converted file is checked without safet2i's parser too: every key must be a kohya
``<lora_unet_|lora_te_><module path with '_'>.<lora_down.weight|lora_up.weight|alpha>`` of an
existing SD1 module (what the webui's Lora extension resolves), with the spec's tensors and
alpha = rank (DUO files have no alpha: scale 1).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "extension"))

from safet2i.errors import ModelLoadError  # noqa: E402
from safet2i.lora import CoverageError, LoraFormatError, load_lora  # noqa: E402
from safet2i.lora.arch import Module, inventory  # noqa: E402
from safet2i_a1111 import lora as L  # noqa: E402

from lora_fixtures import make_specs, write_layout  # noqa: E402

SD1 = SimpleNamespace(is_sd1=True, is_sd2=False, is_sdxl=False)


def attn1_specs(arch="sd1", seed=0):
    mods = [m for m in inventory(arch)["unet"].values() if ".attn1." in m.diffusers]
    return make_specs(mods, rank=4, seed=seed)


@pytest.fixture()
def folders(tmp_path):
    f = {"Lora": tmp_path / "Lora", "safety_models": tmp_path / "safety_models"}
    for d in f.values():
        d.mkdir()
    return f


def save(path: Path, sd: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def kohya_check(path: Path, specs):
    """Independent of safet2i: the webui-visible kohya keys and tensors of ``specs``."""
    sd = load_file(str(path))
    flat = {m.diffusers.replace(".", "_") for m in inventory("sd1")["unet"].values()}
    want = {}
    for s in specs:
        stem = "lora_unet_" + s.diffusers.replace(".", "_")
        assert s.diffusers.replace(".", "_") in flat
        want[stem + ".lora_down.weight"] = s.down
        want[stem + ".lora_up.weight"] = s.up
        want[stem + ".alpha"] = torch.tensor(float(s.rank))
    assert set(sd) == set(want)
    for k, v in want.items():
        assert torch.equal(sd[k], v), k


def test_duo_layout_is_converted_to_a_complete_kohya_copy(folders):
    specs = attn1_specs()
    src = save(folders["safety_models"] / "duo" / "pytorch_lora_weights.safetensors", write_layout(specs, "diffusers"))
    before = src.read_bytes()
    lora = L.prepare("safety_models/duo/pytorch_lora_weights.safetensors", SD1, 0.8, folders=folders)
    assert lora.converted and lora.arch == "sd1" and lora.targets == lora.total == len(specs) == 64
    assert lora.filename.parent == folders["Lora"] / L.CACHE_DIRNAME and lora.name == lora.filename.stem
    assert lora.name.startswith("safet2i-pytorch_lora_weights-") and lora.tag == f"<lora:{lora.name}:0.8>"
    assert src.read_bytes() == before                        # the user's file is untouched
    kohya_check(lora.filename, specs)
    back = load_lora(lora.filename)                          # loadable and complete for the core as well
    assert back.formats == ["kohya"] and back.architectures[0] == "sd1" and len(back.targets) == 64
    with safe_open(str(lora.filename), framework="pt") as f:
        meta = f.metadata()
    assert meta["converted_by"] == "safet2i" and meta["source_sha256"] == lora.sha256 and meta["targets"] == "64"
    assert lora.infotext().startswith("64/64 sd1 sha256 ") and "converted" in lora.infotext()
    # The same choice again reuses the cache (not rewritten).
    mtime = os.stat(lora.filename).st_mtime_ns
    again = L.prepare("safety_models/duo/pytorch_lora_weights.safetensors", SD1, 1.0, folders=folders)
    assert again.filename == lora.filename and os.stat(lora.filename).st_mtime_ns == mtime
    # The DUO file inside models/Lora (which the webui's loader would silently not load) is converted too.
    save(folders["Lora"] / "duo.safetensors", write_layout(specs, "diffusers"))
    assert L.prepare("Lora/duo.safetensors", SD1, folders=folders).converted


def test_kohya_in_lora_folder_is_used_as_is_elsewhere_copied(folders):
    specs = attn1_specs(seed=3)
    src = save(folders["Lora"] / "sub" / "safe_kohya.safetensors", write_layout(specs, "kohya"))
    lora = L.prepare("Lora/sub/safe_kohya.safetensors", SD1, folders=folders)
    assert not lora.converted and lora.filename == src and lora.name == "safe_kohya"
    assert not (folders["Lora"] / L.CACHE_DIRNAME).exists()
    other = save(folders["safety_models"] / "k.safetensors", write_layout(specs, "kohya"))
    copied = L.prepare("safety_models/k.safetensors", SD1, folders=folders)
    assert copied.converted and copied.filename != other
    kohya_check(copied.filename, specs)
    # Another file already answers to the stem in the webui: use a uniquely named copy.
    networks = SimpleNamespace(available_network_aliases={"safe_kohya": SimpleNamespace(filename="/elsewhere/x")},
                               available_networks={})
    assert L.prepare("Lora/sub/safe_kohya.safetensors", SD1, folders=folders, networks=networks).converted


def _choice_tree(folders, tmp_path):
    """Two loadable choices, the conversion cache, a link leading outside and a pickle."""
    save(folders["Lora"] / "a.safetensors", write_layout(attn1_specs(), "kohya"))
    save(folders["safety_models"] / "d" / "b.safetensors", write_layout(attn1_specs(), "diffusers"))
    L.prepare("safety_models/d/b.safetensors", SD1, folders=folders)        # creates the cache
    outside = save(tmp_path / "outside.safetensors", write_layout(attn1_specs(), "diffusers"))
    (folders["Lora"] / "link.safetensors").symlink_to(outside)
    (folders["Lora"] / "x.ckpt").write_bytes(b"\x80\x02")


def test_choices_and_path_tricks(folders, tmp_path):
    _choice_tree(folders, tmp_path)
    choices = L.list_choices(folders)
    assert choices == ["None", "Lora/a.safetensors", "safety_models/d/b.safetensors"]
    assert L.resolve_choice("Lora/a.safetensors", folders) == folders["Lora"] / "a.safetensors"


CACHED = object()   # stands for the file the conversion wrote into the cache folder

BAD_CHOICES = {
    "parent-of-lora": "Lora/../outside.safetensors",
    "parent-of-safety-models": "safety_models/../../etc/passwd",
    "absolute": "/etc/passwd",
    "double-slash": "Lora//etc/x.safetensors",
    "backslash-parent": "Lora\\..\\outside.safetensors",
    "unknown-folder": "nope/a.safetensors",
    "symlink-outside": "Lora/link.safetensors",
    "pickle": "Lora/x.ckpt",
    "dot-segment": "Lora/./a.safetensors",
    "None": "None",
    "empty": "",
    "missing": "Lora/missing.safetensors",
    "nul-byte": "Lora/a.safetensors\x00.txt",
    "cache-file": CACHED,
}


@pytest.mark.parametrize("choice", list(BAD_CHOICES.values()), ids=list(BAD_CHOICES))
def test_a_tricky_choice_is_refused(folders, tmp_path, choice):
    _choice_tree(folders, tmp_path)
    if choice is CACHED:
        choice = f"Lora/{L.CACHE_DIRNAME}/" + next((folders["Lora"] / L.CACHE_DIRNAME).iterdir()).name
    with pytest.raises(L.LoraLayerError):
        L.resolve_choice(choice, folders)


def test_foreign_file_in_the_cache_is_never_overwritten(folders):
    specs = attn1_specs()
    src = save(folders["safety_models"] / "duo.safetensors", write_layout(specs, "diffusers"))
    sha = load_lora(src).sha256
    cache = folders["Lora"] / L.CACHE_DIRNAME
    user = save(cache / f"safet2i-duo-{sha[:12]}-sd1.safetensors", {"w": torch.ones(3)})
    before = user.read_bytes()
    with pytest.raises(L.LoraLayerError, match="not written by SafeT2I"):
        L.prepare("safety_models/duo.safetensors", SD1, folders=folders)
    assert user.read_bytes() == before
    user.unlink()
    user.symlink_to(src)
    with pytest.raises(L.LoraLayerError, match="not a plain file"):
        L.prepare("safety_models/duo.safetensors", SD1, folders=folders)


@pytest.mark.parametrize("partial", [False, True], ids=["strict", "allow-partial"])
def test_wrong_architecture_is_refused_even_with_allow_partial(folders, partial):
    save(folders["Lora"] / "sd1.safetensors", write_layout(attn1_specs(), "diffusers"))
    sdxl = SimpleNamespace(is_sdxl=True, conditioner=SimpleNamespace(embedders=[]))
    # an SD1 attn1 LoRA shares 20 of its 64 shapes with SDXL: still refused
    with pytest.raises(ModelLoadError, match="made for SD1.x.*Refused even with allow_partial"):
        L.prepare("Lora/sd1.safetensors", sdxl, allow_partial=partial, folders=folders)


def test_a_file_that_patches_nothing_is_refused_even_with_allow_partial(folders):
    junk = {"lora_unet_no_such_block.lora_down.weight": torch.ones(2, 8),
            "lora_unet_no_such_block.lora_up.weight": torch.ones(8, 2)}
    save(folders["Lora"] / "junk.safetensors", junk)
    with pytest.raises(CoverageError, match="patches NOTHING"):
        L.prepare("Lora/junk.safetensors", SD1, allow_partial=True, folders=folders)


def test_partial_coverage_needs_allow_partial_and_is_marked(folders):
    # SD1 attn1 weights plus three modules no base model has: partial everywhere.
    extra = [Module(f"down_blocks.0.attentions.0.transformer_blocks.0.attn3.to_{x}", "-", (320, 320)) for x in "qkv"]
    mixed = attn1_specs() + make_specs(extra, rank=4, seed=9)
    save(folders["Lora"] / "mixed.safetensors", write_layout(mixed, "diffusers"))
    with pytest.raises(CoverageError, match="only 64 of its 67"):
        L.prepare("Lora/mixed.safetensors", SD1, folders=folders)
    lora = L.prepare("Lora/mixed.safetensors", SD1, allow_partial=True, folders=folders)
    assert lora.targets == 64 and lora.total == 67 and lora.filename.stem.endswith("-partial")
    kohya_check(lora.filename, attn1_specs())


def test_peft_dora_is_refused(folders):
    specs = attn1_specs()
    for s in specs:
        s.dora = torch.ones(s.up.shape[0])
    save(folders["Lora"] / "dora.safetensors", write_layout(specs, "peft-unet"))
    with pytest.raises(LoraFormatError, match="PEFT DoRA"):
        L.prepare("Lora/dora.safetensors", SD1, folders=folders)


def test_model_architecture_flags():
    assert L.model_architecture(SD1) == "sd1"
    assert L.model_architecture(SimpleNamespace(is_sd2=True)) == "sd2"
    two = [SimpleNamespace(tokenize_line=1), SimpleNamespace(tokenize_line=1), SimpleNamespace()]
    assert L.model_architecture(SimpleNamespace(is_sdxl=True, conditioner=SimpleNamespace(embedders=two))) == "sdxl"
    with pytest.raises(L.LoraLayerError, match="refiner"):
        L.model_architecture(SimpleNamespace(is_sdxl=True, conditioner=SimpleNamespace(embedders=two[1:])))
    with pytest.raises(L.LoraLayerError, match="none of them"):
        L.model_architecture(SimpleNamespace(is_sd3=True))


def _lora(tmp_path, targets=64, strength=1.0):
    return L.SafetyLora("Lora/x.safetensors", tmp_path / "x.safetensors", "ab" * 32, "sd1", "safet2i-x",
                        tmp_path / "safet2i-x.safetensors", targets, targets, strength, True)


def test_prompt_tags_and_hires_entry(tmp_path, monkeypatch):
    lora = _lora(tmp_path, strength=0.75)
    prompts = ["a cat <lora:safet2i-x:0.2> <lora:style:1>", "a dog", "a AND b"]
    same = prompts
    L.add_tag(prompts, lora)
    assert prompts is same and lora.pending
    assert prompts == ["a cat  <lora:style:1> <lora:safet2i-x:0.75>", "a dog <lora:safet2i-x:0.75>",
                       "a AND b <lora:safet2i-x:0.75>"]
    # Hires: an entry built by the webui's own parser goes into p.hr_extra_network_data.
    extra = ModuleType("modules.extra_networks")

    def parse_prompts(texts):
        return texts, {"lora": [SimpleNamespace(positional=["safet2i-x", "0.75"], items=["safet2i-x", "0.75"])]}

    extra.parse_prompts = parse_prompts
    modules = ModuleType("modules")
    modules.extra_networks = extra
    monkeypatch.setitem(sys.modules, "modules", modules)
    monkeypatch.setitem(sys.modules, "modules.extra_networks", extra)
    user = SimpleNamespace(positional=["style", "1"])
    stale = SimpleNamespace(positional=["safet2i-x", "0.1"])
    p = SimpleNamespace(enable_hr=True, hr_extra_network_data={"lora": [user, stale]})
    L.add_hires(p, lora)
    assert [e.positional for e in p.hr_extra_network_data["lora"]] == [["style", "1"], ["safet2i-x", "0.75"]]
    no_hr = SimpleNamespace(enable_hr=False, hr_extra_network_data={})
    L.add_hires(no_hr, lora)
    assert no_hr.hr_extra_network_data == {}


def test_verify_loaded_a1111_and_forge(tmp_path):
    lora = _lora(tmp_path, targets=4, strength=0.75)
    p = SimpleNamespace(sd_model=SimpleNamespace())
    net = SimpleNamespace(name="safet2i-x", modules={i: 0 for i in range(4)}, te_multiplier=0.75, unet_multiplier=0.75)
    other = SimpleNamespace(name="style", modules={})
    lora.pending = True
    assert L.verify_loaded(p, lora, SimpleNamespace(loaded_networks=[other, net])) == "4/4" and not lora.pending
    net.modules.pop(0)
    with pytest.raises(L.LoraLayerError, match="only 3 of the 4"):
        L.verify_loaded(p, lora, SimpleNamespace(loaded_networks=[net]))
    with pytest.raises(L.LoraLayerError, match="did not load"):
        L.verify_loaded(p, lora, SimpleNamespace(loaded_networks=[other]))
    net.modules[0], net.te_multiplier = 0, 0.2
    with pytest.raises(L.LoraLayerError, match="te_multiplier"):
        L.verify_loaded(p, lora, SimpleNamespace(loaded_networks=[net]))
    saved = sys.modules.pop("networks", None)
    try:
        with pytest.raises(L.LoraLayerError, match="Lora extension is not loaded"):
            L.verify_loaded(p, lora)
    finally:
        if saved is not None:
            sys.modules["networks"] = saved
    # Forge: patches recorded per (filename, strength, ...) on the patched UNet and CLIP.
    ident = (str(lora.filename), 0.75, 1.0, False)
    unet = SimpleNamespace(lora_patches={ident: {"a": 1, "b": 1, "c": 1}, ("/other", 0.75, 1.0, False): {"d": 1}})
    clip = SimpleNamespace(patcher=SimpleNamespace(lora_patches={ident: {"e": 1}}))
    forge = SimpleNamespace(sd_model=SimpleNamespace(forge_objects_after_applying_lora=SimpleNamespace(unet=unet,
                                                                                                      clip=clip)))
    assert L.verify_loaded(forge, lora) == "4/4"
    clip.patcher.lora_patches = {}
    with pytest.raises(L.LoraLayerError, match="only 3 of the 4"):
        L.verify_loaded(forge, lora)


def test_register_makes_the_name_resolve(tmp_path, monkeypatch):
    network = ModuleType("network")
    network.NetworkOnDisk = lambda name, filename: SimpleNamespace(name=name, filename=filename)
    monkeypatch.setitem(sys.modules, "network", network)
    networks = SimpleNamespace(available_networks={}, available_network_aliases={})
    L.register("safet2i-x", tmp_path / "f.safetensors", networks)
    assert networks.available_network_aliases["safet2i-x"].filename == str(tmp_path / "f.safetensors")
    assert networks.available_networks["safet2i-x"] is networks.available_network_aliases["safet2i-x"]


def test_verify_loaded_reforge(tmp_path):
    """reForge: ldm_patched ModelPatcher clones with ``.patches`` lists (no ``lora_patches``),
    the applied set in ``current_lora_hash`` (reForge's extensions-builtin/Lora/networks.py)."""
    lora = _lora(tmp_path, targets=4, strength=0.75)

    def patcher(patches):
        return SimpleNamespace(patches={k: list(v) for k, v in patches.items()})

    base_unet = {"other.weight": [(1.0, "style", 1.0, None, None)]}
    original = SimpleNamespace(unet=patcher(base_unet), clip=SimpleNamespace(patcher=patcher({})))
    after_unet = {k: list(v) for k, v in base_unet.items()}
    for k in ("a.weight", "b.weight", "c.weight"):
        after_unet.setdefault(k, []).append((0.75, ("lora", ()), 1.0, None, None))
    after = SimpleNamespace(unet=patcher(after_unet),
                            clip=SimpleNamespace(patcher=patcher({"te.weight": [(0.75, ("lora", ()), 1.0, None, None)]})))
    sd_model = SimpleNamespace(forge_objects_original=original, forge_objects_after_applying_lora=after,
                               current_lora_hash=str([["/x/style.safetensors", 1.0, 1.0],
                                                      [str(lora.filename), 0.75, 0.75]]))
    p = SimpleNamespace(sd_model=sd_model)
    assert L.verify_loaded(p, lora) == "4/4"
    # A patch the original already had does not count as ours.
    after.clip.patcher.patches = {}
    with pytest.raises(L.LoraLayerError, match="only 3 of the 4"):
        L.verify_loaded(p, lora)
    after.clip.patcher.patches = {"te.weight": [(0.75, ("lora", ()), 1.0, None, None)]}
    sd_model.current_lora_hash = str([["/x/style.safetensors", 1.0, 1.0]])
    with pytest.raises(L.LoraLayerError, match="did not apply"):
        L.verify_loaded(p, lora)
    sd_model.current_lora_hash = str([[str(lora.filename), 0.3, 0.75]])
    with pytest.raises(L.LoraLayerError, match="strengths"):
        L.verify_loaded(p, lora)


def test_known_release_checked_against_the_manifest_and_the_model(folders):
    """A file named as a known release (DUO nudity β=500: SD1.x, rank 32, attn1 only): its
    contents must be what the manifest says, and it is refused on an SD2 model although every
    one of its shapes fits there too (shape checks alone would let it through)."""
    from safet2i.errors import ModelLoadError
    from safet2i.lora.manifest import find

    entry = find("duo_nudity_beta500.safetensors", "")
    assert entry is not None and entry.arch == "sd1"
    mods = [m for m in inventory("sd1")["unet"].values() if ".attn1." in m.diffusers]
    sd2 = SimpleNamespace(is_sd2=True)
    name = "Lora/duo_nudity_beta500.safetensors"
    save(folders["Lora"] / "duo_nudity_beta500.safetensors", write_layout(make_specs(mods, rank=4), "diffusers"))
    with pytest.raises(ModelLoadError, match=r"rank \[4\] instead of 32"):
        L.prepare(name, SD1, folders=folders)
    save(folders["Lora"] / "duo_nudity_beta500.safetensors", write_layout(make_specs(mods, rank=32), "diffusers"))
    lora = L.prepare(name, SD1, folders=folders)
    assert lora.arch == "sd1" and lora.targets == len(mods)
    for partial in (False, True):
        with pytest.raises(ModelLoadError, match="made for"):
            L.prepare(name, sd2, allow_partial=partial, folders=folders)
    # The same tensors under a name the manifest does not know: shapes fit SD2, coverage decides.
    save(folders["Lora"] / "my_lora.safetensors", write_layout(make_specs(mods, rank=32), "diffusers"))
    assert L.prepare("Lora/my_lora.safetensors", sd2, folders=folders).arch == "sd2"
