"""The trainers' base model from a single-file SD1.x ``.safetensors`` checkpoint (original LDM layout).

``safet2i.train.common.load_base`` → ``safet2i.bench.cli.load_pipeline`` →
``StableDiffusionPipeline.from_single_file(path, local_files_only=True, config=DIR)``. A tiny
random SD1-shaped pipeline is written as one LDM-layout file by ``ldm_single_file`` (names
derived from the LDM architecture) and read back through diffusers' own converters, the
independent reference for the names: every weight must come back unchanged. Then a trainer runs
on the file through ``safet2i train duo``, and the error paths are checked. No downloads.
"""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from safetensors import safe_open  # noqa: E402

from safet2i.cli import main  # noqa: E402
from safet2i.errors import SafeT2IError  # noqa: E402
from safet2i.train.common import load_base  # noqa: E402

from ldm_single_file import (  # noqa: E402
    LDM_PREFIXES, TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, write_ldm_checkpoint,
)

# pieces of diffusers' names that the original LDM layout never uses
DIFFUSERS_MARKERS = ("down_blocks", "up_blocks", "mid_block", "resnets", "attentions", "time_embedding",
                     "conv_norm_out", "conv_shortcut", "downsamplers", "upsamplers", "group_norm",
                     "time_emb_proj")


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory):
    """``(tiny pipeline, its diffusers folder, the same weights as one LDM .safetensors file)``."""
    from tiny_diffusers import tiny_sd_pipeline

    root = tmp_path_factory.mktemp("single_file")
    pipe = tiny_sd_pipeline(root / "build", seed=3)
    folder = root / "tiny-sd1"
    pipe.save_pretrained(str(folder), safe_serialization=True)
    path = root / "tiny-sd1.safetensors"
    write_ldm_checkpoint(pipe, path)
    return pipe, folder, path


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache and no name resolution: records every host a download tried
    (HF_HUB_OFFLINE off, so the package's own behaviour shows whatever the environment sets)."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    tried: list[str] = []

    def refuse(host, *args, **kwargs):
        tried.append(str(host))
        raise socket.gaierror(socket.EAI_NONAME, "name resolution refused by the test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return tried


def _keys(path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), framework="pt") as fh:
        return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}


def test_the_file_is_in_the_ldm_layout(sd1_file):
    pipe, _folder, path = sd1_file
    keys = _keys(path)
    assert all(k.startswith(LDM_PREFIXES) for k in keys)
    assert not [k for k in keys if any(m in k for m in DIFFUSERS_MARKERS)]
    n = {p: sum(k.startswith(p) for k in keys) for p in LDM_PREFIXES}
    assert n[UNET_PREFIX] == len(pipe.unet.state_dict())
    assert n[TEXT_PREFIX] == len(pipe.text_encoder.state_dict()) + 1          # + embeddings.position_ids
    assert n[VAE_PREFIX] == len(pipe.vae.state_dict())
    # landmarks of the published layouts (openaimodel UNetModel, LDM AutoencoderKL)
    for k in ("input_blocks.0.0.weight", "time_embed.0.weight", "time_embed.2.bias", "out.0.weight",
              "out.2.weight", "input_blocks.1.0.in_layers.0.weight", "input_blocks.2.0.op.weight",
              "input_blocks.3.0.skip_connection.weight",
              "input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight", "middle_block.0.emb_layers.1.weight",
              "middle_block.1.norm.weight", "middle_block.2.out_layers.3.weight",
              "output_blocks.1.2.conv.weight", "output_blocks.3.0.out_layers.0.bias"):
        assert UNET_PREFIX + k in keys, k
    assert keys[UNET_PREFIX + "input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight"] == (64, 32)
    for k in ("encoder.down.0.block.0.norm1.weight", "encoder.down.0.downsample.conv.weight",
              "encoder.down.1.block.0.nin_shortcut.weight", "encoder.mid.block_1.conv1.weight",
              "encoder.mid.block_2.norm2.bias", "encoder.norm_out.weight",
              "decoder.up.1.upsample.conv.weight",
              "decoder.up.0.block.0.nin_shortcut.weight", "decoder.norm_out.bias", "quant_conv.weight",
              "post_quant_conv.weight"):
        assert VAE_PREFIX + k in keys, k
    for k in ("norm", "q", "k", "v", "proj_out"):                           # attention as 1x1 convolutions
        shape = (64,) if k == "norm" else (64, 64, 1, 1)
        assert keys[VAE_PREFIX + f"decoder.mid.attn_1.{k}.weight"] == shape
    # decoder.up.0 is the full-resolution level: diffusers' last up block (64 -> 32 channels)
    assert keys[VAE_PREFIX + "decoder.up.0.block.0.conv1.weight"] == (32, 64, 3, 3)
    assert TEXT_PREFIX + "embeddings.position_embedding.weight" in keys


def test_single_file_round_trips_through_load_base(sd1_file):
    pipe, folder, path = sd1_file
    back = load_base(path, config=str(folder), device="cpu")
    assert type(back).__name__ == "StableDiffusionPipeline"
    for name in ("unet", "text_encoder", "vae"):
        want, got = getattr(pipe, name).state_dict(), getattr(back, name).state_dict()
        assert set(got) == set(want), name
        changed = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
        assert changed == [], (name, changed[:5])
    assert back.unet.dtype == torch.float32 and back.safety_checker is None


def test_duo_trains_on_the_single_file(sd1_file, tmp_path, capsys):
    _pipe, folder, path = sd1_file
    from PIL import Image

    rng = np.random.default_rng(0)
    for sub in ("unsafe", "safe"):
        (tmp_path / "pairs" / sub).mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "pairs" / sub / f"{i}.png")
    out = tmp_path / "duo.safetensors"
    rc = main(["train", "duo", "--model", str(path), "--config", str(folder), "--out", str(out), "--pairs",
               str(tmp_path / "pairs"), "--steps", "1", "--rank", "2", "--lr", "1e-3", "--prior-weight", "1",
               "--device", "cpu", "--threads", "1", "-q"])
    assert rc == 0, capsys.readouterr().err
    assert "DUO: 2 pairs, 1 steps" in capsys.readouterr().out
    assert out.is_file()
    with safe_open(str(out), framework="pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    assert tensors and all(torch.isfinite(v).all() for v in tensors.values())
    assert any(k.startswith("lora_unet_") for k in tensors)
    assert meta["safet2i_method"] == "duo"
    assert meta["safet2i_base_model"] == path.name
    assert meta["safet2i_base_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not out.with_name(out.name + ".partial").exists()                 # the checkpoint folder is gone


def test_single_file_without_config_asks_for_config_and_never_contacts_the_hub(sd1_file, offline_hub):
    _pipe, _folder, path = sd1_file
    with pytest.raises(SafeT2IError, match="--config") as exc:
        load_base(path, device="cpu")
    assert str(path) in str(exc.value) and "not in the local Hugging Face cache" in str(exc.value)
    assert "nothing is downloaded" in str(exc.value)
    assert offline_hub == []          # diffusers alone would retry a Hub download here


def test_single_file_without_config_uses_configs_already_in_the_hub_cache(sd1_file, offline_hub, tmp_path):
    """diffusers' own detection names the configs' repository; when a snapshot of it is in the
    local cache, the file loads with those configs and still nothing is contacted."""
    import shutil

    import huggingface_hub.constants as hf_constants
    from diffusers.loaders.single_file_utils import fetch_diffusers_config

    pipe, folder, path = sd1_file
    with safe_open(str(path), framework="pt") as fh:
        repo = fetch_diffusers_config({k: fh.get_tensor(k) for k in fh.keys()})["pretrained_model_name_or_path"]
    # the cache layout huggingface_hub documents: models--{org}--{name}/refs/main + snapshots/{commit}/
    entry = Path(hf_constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--"))
    commit = "0" * 40
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    snap = entry / "snapshots" / commit
    for f in folder.rglob("*"):
        if f.is_file() and f.suffix != ".safetensors":      # configs only, as diffusers would fetch
            (snap / f.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, snap / f.relative_to(folder))
    back = load_base(path, device="cpu")
    for name in ("unet", "text_encoder", "vae"):
        ref, got = getattr(pipe, name).state_dict(), getattr(back, name).state_dict()
        assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert offline_hub == []


def test_pickled_checkpoints_are_refused(sd1_file, tmp_path, capsys):
    _pipe, folder, _path = sd1_file
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"PK\x03\x04 not loaded")
    with pytest.raises(SafeT2IError, match=r"\.safetensors.*safet2i convert"):
        load_base(ckpt, config=str(folder), device="cpu")
    out = tmp_path / "d.safetensors"
    rc = main(["train", "duo", "--model", str(ckpt), "--config", str(folder), "--out", str(out),
               "--unsafe-prompt", "a", "--safe-prompt", "b", "--device", "cpu", "-q"])
    assert rc == 4 and ".safetensors" in capsys.readouterr().err
    assert not out.exists()
