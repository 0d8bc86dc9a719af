"""models/safety_models.toml: every entry's fields, strict identification, sha256 and contents checks,
architecture of the host."""

from __future__ import annotations

import hashlib
import re
import tomllib
import types

import pytest
import torch
from safetensors.torch import save_file

from safet2i.errors import ModelLoadError, SafeT2IError
from safet2i.lora import inspect_lora, load_lora, manifest
from safet2i.lora.arch import UNetConfig, inventory, unet_modules
from safet2i.lora.coverage import check_strengths, patch_counts, patch_gain_problems

from lora_fixtures import UNET_KW, make_specs, meta_unet, write_layout

REQUIRED = ("title", "method", "paper", "kind", "arch", "base_model", "format", "files", "source", "licence")


def _raw():
    with open(manifest.MANIFEST, "rb") as f:
        return tomllib.load(f)


def test_every_manifest_entry_is_complete_and_consistent():
    raw = _raw()
    assert raw["schema"] == 1
    models = raw["models"]
    assert set(models) == {"duo-nudity-b500", "duo-nudity-b250", "duo-violence-blood", "duo-violence-gun",
                           "duo-violence-horror", "duo-violence-suffer", "esd-u-nudity", "safegen", "advunlearn-nudity",
                           "eraseanything-flux-nudity"}   # EraseAnything: checked in test_lora_families.py
    sd1_modules = list(inventory("sd1")["unet"])
    all_names: list[str] = []
    for name, d in models.items():
        for f in REQUIRED:
            assert isinstance(d.get(f), (str, list)) and d[f], (name, f)
        assert set(d) <= set(REQUIRED) | {"sha256", "expected", "release_files"}, name
        assert d["kind"] in ("lora", "unet", "text_encoder") and d["arch"] in manifest.ARCHS, name
        assert d["sha256"] == "" or re.fullmatch(r"[0-9a-f]{64}", d["sha256"]), name
        tag = name.split("-")[0]
        for f in d["files"]:
            assert f.endswith(".safetensors") and tag in f.lower(), (name, f)   # distinctive: names the method
        all_names += [f.lower() for f in d["files"]]
        exp = d["expected"]
        if d["kind"] == "lora" and name.startswith("duo-"):
            # DUO (methods.md §3): UNet self-attention only, rank 32 — 64 weights in SD1
            assert exp["components"] == ["unet"] and exp["rank"] == 32, name
            matching = [m for m in sd1_modules if re.search(exp["module_regex"], m)]
            assert len(matching) == exp["targets"] == 64, name
            assert all(".attn1." in m for m in matching)
        elif d["kind"] != "lora":
            assert exp["min_coverage"] == 1.0 and exp["components"] == (["unet"] if d["kind"] == "unet" else ["te1"])
        for f in d.get("release_files", []):
            assert manifest.find(f) is None, f   # generic release names identify nothing
    assert len(all_names) == len(set(all_names))
    # the loader reads (and validates) the same entries
    entries = manifest.entries()
    assert [e.name for e in entries] == list(models)
    for e in entries:
        for f in e.files:
            assert manifest.find(f.upper()) is e and manifest.find(f"/some/dir/{f}") is e


def _toml(tmp_path, body: str):
    p = tmp_path / "m.toml"
    p.write_text("schema = 1\n" + body)
    return p


_GOOD = '''
[models.mytest-lora]
title = "t"
method = "m"
paper = "p"
kind = "lora"
arch = "sd1"
base_model = "SD v1.4"
format = "kohya"
files = ["mytest_lora.safetensors"]
sha256 = "{sha}"
expected = {{ components = ["unet"], targets = {n}, rank = 2 }}
source = "s"
licence = "l"
'''


@pytest.mark.parametrize("change,match", [
    (('files = ["mytest_lora.safetensors"]', 'files = ["gun.safetensors"]'), "too generic"),
    (('files = ["mytest_lora.safetensors"]', 'files = ["mytest.ckpt"]'), "not a .safetensors"),
    (('arch = "sd1"', 'arch = "sd9"'), "arch 'sd9'"),
    (('kind = "lora"', 'kind = "vae"'), "kind 'vae'"),
    (('licence = "l"', 'licence = ""'), "licence is empty"),
    (('rank = 2', 'rank = 2, bogus = 1'), "unknown fields"),
    (('sha256 = ""', 'sha256 = "abc"'), "64 hex"),
])
def test_invalid_manifest_entries_are_refused(tmp_path, change, match):
    body = _GOOD.format(sha="", n=4).replace(*change)
    with pytest.raises(ModelLoadError, match=re.escape(match)):
        manifest.entries(_toml(tmp_path, body))


def _small_lora(path, n=4):
    mods = [m for name, m in inventory("sd1")["unet"].items() if ".attn1." in name][:n]
    sd = write_layout(make_specs(mods, rank=2), "kohya")
    save_file(sd, str(path))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sha256_is_verified_and_identifies_a_file_under_any_name(tmp_path, monkeypatch):
    f = tmp_path / "mytest_lora.safetensors"
    sha = _small_lora(f)
    good = _toml(tmp_path, _GOOD.format(sha=sha, n=4))
    monkeypatch.setattr(manifest, "MANIFEST", good)
    lf = load_lora(f)
    assert lf.entry.name == "mytest-lora" and lf.verify_manifest() == "verified"
    renamed = tmp_path / "whatever.safetensors"
    renamed.write_bytes(f.read_bytes())
    assert load_lora(renamed).entry.name == "mytest-lora"          # found by its hash
    # a wrong hash in the manifest: the file under the known name is refused
    (tmp_path / "bad").mkdir()
    bad = _toml(tmp_path / "bad", _GOOD.format(sha="0" * 64, n=4))
    monkeypatch.setattr(manifest, "MANIFEST", bad)
    lf = load_lora(f)
    assert lf.entry.name == "mytest-lora"
    with pytest.raises(ModelLoadError, match=rf"sha256 {sha} does not match the manifest's 0{{64}}"):
        lf.verify_manifest()
    with pytest.raises(ModelLoadError, match="does not match"):
        inspect_lora(f)
    assert load_lora(renamed).entry is None                       # another name, no hash match: unknown


def test_contents_and_min_coverage_are_enforced(tmp_path, monkeypatch):
    f = tmp_path / "mytest_lora.safetensors"
    _small_lora(f, n=3)
    monkeypatch.setattr(manifest, "MANIFEST", _toml(tmp_path, _GOOD.format(sha="", n=4)))
    with pytest.raises(ModelLoadError, match="named like 'mytest-lora'.*3 target weights instead of 4"):
        load_lora(f).verify_manifest()
    monkeypatch.undo()
    adv = manifest.find("advunlearn_nudity_text_encoder.safetensors")
    assert manifest.verify(adv, "", {"te1": 196}, [], set(), {"te1": 1.0}) == "unverified"
    with pytest.raises(ModelLoadError, match=r"replaces 99% of the te1 weights, expected 100%"):
        manifest.verify(adv, "", {"te1": 195}, [], set(), {"te1": 195 / 196})
    duo = manifest.find("duo_nudity_beta500.safetensors")
    with pytest.raises(ModelLoadError, match=r"rank \[4\] instead of 32"):
        manifest.verify(duo, "", {"unet": 64}, ["x.attn1.to_q"] * 64, {4})


def test_generic_names_are_unknown_files_and_still_coverage_checked(tmp_path):
    from safet2i.lora.coverage import CoverageError, check, require_full, resolver_for

    f = tmp_path / "gun.safetensors"    # a user's own LoRA: cross-attention, rank 2, nothing like DUO
    mods = [m for name, m in inventory("sd1")["unet"].items() if name.endswith("attn2.to_k")]
    save_file(write_layout(make_specs(mods, rank=2), "kohya"), str(f))
    lf = load_lora(f)
    assert lf.entry is None and lf.verify_manifest() == "unknown"
    info = inspect_lora(f, base="sd1")
    assert info["manifest"] is None and info["manifest_check"] == "unknown"
    assert "rename it to duo_violence_gun.safetensors" in info["manifest_hint"]
    assert info["coverage"]["matched"] == len(mods) == 16
    with pytest.raises(CoverageError, match="patches NOTHING"):       # still checked against the host
        require_full(check(lf.targets, resolver_for("sd2"), "SD2"), f.name)
    # the same content under the distinctive name is recognised, and refused (not DUO's contents)
    g = tmp_path / "duo_violence_gun.safetensors"
    g.write_bytes(f.read_bytes())
    with pytest.raises(ModelLoadError, match="named like 'duo-violence-gun'"):
        load_lora(g).verify_manifest()


def _duo(path):
    mods = [m for name, m in inventory("sd1")["unet"].items() if ".attn1." in name]
    save_file(write_layout(make_specs(mods, rank=32, std=0.01), "diffusers"), str(path))


def test_a_known_release_on_another_architecture_is_refused(tmp_path):
    from safet2i.diffusers_adapter import host_arch, load_safety_lora

    f = tmp_path / "duo_nudity_beta500.safetensors"
    _duo(f)
    lf = load_lora(f)
    assert lf.verify_manifest() == "unverified" and lf.architectures == ["sd1", "sd2"]  # fits SD2 by shape
    assert inspect_lora(f, base="sd1")["arch_check"] == "ok"
    sd2 = inspect_lora(f, base="sd2")
    assert sd2["coverage"]["matched"] == 64 and sd2["arch_check"].startswith("REFUSED")
    manifest.check_arch(lf.entry, "sd1", "x")
    manifest.check_arch(lf.entry, None, "x")          # host cannot tell: coverage decides
    manifest.check_arch(None, "sd2", "x")             # unknown file: coverage decides
    with pytest.raises(ModelLoadError, match=r"made for Stable Diffusion v1\.4 \(architecture sd1\).*applied to is sdxl"):
        manifest.check_arch(lf.entry, "sdxl", f.name)
    pipes = {a: types.SimpleNamespace(unet=meta_unet(UNET_KW[a])) for a in ("sd1", "sd2", "sdxl")}
    assert {a: host_arch(p) for a, p in pipes.items()} == {"sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl"}
    assert host_arch(types.SimpleNamespace()) is None
    for allow_partial in (False, True):
        with pytest.raises(ModelLoadError, match=r"architecture sd1\).*applied to is sd2"):
            load_safety_lora(pipes["sd2"], f, allow_partial=allow_partial)


def test_strengths_that_invert_or_disable_a_safety_lora_are_refused():
    unet_only = {"unet": 64}
    check_strengths(unet_only, 1.0, 0.0, "x")           # no text-encoder targets: clip 0 is fine
    check_strengths({"unet": 1, "te1": 1}, 0.5, 2.0, "x")
    with pytest.raises(SafeT2IError, match=r"strength_model = -1.0 is negative, which INVERTS"):
        check_strengths(unet_only, -1.0, 1.0, "x")
    with pytest.raises(SafeT2IError, match=r"strength_clip = -0.5 is negative"):
        check_strengths(unet_only, 1.0, -0.5, "x")
    with pytest.raises(SafeT2IError, match=r"strength_model = 0 switches off its 64 UNet patches"):
        check_strengths(unet_only, 0, 1.0, "x")
    with pytest.raises(SafeT2IError, match=r"strength_clip = 0 switches off its 3 text-encoder patches"):
        check_strengths({"unet": 1, "te1": 2, "te2": 1}, 1.0, 0.0, "x")


def test_patch_proof_counts_new_patches_not_inherited_ones():
    """ComfyUI's ModelPatcher.clone() copies the patches dict (lists copied): a key patched by an earlier
    LoRA already 'has a patch'. Only a gain of exactly one per key proves this load."""
    earlier = {"w.a": [("lora", 1)], "w.b": [("lora", 1)]}
    clone = {k: list(v) for k, v in earlier.items()}           # what clone() hands the next loader
    before = patch_counts(earlier)
    assert patch_gain_problems(before, patch_counts(clone), ["w.a", "w.b"]) == ["w.a (+0 patches)", "w.b (+0 patches)"]
    clone["w.a"].append(("lora", 2))
    clone.setdefault("w.c", []).append(("lora", 2))
    assert patch_gain_problems(before, patch_counts(clone), ["w.a", "w.b", "w.c"]) == ["w.b (+0 patches)"]
    clone["w.a"].append(("lora", 3))
    assert patch_gain_problems(before, patch_counts(clone), ["w.a", "w.c"]) == ["w.a (+2 patches)"]
    old_check = [k for k in ["w.a", "w.b", "w.c"] if k not in clone]   # the former "key is in patches" proof
    assert old_check == []                                              # would have accepted w.b


@pytest.mark.parametrize("s, match", [(-1.0, r"strength = -1\.0 is negative"), (0.0, "strength = 0 switches off")],
                         ids=["negative", "zero"])
def test_diffusers_host_refuses_bad_strengths_before_changing_anything(tmp_path, s, match):
    from safet2i.diffusers_adapter import load_safety_lora

    from tiny_diffusers import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(tmp_path)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    mods = [m for m in unet_modules(UNetConfig.from_diffusers(pipe.unet.config)) if ".attn1." in m.diffusers]
    save_file(write_layout(make_specs(mods, rank=4), "diffusers"), str(tmp_path / "l.safetensors"))
    with pytest.raises(SafeT2IError, match=match):
        load_safety_lora(pipe, tmp_path / "l.safetensors", strength=s)
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())


@pytest.fixture(scope="module")
def gun(tmp_path_factory):
    """DUO's violence LoRAs were released as gun/blood/horror/suffer.safetensors: a file with
    exactly DUO's contents (attn1, rank 32, 64 targets: it fits SD2 by shape) under that name."""
    f = tmp_path_factory.mktemp("release") / "gun.safetensors"
    _duo(f)
    return f


@pytest.mark.parametrize("host", ["sd2", "sdxl"])
def test_a_release_named_file_with_the_releases_contents_is_checked_for_its_architecture(gun, host):
    """Under the release's name a file with exactly DUO's contents is taken for the release for
    the architecture check."""
    from safet2i.lora import check_made_for

    lf = load_lora(gun)
    assert lf.entry is None and lf.architectures == ["sd1", "sd2"]
    check_made_for(lf, "sd1", "x")
    check_made_for(lf, None, "x")
    with pytest.raises(ModelLoadError, match=r"duo-violence-gun.*made for Stable Diffusion v1\.4.*"
                                             r"Identified by its release name gun\.safetensors"):
        check_made_for(lf, host, "Safety LoRA gun.safetensors")


@pytest.mark.parametrize("allow_partial", [False, True], ids=["strict", "allow-partial"])
def test_a_release_named_file_is_refused_by_a_diffusers_host_of_another_architecture(gun, allow_partial):
    from safet2i.diffusers_adapter import host_arch, load_safety_lora

    pipe = types.SimpleNamespace(unet=meta_unet(UNET_KW["sd2"]))
    assert host_arch(pipe) == "sd2"
    with pytest.raises(ModelLoadError, match="Identified by its release name"):
        load_safety_lora(pipe, gun, allow_partial=allow_partial)


def test_other_contents_under_a_release_name_decide_nothing(tmp_path):
    # not DUO's contents (rank 2 cross-attention): the name alone decides nothing
    from safet2i.lora import check_made_for

    g = tmp_path / "other" / "gun.safetensors"
    g.parent.mkdir()
    mods = [m for name, m in inventory("sd1")["unet"].items() if name.endswith("attn1.to_q")]
    save_file(write_layout(make_specs(mods, rank=2), "kohya"), str(g))
    check_made_for(load_lora(g), "sd2", "x")


def test_the_releases_contents_under_an_unknown_name_are_checked_by_shape(gun, tmp_path):
    # a file that fits SD1 completely but not SDXL, unknown to the manifest: refused by shape
    from safet2i.lora import check_made_for

    h = tmp_path / "mine.safetensors"
    h.write_bytes(gun.read_bytes())
    with pytest.raises(ModelLoadError, match="made for SD1.x.*Refused even with allow_partial"):
        check_made_for(load_lora(h), "sdxl", "x")
    check_made_for(load_lora(h), "sd2", "x")          # SD2 fits it completely and nothing says otherwise
