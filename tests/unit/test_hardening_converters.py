"""Issue 14, class 7: converters cannot launder what the loader refuses.

Hostile files are generated here (tiny tensors) and checked through the CLI
(``safet2i.cli.main``: exit codes and messages) and the Python API:

1. ``safet2i lora convert`` runs the loaders' manifest, architecture and coverage checks and
   refuses with the same message; ``--allow-unknown`` converts only a file nothing vouches for,
   marked UNVERIFIED (printed and in the output's metadata);
2. degenerate LoRAs (rank 0, zero-size or all-zero tensors, B·A = 0, scale 0 / negative /
   non-finite / underflowing, NaN/inf) are refused by the core ``load_lora``, naming file and key;
3. ``safet2i convert`` never drops a tensor silently, never passes on torch's advice to disable
   ``weights_only``, and its hint for a pickle under a ``.safetensors`` name works when followed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import types

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from safet2i.cli import build_parser, main
from safet2i.errors import ModelLoadError, SafeT2IError
from safet2i.lora import (
    LoraFormatError, check_convertible, check_for_host, check_made_for, convert_lora, convert_pickle,
    convert_pickle_report, inspect_lora, load_lora, manifest, read_safetensors,
)
from safet2i.lora.arch import inventory
from safet2i.lora.coverage import CoverageError

from lora_fixtures import KOHYA_Q, duo_state, make_specs, one_target, write_layout

TORCH_ADVICE = ("weights_only=False", "weights_only` set to `False`", "set to `False`", "add_safe_globals",
                "safe_globals", "trusted source", "allowlist")


def _meta(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def _only_error(err: str) -> str:
    """The message of ``safet2i: error: MESSAGE`` (one line)."""
    (line,) = [ln for ln in err.splitlines() if ln.startswith("safet2i: error: ")]
    return line.removeprefix("safet2i: error: ")


def _convert(*argv) -> int:
    return main(["lora", "convert", *map(str, argv), "--to", "kohya"])


def _no_output(tmp_path):
    left = sorted(p.name for p in tmp_path.rglob("*") if p.name.endswith((".kohya.safetensors", ".part")))
    assert left == []


_MANIFEST = '''schema = 1
[models.mytest-lora]
title = "My test LoRA"
method = "m"
paper = "p"
kind = "lora"
arch = "sd1"
base_model = "SD v1.4"
format = "kohya"
files = ["mytest_lora.safetensors"]
release_files = ["release.safetensors"]
sha256 = "{sha}"
expected = {{ components = ["unet"], targets = 4, rank = 2{extra} }}
source = "s"
licence = "l"
'''


def _mytest(tmp_path, monkeypatch, sha: str = "", extra: str = "", name: str = "mytest_lora.safetensors"):
    """A 4-target SD1 attn1 LoRA and a manifest entry for it (sha256 / min_coverage as given)."""
    mods = [m for n, m in inventory("sd1")["unet"].items() if ".attn1." in n][:4]
    f = tmp_path / name
    save_file(write_layout(make_specs(mods, rank=2), "kohya"), str(f))
    toml = tmp_path / "m.toml"
    toml.write_text(_MANIFEST.format(sha=sha, extra=extra))
    monkeypatch.setattr(manifest, "MANIFEST", toml)
    return f


# ============================================================================ 1. lora convert = loaders' checks

def test_known_release_with_other_contents_is_refused_with_inspects_message(tmp_path, capsys):
    f = tmp_path / "duo_nudity_beta500.safetensors"
    save_file(duo_state(rank=4), str(f))                     # DUO's name, rank 4 instead of 32
    assert main(["lora", "inspect", str(f)]) == 4
    inspect_msg = _only_error(_err(capsys))
    assert _convert(f) == 4
    convert_msg = _only_error(_err(capsys))
    assert convert_msg == inspect_msg and "rank [4] instead of 32" in convert_msg
    with pytest.raises(ModelLoadError) as e:
        load_lora(f).verify_manifest()                      # what every loader calls
    assert str(e.value) == convert_msg
    assert _convert(f, "--allow-unknown") == 4              # never overrides a refusal
    _no_output(tmp_path)


def test_known_release_with_a_wrong_sha256_is_refused(tmp_path, capsys, monkeypatch):
    f = _mytest(tmp_path, monkeypatch, sha="0" * 64)
    with pytest.raises(ModelLoadError) as e:
        load_lora(f).verify_manifest()
    assert main(["lora", "inspect", str(f)]) == 4
    assert _only_error(_err(capsys)) == str(e.value)
    assert _convert(f, "--allow-unknown") == 4
    assert _only_error(_err(capsys)) == str(e.value) and "does not match the manifest's 0000" in str(e.value)
    with pytest.raises(ModelLoadError, match="does not match"):
        convert_lora(f, allow_unknown=True)
    _no_output(tmp_path)


def test_known_release_converts_checked_on_its_own_base_and_says_so(tmp_path, capsys):
    f = tmp_path / "duo_nudity_beta500.safetensors"
    save_file(duo_state(), str(f))
    assert _convert(f) == 0
    out = capsys.readouterr().out
    assert "64 target weights" in out and "checked: 'DUO nudity, beta = 500" in out and "duo-nudity-b500" in out
    meta = _meta(tmp_path / "duo_nudity_beta500.kohya.safetensors")
    assert meta["safet2i_check"] == "manifest" and meta["safet2i_manifest"] == "duo-nudity-b500"
    assert meta["safet2i_manifest_check"] == "unverified" and meta["safet2i_base"] == "sd1"
    assert meta["converted_by"] == "safet2i lora convert" and meta["source_sha256"] == load_lora(f).sha256
    # the converted file is the same LoRA for a loader
    back = load_lora(tmp_path / "duo_nudity_beta500.kohya.safetensors")
    assert back.formats == ["kohya"] and len(back.targets) == 64 and back.architectures == ["sd1", "sd2"]


@pytest.mark.parametrize("base", ["sd2", "sdxl"])
def test_known_release_on_another_base_is_refused_with_the_loaders_message(tmp_path, capsys, base):
    f = tmp_path / "duo_nudity_beta500.safetensors"
    save_file(duo_state(), str(f))
    lf = load_lora(f)
    with pytest.raises(ModelLoadError) as e:
        check_made_for(lf, base, f"Safety LoRA {f.name}")     # the loaders' check and message
    assert _convert(f, "--base", base) == 4
    assert _only_error(_err(capsys)) == str(e.value) and f"applied to is {base}" in str(e.value)
    assert inspect_lora(f, base)["load_check"] == f"REFUSED: {e.value}"
    assert _convert(f, "--base", base, "--allow-unknown") == 4
    _no_output(tmp_path)
    # the diffusers host refuses it the same way
    from safet2i.diffusers_adapter import load_safety_lora
    from lora_fixtures import UNET_KW, meta_unet

    with pytest.raises(ModelLoadError) as host:
        load_safety_lora(types.SimpleNamespace(unet=meta_unet(UNET_KW[base])), f)
    assert str(host.value) == str(e.value)


def test_release_name_with_the_releases_contents_is_held_to_its_base(tmp_path, capsys):
    f = tmp_path / "gun.safetensors"                        # DUO violence, released under this generic name
    save_file(duo_state(), str(f))
    assert _convert(f, "--base", "sdxl") == 4
    assert "Identified by its release name gun.safetensors" in _err(capsys)
    assert _convert(f, "--base", "sd2") == 4                # fits SD2 by shape, but made for SD1
    assert "Identified by its release name" in _err(capsys)
    assert _convert(f) == 0                                  # no --base: the release's own base, SD1
    meta = _meta(tmp_path / "gun.kohya.safetensors")
    assert meta["safet2i_base"] == "sd1" and meta["safet2i_manifest"] == "none" and meta["safet2i_check"] == "shape"
    assert "release name gun.safetensors" in meta["safet2i_note"]


def test_unknown_file_fitting_another_base_is_refused_even_with_allow_unknown(tmp_path, capsys):
    mods = [m for n, m in inventory("sd1")["unet"].items() if n.endswith("attn2.to_k")]   # 768 wide: SD1 only
    f = tmp_path / "mine.safetensors"
    save_file(write_layout(make_specs(mods, rank=2), "kohya"), str(f))
    for extra in ([], ["--allow-unknown"]):
        assert _convert(f, "--base", "sdxl", *extra) == 4
        assert "is made for SD1.x" in _err(capsys)
    _no_output(tmp_path)
    assert _convert(f, "--base", "sd1") == 0
    out = capsys.readouterr().out
    assert "checked: not in the manifest (contents not vouched for); all 16 targets fit SD1.x" in out
    assert _meta(tmp_path / "mine.kohya.safetensors")["safet2i_check"] == "shape"


def test_partial_file_is_refused_and_allow_unknown_marks_it_unverified(tmp_path, capsys):
    sd = duo_state(rank=2)
    bogus = "unet.down_blocks.0.attentions.0.transformer_blocks.1.attn1.to_q"   # SD1 has one block here
    sd[bogus + ".lora.down.weight"], sd[bogus + ".lora.up.weight"] = torch.randn(2, 320), torch.randn(320, 2)
    f = tmp_path / "partial.safetensors"
    save_file(sd, str(f))
    lf = load_lora(f)
    assert lf.architectures == []
    # no base: nothing vouches for it
    assert _convert(f) == 4
    msg = _only_error(_err(capsys))
    assert "nothing vouches for this file" in msg and "--allow-unknown" in msg and "sd1 64/65" in msg
    with pytest.raises(ModelLoadError, match="nothing vouches"):
        convert_lora(f)
    # with a base: the loaders' coverage refusal, word for word, and --allow-unknown does not override it
    with pytest.raises(CoverageError) as e:
        check_for_host(lf, "sd1")
    assert "would patch only 64 of its 65" in str(e.value) and bogus in str(e.value)
    for extra in ([], ["--allow-unknown"]):
        assert _convert(f, "--base", "sd1", *extra) == 4
        assert _only_error(_err(capsys)) == str(e.value)
    assert inspect_lora(f, "sd1")["load_check"] == f"REFUSED: {e.value}"
    _no_output(tmp_path)
    # --allow-unknown without a base: converted, and it says so
    assert _convert(f, "--allow-unknown") == 0
    out = capsys.readouterr().out
    assert "UNVERIFIED: not in the manifest and no known architecture fits every target" in out
    assert "--allow-unknown" in out
    meta = _meta(tmp_path / "partial.kohya.safetensors")
    assert meta["safet2i_check"] == "UNVERIFIED" and meta["safet2i_note"].startswith("UNVERIFIED")
    assert meta["safet2i_architectures"] == "unknown" and meta["safet2i_base"] == "none"
    rep = convert_lora(f, tmp_path / "api.safetensors", allow_unknown=True)
    assert rep["check"] == "UNVERIFIED" and rep["targets"] == 65
    assert len(load_lora(tmp_path / "api.safetensors").targets) == 65


def test_min_coverage_of_a_lora_entry_is_enforced(tmp_path, capsys, monkeypatch):
    f = _mytest(tmp_path, monkeypatch, extra=", min_coverage = 0.5")
    lf = load_lora(f)
    assert lf.verify_manifest() == "unverified"              # without an architecture: not measurable
    with pytest.raises(ModelLoadError, match=r"replaces 1% of the unet weights, expected 50%") as e:
        lf.verify_manifest("sd1")
    assert _convert(f) == 4                                  # the entry's base, sd1
    assert _only_error(_err(capsys)) == str(e.value)
    assert inspect_lora(f, "sd1")["load_check"] == f"REFUSED: {e.value}"
    ok = tmp_path / "ok"
    ok.mkdir()
    rep = check_convertible(load_lora(_mytest(ok, monkeypatch, extra=", min_coverage = 0.01")))
    assert rep["check"] == "manifest" and rep["base"] == "sd1" and rep["manifest"] == "mytest-lora"


def test_convert_help_documents_the_rule(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["lora", "convert", "-h"])
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("--allow-unknown", "--base", "UNVERIFIED", "refusing what the loaders refuse", "min_coverage",
                   "Never overrides a refusal"):
        assert needle in text
    with pytest.raises(SystemExit):
        build_parser().parse_args(["convert", "-h"])
    text = " ".join(capsys.readouterr().out.split())
    assert "skipped and listed" in text and "a.0.b" in text


# ============================================================================ 2. degenerate LoRAs

def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _cancelling():
    a = _rand(1, 320)
    return torch.cat([a, -a]), torch.ones(320, 2)           # B·A = b·a − b·a = 0


DEGENERATE = {   # case: (state dict, regex naming the key, and the reason)
    "rank-0": (one_target(torch.zeros(0, 320), torch.zeros(320, 0), 4.0),
               r"down tensor " + KOHYA_Q + r"\.lora_down\.weight has zero size \(0, 320\) \(rank 0"),
    "rank-0-no-alpha": (one_target(torch.zeros(0, 320), torch.zeros(320, 0)), r"has zero size .*rank 0"),
    "zero-in": (one_target(torch.zeros(2, 0), _rand(320, 2)), KOHYA_Q + r"\.lora_down\.weight has zero size \(2, 0\)"),
    "zero-out": (one_target(_rand(2, 320), torch.zeros(0, 2)), KOHYA_Q + r"\.lora_up\.weight has zero size \(0, 2\)"),
    "empty-alpha": (one_target(_rand(2, 320), _rand(320, 2), torch.zeros(0)), KOHYA_Q + r"\.alpha is empty"),
    "zero-up": (one_target(_rand(2, 320), torch.zeros(320, 2)), KOHYA_Q + r"\.lora_up\.weight is all zeros"),
    "zero-down": (one_target(torch.zeros(2, 320), _rand(320, 2)), KOHYA_Q + r"\.lora_down\.weight is all zeros"),
    "cancel": (one_target(*_cancelling()), r"lora_up\.weight times down .*lora_down\.weight is zero"),
    "alpha-0": (one_target(_rand(2, 320), _rand(320, 2), 0.0),
                r"alpha 0 \(" + KOHYA_Q + r"\.alpha\) makes its scale 0"),
    "alpha-negative": (one_target(_rand(2, 320), _rand(320, 2), -2.0), r"scale negative .*INVERTS"),
    "alpha-denormal": (one_target(_rand(2, 320), _rand(320, 2), 1e-45), r"no weight changes by more than 1e-06"),
    # review: alpha 1e-30 left every float32/float16 weight bit-identical yet loaded as "patched"
    "alpha-negligible": (one_target(_rand(2, 320), _rand(320, 2), 1e-30), r"no weight changes by more than 1e-06"),
    "alpha-huge": (one_target(_rand(2, 320), _rand(320, 2), 3e38), r"overflow float32"),
    "alpha-nan": (one_target(_rand(2, 320), _rand(320, 2), float("nan")), r"alpha is nan"),
    "alpha-inf": (one_target(_rand(2, 320), _rand(320, 2), float("inf")), r"alpha is inf"),
    "nan-down": (one_target(_rand(2, 320).index_fill_(1, torch.tensor([3]), float("nan")), _rand(320, 2)),
                 r"down tensor contains NaN"),
    "inf-up": (one_target(_rand(2, 320), _rand(320, 2).index_fill_(0, torch.tensor([5]), float("inf"))),
               r"up tensor contains NaN or infinite"),
}


@pytest.mark.parametrize("case", list(DEGENERATE))
def test_degenerate_loras_are_refused_naming_file_and_key(tmp_path, capsys, case):
    sd, why = DEGENERATE[case]
    f = tmp_path / f"hostile_{case}.safetensors"
    save_file(sd, str(f))
    pattern = re.escape(f.name) + r": unet:down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn1\.to_q: .*" + why
    with pytest.raises(LoraFormatError, match=pattern) as e:
        load_lora(f)
    assert isinstance(e.value, SafeT2IError) and not isinstance(e.value, ZeroDivisionError)
    for argv in (["lora", "inspect", str(f)], ["lora", "inspect", str(f), "--base", "sd1", "--json"],
                 ["lora", "convert", str(f), "--to", "kohya", "--allow-unknown"]):
        assert main(argv) == 4
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err and "ZeroDivision" not in captured.err
        assert re.search(pattern, _only_error(captured.err)), captured.err
        assert "patched" not in captured.out
    _no_output(tmp_path)


def test_only_the_degenerate_target_is_named_and_healthy_files_still_load(tmp_path):
    sd = duo_state(rank=2)
    victim = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_v"
    sd[victim + ".lora.up.weight"] = torch.zeros_like(sd[victim + ".lora.up.weight"])
    save_file(sd, str(tmp_path / "one_zeroed.safetensors"))
    with pytest.raises(LoraFormatError, match=r"one_zeroed\.safetensors: unet:mid_block\.attentions\.0\."
                                              r"transformer_blocks\.0\.attn1\.to_v: up tensor "
                                              + re.escape(victim) + r"\.lora\.up\.weight is all zeros"):
        load_lora(tmp_path / "one_zeroed.safetensors")
    # no false refusals: a zero column (one rank unused), tiny but normal values, scale 1e-3
    up = _rand(320, 2)
    up[:, 1] = 0
    save_file(one_target(_rand(2, 320) * 1e-4, up, 2e-3), str(tmp_path / "fine.safetensors"))
    (t,) = load_lora(tmp_path / "fine.safetensors").targets
    assert t.scale == pytest.approx(1e-3)


def test_adapter_config_alpha_zero_is_refused(tmp_path):
    f = tmp_path / "adapter_model.safetensors"              # PEFT's own layout: the folder's config applies
    save_file(duo_state(rank=2, layout="peft-unet"), str(f))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 0}))
    with pytest.raises(LoraFormatError, match=r"adapter_model\.safetensors: unet:.*alpha 0 \(adapter_config\.json\) "
                                              r"makes its scale 0"):
        load_lora(f)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": -4}))
    with pytest.raises(LoraFormatError, match="INVERTS"):
        load_lora(f)


@pytest.mark.parametrize("kind", ["zero-up", "alpha-0", "rank-0"])
def test_a_noop_lora_is_never_proven_patched_by_a_host(tmp_path, kind):
    """The diffusers host's proof (``coverage.applied``) never sees a no-op file: load_lora refuses it
    before anything is merged, and the pipeline's weights stay bit-identical."""
    from safet2i.diffusers_adapter import load_safety_lora
    from safet2i.lora.arch import UNetConfig, unet_modules
    from tiny_diffusers import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(tmp_path)
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    mods = [m for m in unet_modules(UNetConfig.from_diffusers(pipe.unet.config)) if ".attn1." in m.diffusers]
    sd = {}
    for m in mods:
        stem = "lora_unet_" + m.diffusers.replace(".", "_")
        down, up, alpha = _rand(2, m.shape[1]), torch.zeros(m.shape[0], 2), None
        if kind == "alpha-0":
            up, alpha = _rand(m.shape[0], 2), 0.0
        elif kind == "rank-0":
            down, up = torch.zeros(0, m.shape[1]), torch.zeros(m.shape[0], 0)
        sd.update(one_target(down, up, alpha, stem))
    save_file(sd, str(tmp_path / f"{kind}.safetensors"))
    with pytest.raises(LoraFormatError, match=rf"{kind}\.safetensors: unet:"):
        load_safety_lora(pipe, tmp_path / f"{kind}.safetensors")
    assert all(torch.equal(p, before[n]) for n, p in pipe.unet.named_parameters())


# ============================================================================ 3. safet2i convert (pickles)

def test_nested_containers_get_stable_dotted_names_and_skipped_leaves_are_listed(tmp_path, capsys):
    obj = {"a": [{"b": torch.ones(2)}, (torch.zeros(3), 7)], "n": 5, "s": "text", 0: torch.full((1,), 2.0),
           "none": None}
    src = tmp_path / "nested.pt"
    torch.save(obj, src)
    assert main(["convert", str(src)]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "3 tensors" in out
    for item in ("a.1.1 (int: not a tensor)", "n (int: not a tensor)", "s (str: not a tensor)",
                 "none (NoneType: not a tensor)"):
        assert item in out
    got = load_file(str(tmp_path / "nested.safetensors"))
    assert set(got) == {"a.0.b", "a.1.0", "0"}
    assert torch.equal(got["a.0.b"], torch.ones(2)) and torch.equal(got["0"], torch.full((1,), 2.0))
    assert json.loads(_meta(tmp_path / "nested.safetensors")["safet2i_skipped"]) == [
        "a.1.1 (int: not a tensor)", "n (int: not a tensor)", "s (str: not a tensor)", "none (NoneType: not a tensor)"]
    # the same names through the API, every time
    rep = convert_pickle_report(src, tmp_path / "again.safetensors")
    assert rep.tensors == ["a.0.b", "a.1.0", "0"] and len(rep.skipped) == 4


def test_state_dict_siblings_are_listed_with_their_tensors(tmp_path, capsys, caplog):
    src = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3,
                "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(2)}}}]}, src)
    assert main(["convert", str(src)]) == 0
    out = capsys.readouterr().out
    assert "epoch (beside state_dict: int)" in out
    assert "optimizer_states (beside state_dict: list, holding 1 tensor, not stored)" in out
    assert set(load_file(str(tmp_path / "model.safetensors"))) == {"w"}
    with caplog.at_level(logging.WARNING):
        convert_pickle(src, tmp_path / "api.safetensors")    # the Path API logs what it did not store
    assert "optimizer_states (beside state_dict" in caplog.text


@pytest.mark.parametrize("obj,first,second", [
    ({"a.b": torch.ones(1), "a": {"b": torch.zeros(1)}}, "['a.b']", "['a']['b']"),
    ({0: torch.ones(1), "0": torch.zeros(1)}, "[0]", "['0']"),
    ({"x": [torch.ones(1)], "x.0": torch.zeros(1)}, "['x'][0]", "['x.0']"),
], ids=["dotted-key", "int-and-str-key", "list-and-key"])
def test_colliding_names_are_an_error_naming_both(tmp_path, capsys, obj, first, second):
    src = tmp_path / "collide.pt"
    torch.save(obj, src)
    assert main(["convert", str(src)]) == 4
    msg = _only_error(_err(capsys))
    assert "two tensors would both be stored as" in msg and first in msg and second in msg
    assert sorted(os.listdir(tmp_path)) == ["collide.pt"]


def test_tensors_safetensors_cannot_store_are_refused_not_dropped(tmp_path, capsys):
    src = tmp_path / "sparse.pt"
    torch.save({"w": torch.ones(2), "s": torch.eye(3).to_sparse()}, src)
    assert main(["convert", str(src)]) == 4
    msg = _only_error(_err(capsys))
    assert "will not drop them" in msg and "s (a sparse_coo tensor)" in msg
    assert sorted(os.listdir(tmp_path)) == ["sparse.pt"]


def test_no_tensors_and_self_reference(tmp_path, capsys):
    torch.save({"epoch": 1}, tmp_path / "empty.pt")
    assert main(["convert", str(tmp_path / "empty.pt")]) == 4
    assert "contains no tensors (only: epoch (int: not a tensor))" in _err(capsys)
    loop: list = [torch.ones(1)]
    loop.append(loop)
    torch.save({"l": loop}, tmp_path / "loop.pt")
    assert main(["convert", str(tmp_path / "loop.pt")]) == 0
    assert "l.1 (refers to itself)" in capsys.readouterr().out
    assert set(load_file(str(tmp_path / "loop.safetensors"))) == {"l.0"}


class Payload:
    def __reduce__(self):
        return (print, ("pickle code ran",))


class Custom:
    pass


@pytest.mark.parametrize("case", ["reduce-zip", "reduce-legacy", "class", "blocked-module"])
def test_pickles_needing_code_are_refused_naming_the_global_without_torchs_advice(tmp_path, capsys, case):
    hostile = {"reduce-zip": Payload(), "reduce-legacy": Payload(), "class": Custom(), "blocked-module": os.system}
    obj = {"w": torch.ones(2), "x": hostile[case]}
    src = tmp_path / "evil.pt"
    torch.save(obj, src, _use_new_zipfile_serialization=case != "reduce-legacy")
    want = {"class": f"{__name__}.Custom",
            "blocked-module": f"{os.system.__module__}.system"}.get(case, "builtins.print")
    assert main(["convert", str(src)]) == 4
    captured = capsys.readouterr()
    msg = _only_error(captured.err)
    assert msg.startswith(f"{src}: cannot be read safely with torch.load(weights_only=True): it needs {want}, ")
    assert "pickle code ran" not in captured.out + captured.err
    for advice in TORCH_ADVICE:
        assert advice not in captured.err, advice
    with pytest.raises(ModelLoadError) as e:
        convert_pickle(src)
    assert want in str(e.value) and e.value.__cause__ is None and e.value.__suppress_context__
    for advice in TORCH_ADVICE:
        assert advice not in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["evil.pt"]


def test_damaged_pickle_message_has_no_torch_advice(tmp_path, capsys):
    src = tmp_path / "junk.pt"
    src.write_bytes(b"PK\x03\x04" + b"garbage" * 20)
    assert main(["convert", str(src)]) == 4
    err = _err(capsys)
    assert "cannot be read safely" in err and not any(a in err for a in TORCH_ADVICE)


def _misnamed_pickle_lora(path):
    """A real (tiny) LoRA, pickled, under a .safetensors name: what some download sites serve."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = one_target(_rand(2, 320), _rand(320, 2, seed=1), 2.0)
    torch.save(sd, path)
    return sd


def _hint_command(err: str) -> list[str]:
    m = re.search(r"Convert it once with: (safet2i convert .+?) \(it uses", err)
    assert m, err
    return shlex.split(m.group(1))


@pytest.mark.parametrize("folder", ["plain", "with space's"])
def test_hint_for_a_pickle_named_safetensors_works_when_followed(tmp_path, capsys, folder):
    f = tmp_path / folder / "downloaded.safetensors"
    sd = _misnamed_pickle_lora(f)
    assert main(["lora", "inspect", str(f)]) == 4
    err = _err(capsys)
    assert "pickle content" in err
    argv = _hint_command(err)
    assert argv[0] == "safet2i"
    assert main(argv[1:]) == 0                               # followed literally
    out = capsys.readouterr().out
    written = f.with_name("downloaded.converted.safetensors")
    assert f"wrote {written}" in out and "downloaded.converted.safetensors next to it" in err
    got = read_safetensors(written).tensors
    assert got.keys() == sd.keys() and all(torch.equal(got[k], v) for k, v in sd.items())
    assert main(["lora", "inspect", str(written)]) == 0      # and the loaders take the result
    assert "kohya" in capsys.readouterr().out
    # the same through the loader API's message
    with pytest.raises(ModelLoadError) as e:
        load_lora(f)
    assert _hint_command(str(e.value)) == argv


def test_hint_for_a_pickle_suffix_works_when_followed(tmp_path, capsys):
    f = tmp_path / "old.ckpt"
    _misnamed_pickle_lora(f)
    assert main(["lora", "inspect", str(f)]) == 4
    argv = _hint_command(_err(capsys))
    assert main(argv[1:]) == 0
    assert main(["lora", "inspect", str(tmp_path / "old.safetensors")]) == 0


def test_convert_refuses_a_real_safetensors_file_and_never_overwrites(tmp_path, capsys):
    f = tmp_path / "real.safetensors"
    save_file({"w": torch.ones(2)}, str(f))
    assert main(["convert", str(f)]) == 4
    assert "already a safetensors file" in _err(capsys)
    src = tmp_path / "p.pt"
    torch.save({"w": torch.ones(2)}, src)
    assert main(["convert", str(src), "--out", str(f)]) == 4
    assert "already exists" in _err(capsys) and torch.equal(load_file(str(f))["w"], torch.ones(2))
    assert main(["convert", str(src), "--out", str(src)]) == 4
    assert "would replace the input" in _err(capsys)


# ============================================================================ identity survives conversion

def test_a_converted_release_is_still_held_to_its_base(tmp_path, capsys):
    """Before: `lora convert` of DUO's SD1 release gave duo_….kohya.safetensors, a name the manifest
    does not know, which fits SD2 by shape, so every loader accepted the copy on SD2 while refusing
    the original. The copy's metadata now names the release; with the release's contents the
    loaders hold it to SD1 (a claim can only add a refusal, never vouch)."""
    from safet2i.diffusers_adapter import load_safety_lora
    from lora_fixtures import UNET_KW, meta_unet

    f = tmp_path / "duo_nudity_beta500.safetensors"
    save_file(duo_state(), str(f))
    assert _convert(f) == 0
    copy = tmp_path / "duo_nudity_beta500.kohya.safetensors"
    assert _meta(copy)["safet2i_release"] == "duo-nudity-b500"
    lf = load_lora(copy)
    assert lf.entry is None and lf.architectures == ["sd1", "sd2"]
    check_made_for(lf, "sd1", "x")
    with pytest.raises(ModelLoadError, match=r"architecture sd1\).*applied to is sd2.*Identified by its metadata "
                                             r"\(converted by safet2i from duo-nudity-b500\)"):
        check_made_for(lf, "sd2", f"Safety LoRA {copy.name}")
    with pytest.raises(ModelLoadError, match="Identified by its metadata"):
        load_safety_lora(types.SimpleNamespace(unet=meta_unet(UNET_KW["sd2"])), copy)
    assert _convert(copy, "--base", "sd2", "--out", tmp_path / "again.safetensors") == 4
    assert "Identified by its metadata" in _err(capsys)
    assert "duo-nudity-b500" in inspect_lora(copy)["identified_as"]
    # a copy of the release renamed *and* converted again keeps the claim
    assert _convert(copy, "--out", tmp_path / "third.safetensors") == 0
    assert _meta(tmp_path / "third.safetensors")["safet2i_release"] == "duo-nudity-b500"
    # a forged claim on other contents adds nothing (and takes nothing away): an unknown file
    other = tmp_path / "mine.safetensors"
    save_file(duo_state(rank=2), str(other), metadata={"converted_by": "safet2i lora convert",
                                                        "safet2i_release": "duo-nudity-b500"})
    lf = load_lora(other)
    check_made_for(lf, "sd2", "x")
    assert "identified_as" not in inspect_lora(other)


def test_legacy_torch_format_converts(tmp_path, capsys):
    src = tmp_path / "legacy.pth"
    torch.save({"a": [torch.ones(2)], "b": torch.zeros(1)}, src, _use_new_zipfile_serialization=False)
    assert main(["convert", str(src)]) == 0
    assert set(load_file(str(tmp_path / "legacy.safetensors"))) == {"a.0", "b"}
