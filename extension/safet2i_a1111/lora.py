"""Safety LoRAs (DUO, SC-DPO-style, ...) through the webui's built-in networks mechanism.

Why the built-in mechanism and not our own weight merge: the webui's Lora extension (A1111
``extensions-builtin/Lora``, Forge ``sd_forge_lora``) already owns the model weights (A1111
patches them lazily in the layers' forward and restores them from its own backups; Forge
clones the UNet/CLIP patchers and caches the result per LoRA set). A second mechanism
writing into the same weights would fight it. So SafeT2I:

1. ``process`` — :func:`prepare`: resolves the user's choice inside the allowed folders only
   (webui ``models/Lora``, webui ``models/safety_models``, the pack's ``models/safety_models``;
   ``..``, absolute paths and symlinks leaving the folder are refused), inspects the file with
   the core (:func:`safet2i.lora.load_lora`: safetensors only, key layout, architecture) and
   checks its coverage against the loaded model's architecture (SD1/SD2/SDXL inventories;
   Forge's Flux: the transformer's own BFL-named weights, :func:`forge_flux`; Forge's SD3/SD3.5:
   its MMDiT's SAI-named weights, :func:`forge_sd3`):
   another architecture or a partial match is refused unless "allow partial" is on.
   A kohya file inside ``models/Lora`` is used as it is; anything else (DUO's diffusers keys,
   PEFT, LDM names, files outside ``models/Lora``) is converted to kohya keys
   (:func:`safet2i.lora.to_kohya`, alpha written explicitly) into
   ``models/Lora/safet2i-converted/`` under a name derived from the source's sha256; the file
   is read back and compared tensor by tensor. A Flux or SD3 file is always written, in Forge's
   native kohya names (``lora_unet_double_blocks_0_img_attn_qkv``,
   ``lora_unet_joint_blocks_0_x_block_attn_qkv``: diffusers/PEFT
   ``to_q``/``to_k``/``to_v`` fused into the stacked weight, :func:`safet2i.lora.keys.to_native_kohya`),
   and its read-back effect is compared per module with the source's. User files are never
   overwritten: an existing file there that SafeT2I did not write is an error.
2. ``before_process_batch`` — :func:`add_tag`: appends ``<lora:NAME:STRENGTH>`` to the batch's
   prompts in place (the documented way extensions add extra networks; the infotext's
   "Prompt" is built from ``p.all_prompts`` and does not show it); the hires pass gets the same
   entry in ``p.hr_extra_network_data`` (:func:`add_hires`, from ``process_batch``).
3. ``after_extra_networks_activate`` — :func:`verify_loaded`: after the webui loaded its
   networks, proves that ours is among them with every target weight matched (A1111:
   ``networks.loaded_networks[...].modules``; Forge: the LoRA patches recorded on the
   patched UNet and CLIP). A network the webui did not load, or loaded partially, is an
   error: the job's images are blocked.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from safet2i.errors import SafeT2IError
from safet2i.lora import (
    check, check_made_for, delta_mismatch, load_lora, read_safetensors, require_full, resolver_for, to_kohya,
)
from safet2i.lora.arch import ARCHITECTURES
from safet2i.lora.dit_arch import build as build_dit, match_config
from safet2i.lora.keys import normalise_dit, parse, to_native_kohya

CACHE_DIRNAME = "safet2i-converted"
SAFETY_DIRNAME = "safety_models"
PACK_SAFETY = Path(__file__).resolve().parents[2] / "models" / "safety_models"
NONE = "None"
MARK = "safet2i"           # metadata converted_by of the files we write
_KOHYA_FORMATS = {"kohya", "LDM/ComfyUI names", "DoRA"}


class LoraLayerError(SafeT2IError):
    """The safety LoRA cannot be (fully) applied; the job's images are blocked."""


# --------------------------------------------------------------------------- folders and choices

def _webui_models() -> Path | None:
    try:
        from modules import paths  # noqa: PLC0415
        return Path(paths.models_path)
    except Exception:  # noqa: BLE001 - outside the webui
        return None


def _lora_dir() -> Path | None:
    try:
        from modules import shared  # noqa: PLC0415
        d = getattr(shared.cmd_opts, "lora_dir", None)
        if d:
            return Path(d)
    except Exception:  # noqa: BLE001
        pass
    models = _webui_models()
    return models / "Lora" if models else None


def roots() -> dict[str, Path]:
    """Folders a safety LoRA may be chosen from, by label."""
    out: dict[str, Path] = {}
    lora = _lora_dir()
    if lora:
        out["Lora"] = lora
    models = _webui_models()
    if models:
        out[SAFETY_DIRNAME] = models / SAFETY_DIRNAME
    out["pack"] = PACK_SAFETY
    return out


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except (ValueError, OSError):
        return False


def list_choices(folders: dict[str, Path] | None = None) -> list[str]:
    """``["None", "Lora/duo.safetensors", "safety_models/x.safetensors", ...]`` (our own cache excluded)."""
    folders = roots() if folders is None else folders
    out = [NONE]
    for label, root in folders.items():
        if not root.is_dir():
            continue
        cache = root / CACHE_DIRNAME
        for f in sorted(root.rglob("*.safetensors")):
            if f.is_file() and _inside(f, root) and not (label == "Lora" and _inside(f, cache)):
                out.append(f"{label}/{f.relative_to(root).as_posix()}")
    return out


def resolve_choice(choice: str, folders: dict[str, Path] | None = None) -> Path:
    """The file a choice names, only inside its folder (UI and API values alike)."""
    folders = roots() if folders is None else folders
    if not isinstance(choice, str) or "/" not in choice or "\x00" in choice or "\\" in choice:
        raise LoraLayerError(f"safety LoRA {choice!r}: not a choice of the list (label/relative path)")
    label, rel = choice.split("/", 1)
    root = folders.get(label)
    parts = Path(rel).parts
    if root is None or not rel or Path(rel).is_absolute() or any(p in ("..", ".", "") for p in rel.split("/")) \
            or not parts:
        raise LoraLayerError(f"safety LoRA {choice!r}: refused (unknown folder or a path outside it)")
    if not rel.lower().endswith(".safetensors"):
        raise LoraLayerError(f"safety LoRA {choice!r}: only .safetensors files are loaded "
                             "(convert a pickle once with: safet2i convert FILE)")
    path = root / rel
    if not _inside(path, root):
        raise LoraLayerError(f"safety LoRA {choice!r}: refused (it leads outside {label}/)")
    if label == "Lora" and _inside(path, root / CACHE_DIRNAME):
        raise LoraLayerError(f"safety LoRA {choice!r}: choose the original file, not SafeT2I's converted copy")
    if not path.is_file():
        raise LoraLayerError(f"safety LoRA {choice!r}: no such file")
    return path


# --------------------------------------------------------------------------- the loaded model

def model_architecture(sd_model) -> str:
    """``sd1`` / ``sd2`` / ``sdxl`` from the webui's own flags (A1111 1.6+, Forge)."""
    kind = type(sd_model).__name__
    if getattr(sd_model, "is_sdxl", False):
        conditioner = getattr(sd_model, "conditioner", None)
        texts = [e for e in getattr(conditioner, "embedders", []) if hasattr(e, "tokenize_line")]
        if "Refiner" in kind or (conditioner is not None and len(texts) == 1):
            raise LoraLayerError("safety LoRAs are made for base models; the loaded model is an SDXL refiner")
        return "sdxl"
    if getattr(sd_model, "is_sd2", False):
        return "sd2"
    if getattr(sd_model, "is_sd1", False):
        return "sd1"
    raise LoraLayerError(f"SafeT2I safety LoRAs support SD1.x, SD2.x and SDXL; the loaded model ({kind}) is none "
                         "of them")


@dataclass
class ForgeFlux:
    """Forge's Flux transformer (``backend/nn/flux.py``, BFL weight names) as the LoRA layer sees
    it: its ``KModel``, the core's module inventory for its sizes, the architecture name and
    the shapes of its ``diffusion_model.…`` parameters."""

    kmodel: object
    inventory: object
    arch: str
    params: dict
    family: str = "flux"

    @property
    def title(self) -> str:
        return {"flux": "Forge's Flux transformer", "sd3": "Forge's SD3/SD3.5 MMDiT"}[self.family]

    def host_key(self, native: str) -> str:
        return f"diffusion_model.{native}.weight"


def forge_family(sd_model) -> str | None:
    """``"flux"`` or ``"sd3"`` for Forge's Flux or SD3/SD3.5 (by the UNet patcher's
    ``KModel.config.huggingface_repo``, as :func:`forge_flux` / :func:`forge_sd3` tell them, without
    building an inventory), else None."""
    fo = getattr(sd_model, "forge_objects", None)
    kmodel = getattr(getattr(fo, "unet", None), "model", None)
    repo = str(getattr(getattr(kmodel, "config", None), "huggingface_repo", None) or "").lower()
    if kmodel is None:
        return None
    return "flux" if "flux" in repo else "sd3" if "stable-diffusion-3" in repo else None


def forge_flux(sd_model) -> ForgeFlux | None:
    """Forge's Flux (the UNet patcher's ``KModel.config.huggingface_repo`` names Flux, the test
    Forge's own LoRA key maps use), else None. The inventory is built for the sizes of the
    model's own weights (hidden size from ``img_in``, blocks counted, ``txt_in`` / ``vector_in``
    widths, ``guidance_in`` present or not) and every Linear weight it lists must be one of the
    model's parameters with that shape: a quantized (NF4/GGUF) or unknown layout is refused."""
    if forge_family(sd_model) != "flux":
        return None
    kmodel = sd_model.forge_objects.unet.model
    prefix = "diffusion_model."
    params = {k[len(prefix):]: tuple(v.shape) for k, v in kmodel.named_parameters() if k.startswith(prefix)}

    def blocks(kind: str) -> int:
        found = {int(k.split(".")[1]) for k in params if k.startswith(kind + ".") and k.split(".")[1].isdigit()}
        return max(found) + 1 if found else 0

    try:
        hidden, img_in = params["img_in.weight"]
        cfg = dict(num_layers=blocks("double_blocks"), num_single_layers=blocks("single_blocks"),
                   num_attention_heads=1, attention_head_dim=hidden, in_channels=img_in, patch_size=1,
                   out_channels=params["final_layer.linear.weight"][0],
                   joint_attention_dim=params["txt_in.weight"][1],
                   pooled_projection_dim=params["vector_in.in_layer.weight"][1],
                   guidance_embeds="guidance_in.in_layer.weight" in params)
    except (KeyError, ValueError) as exc:
        raise LoraLayerError(f"Forge's Flux transformer has no {exc} weight of the BFL layout (a quantized NF4/GGUF "
                             "or unknown model); SafeT2I cannot map a safety LoRA to it") from exc
    inv, arch = _checked_inventory("flux", cfg, params, "Flux transformer", "BFL", "Flux model")
    return ForgeFlux(kmodel, inv, arch, params)


def forge_sd3(sd_model) -> ForgeFlux | None:
    """Forge's SD3 / SD3.5 (``backend/nn/mmditx.py`` ``MMDiTX``, SAI weight names
    ``joint_blocks.N.x_block.attn.qkv``; huggingface_guess names every SD3 checkpoint
    ``stable-diffusion-3…``, the test Forge's LoRA key maps use), else None. The inventory is built
    for the sizes of the model's own weights (hidden size, patch size and input channels from
    ``x_embedder.proj``, joint blocks counted, blocks with ``x_block.attn2`` = SD3.5 Medium's dual
    attention, ``context_embedder`` / ``y_embedder`` widths) and every weight it lists must be one
    of the model's parameters with that shape: a quantized (NF4/GGUF) or unknown layout is refused.
    The released sizes (SD3 Medium, SD3.5 Medium, SD3.5 Large) are named by their shapes."""
    if forge_family(sd_model) != "sd3":
        return None
    kmodel = sd_model.forge_objects.unet.model
    prefix = "diffusion_model."
    params = {k[len(prefix):]: tuple(v.shape) for k, v in kmodel.named_parameters() if k.startswith(prefix)}
    layers = {int(k.split(".")[1]) for k in params if k.startswith("joint_blocks.") and k.split(".")[1].isdigit()}
    try:
        hidden, inc, patch, _ = params["x_embedder.proj.weight"]
        cap, joint = params["context_embedder.weight"]
        cfg = dict(num_layers=max(layers) + 1 if layers else 0, num_attention_heads=1, attention_head_dim=hidden,
                   caption_projection_dim=cap, in_channels=inc, patch_size=patch,
                   out_channels=params["final_layer.linear.weight"][0] // (patch * patch),
                   joint_attention_dim=joint, pooled_projection_dim=params["y_embedder.mlp.0.weight"][1],
                   dual_attention_layers=tuple(sorted(i for i in layers
                                                      if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in params)))
    except (KeyError, ValueError) as exc:
        raise LoraLayerError(f"Forge's SD3/SD3.5 MMDiT has no {exc} weight of the SAI layout (a quantized NF4/GGUF "
                             "or unknown model); SafeT2I cannot map a safety LoRA to it") from exc
    inv, arch = _checked_inventory("sd3", cfg, params, "SD3/SD3.5 MMDiT", "SAI", "SD3 model")
    return ForgeFlux(kmodel, inv, arch, params, "sd3")


def _checked_inventory(family: str, cfg: dict, params: dict, what: str, layout: str, model: str):
    """The core's module inventory of ``family`` for ``cfg`` and its released-size name; every
    weight it lists must be one of the model's ``params`` with that shape (else refused)."""
    inv = build_dit(family, cfg)
    wrong = [n for n, nat in inv.natives.items() if params.get(f"{n}.weight") != tuple(nat.shape)]
    if wrong:
        raise LoraLayerError(f"Forge's {what} lacks {len(wrong)} weights of the {layout} layout with their shapes "
                             f"(e.g. {', '.join(wrong[:3])}: a quantized NF4/GGUF or unknown model); SafeT2I cannot "
                             "map a safety LoRA to it")
    return inv, match_config(family, cfg) or f"{family} (Forge {model} of no released size)"


def forge_dit(sd_model) -> ForgeFlux | None:
    """Forge's Flux or SD3/SD3.5 transformer (:func:`forge_flux`, :func:`forge_sd3`), else None."""
    return forge_flux(sd_model) or forge_sd3(sd_model)


# --------------------------------------------------------------------------- preparing the file

@dataclass
class SafetyLora:
    choice: str
    source: Path
    sha256: str
    arch: str
    name: str                      # the network name the webui resolves
    filename: Path                 # the file the webui loads
    targets: int                   # target weights the webui must load
    total: int                     # target weights in the source file
    strength: float = 1.0
    converted: bool = False
    formats: list[str] = field(default_factory=list)
    pending: bool = False          # tag added for this batch, not verified yet
    loaded: str = ""               # last verification summary
    sampled: list = field(default_factory=list)   # Forge: UNet patchers of the passes, checked after them
    host_keys: list = field(default_factory=list)  # Forge Flux/SD3: the weights the patches must be recorded on

    @property
    def tag(self) -> str:
        return f"<lora:{self.name}:{self.strength:g}>"

    def infotext(self) -> str:
        how = "converted to kohya" if self.converted else "as is"
        return f"{self.targets}/{self.total} {self.arch} sha256 {self.sha256[:12]} {how}"


def _is_kohya(lf) -> bool:
    return "kohya" in lf.formats and set(lf.formats) <= _KOHYA_FORMATS and \
        all(k.startswith(("lora_unet_", "lora_te")) for t in lf.targets for k in t.source_keys)


def prepare(choice: str, sd_model, strength: float = 1.0, allow_partial: bool = False,
            folders: dict[str, Path] | None = None, networks=None) -> SafetyLora:
    """Inspect, check coverage, convert if needed, and make the file known to the webui."""
    folders = roots() if folders is None else folders
    path = resolve_choice(choice, folders)
    lora_dir = folders.get("Lora")
    if lora_dir is None:
        raise LoraLayerError("the webui's Lora folder is unknown; the safety LoRA cannot be activated")
    lf = load_lora(path)
    flux = forge_dit(sd_model)
    arch = flux.arch if flux is not None else model_architecture(sd_model)
    # A known release: its sha256 / contents as the manifest says, made for this architecture.
    lf.verify_manifest()
    check_made_for(lf, arch, f"Safety LoRA {path.name}")
    if flux is not None:
        return _prepare_dit(choice, path, lf, flux, lora_dir, strength, allow_partial, networks)
    cov = check(lf.targets, resolver_for(arch), ARCHITECTURES[arch].title)
    require_full(cov, f"Safety LoRA {path.name}", allow_partial)
    matched = {s.target for s in cov.matched}
    targets = [t for t in lf.targets if t.name in matched]
    partial = len(targets) < len(lf.targets)
    networks = networks if networks is not None else sys.modules.get("networks")
    direct = _is_kohya(lf) and not partial and _inside(path, lora_dir) and not _inside(path, lora_dir / CACHE_DIRNAME) \
        and _alias_free(path.stem, path, networks)
    if direct:
        filename, name = path, path.stem
    else:
        filename = write_kohya_cache(lf, targets, arch, lora_dir, partial)
        name = filename.stem
    register(name, filename, networks)
    return SafetyLora(choice, path, lf.sha256, arch, name, filename, len(targets), len(lf.targets), float(strength),
                      not direct, list(lf.formats))


def _prepare_dit(choice, path, lf, flux: ForgeFlux, lora_dir: Path, strength, allow_partial, networks) -> SafetyLora:
    """Forge's Flux and SD3/SD3.5: the file's targets in diffusers naming (native names renamed, stacked
    native targets split exactly: :func:`safet2i.lora.keys.normalise_dit`), each matched to a
    module of the transformer whose native (BFL / SAI) weight the model has (coverage, refused unless full or
    "allow partial"), then written in native kohya names (pieces fused) for Forge's loader."""
    inv, what = flux.inventory, f"Safety LoRA {path.name}"
    targets = normalise_dit(lf.targets, inv)

    def resolve(t):
        if t.component != "unet" or t.naming != "diffusers" or t.module not in inv.modules:
            return None, None
        if f"{inv.owner[t.module]}.weight" not in flux.params:
            return None, None
        return f"unet.{t.module}", inv.modules[t.module].shape

    cov = check(targets, resolve, f"{flux.title} ({flux.arch})")
    require_full(cov, what, allow_partial)
    matched = {s.target for s in cov.matched}
    use = [t for t in targets if t.name in matched]
    natives = sorted({inv.owner[t.module] for t in use})
    partial = len(use) < len(targets)
    try:
        state = to_native_kohya(use, inv)
    except SafeT2IError as exc:
        raise LoraLayerError(f"{what}: {exc}") from exc
    filename = write_kohya_cache(lf, use, flux.family, lora_dir, partial, state=state, same_effect=(use, inv))
    register(filename.stem, filename, networks)
    out = SafetyLora(choice, path, lf.sha256, flux.arch, filename.stem, filename, len(natives),
                     len(natives) + len(cov.unmatched), float(strength), True, list(lf.formats))
    out.host_keys = [flux.host_key(n) for n in natives]
    return out


def _same_file(a, b) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def _alias_free(name: str, path: Path, networks) -> bool:
    """The webui resolves ``name`` to this very file (not another file with the same stem or alias)."""
    if networks is None:
        return True
    entry = getattr(networks, "available_network_aliases", {}).get(name)
    return entry is None or _same_file(getattr(entry, "filename", ""), path)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:48] or "lora"


def write_kohya_cache(lf, targets, arch: str, lora_dir: Path, partial: bool = False, state: dict | None = None,
                      same_effect: tuple | None = None) -> Path:
    """Write (or reuse) the kohya-key copy of ``lf`` in ``<lora_dir>/safet2i-converted/``
    (``state``: the tensors to write, default :func:`to_kohya` of ``targets``; ``same_effect``:
    ``(targets, inventory)`` of a transformer file, whose per-module effect the copy must have)."""
    from safetensors import safe_open  # noqa: PLC0415
    from safet2i.fileio import save_safetensors  # noqa: PLC0415

    cache = lora_dir / CACHE_DIRNAME
    if cache.is_symlink() or (cache.exists() and not cache.is_dir()):
        raise LoraLayerError(f"{cache} is not a plain folder; SafeT2I will not write there")
    cache.mkdir(parents=True, exist_ok=True)
    if not _inside(cache, lora_dir):
        raise LoraLayerError(f"{cache} leads outside the Lora folder; SafeT2I will not write there")
    out = cache / f"safet2i-{_slug(lf.path.stem)}-{lf.sha256[:12]}-{arch}{'-partial' if partial else ''}.safetensors"
    state = to_kohya(targets, single_text_encoder=arch != "sdxl") if state is None else state
    meta = {"converted_by": MARK, "source": lf.path.name, "source_sha256": lf.sha256, "architecture": arch,
            "targets": str(len(targets))}
    verified = (str(out), lf.sha256, arch, partial, tuple(sorted(state)))
    if out.is_symlink() or (out.exists() and not out.is_file()):
        raise LoraLayerError(f"{out} is not a plain file; SafeT2I will not overwrite it")
    if out.exists():
        try:
            with safe_open(str(out), framework="pt", device="cpu") as f:
                existing = dict(f.metadata() or {})
        except Exception:  # noqa: BLE001 - unreadable: not known to be ours
            existing = {}
        if existing.get("converted_by") != MARK:
            raise LoraLayerError(f"{out} exists and was not written by SafeT2I; it will not be overwritten "
                                 "(move it away)")
        # The same bytes as this conversion gives: its effect was compared with the source's once
        # in this process (ΔW module by module, seconds on a large transformer), not every job.
        if existing == meta and _written_ok(out, state, None if verified in _SAME_EFFECT else same_effect):
            if same_effect is not None:
                _SAME_EFFECT.add(verified)
            return out
    save_safetensors(out, state, meta)
    if not _written_ok(out, state, same_effect):
        raise LoraLayerError(f"{out}: the converted file does not read back as written")
    if same_effect is not None:
        _SAME_EFFECT.add(verified)
    return out


#: Kohya copies of transformer LoRAs whose effect was compared with their source in this process:
#: (copy path, source sha256, architecture, partial, its tensor names).
_SAME_EFFECT: set[tuple] = set()


def _written_ok(path: Path, state: dict, same_effect: tuple | None = None) -> bool:
    """Same keys and bit-identical tensors, and the core parses every target back; for a
    transformer copy (``same_effect``), every module's ΔW read back equals the source's
    (:func:`safet2i.lora.delta_mismatch`)."""
    import torch  # noqa: PLC0415

    try:
        wf = read_safetensors(path, hash_file=False)
        if set(wf.tensors) != set(state) or not all(torch.equal(wf.tensors[k], state[k]) for k in state):
            return False
        back = parse(wf.tensors)
        if len(back) != sum(k.endswith(".lora_down.weight") for k in state):
            return False
        if same_effect is None:
            return True
        src, inv = same_effect
        return delta_mismatch(src, normalise_dit(back, inv), key=lambda t: t.module) is None
    except SafeT2IError:
        return False


def register(name: str, filename: Path, networks=None) -> None:
    """Make ``name`` resolve to ``filename`` in the built-in Lora extension right away (a later
    rescan of the Lora folder finds the same file under the same name)."""
    networks = networks if networks is not None else sys.modules.get("networks")
    if networks is None:
        return          # verify_loaded fails closed if the Lora extension is missing
    aliases = getattr(networks, "available_network_aliases", None)
    entry = aliases.get(name) if aliases is not None else None
    if entry is not None and _same_file(getattr(entry, "filename", ""), filename):
        return
    network = sys.modules.get("network")
    if network is None or aliases is None:
        return
    entry = network.NetworkOnDisk(name, str(filename))
    networks.available_networks[name] = entry
    aliases[name] = entry


# --------------------------------------------------------------------------- activation and proof

def add_tag(prompts: list[str], lora: SafetyLora) -> None:
    """Append our ``<lora:...>`` tag to every prompt, in place (a tag of the same name the user
    wrote is replaced, so the safety strength is the one in effect)."""
    pattern = re.compile(r"<lora:" + re.escape(lora.name) + r"(?::[^>]*)?>")
    for i, prompt in enumerate(prompts):
        prompts[i] = f"{pattern.sub('', prompt).rstrip()} {lora.tag}"
    lora.pending = True


def add_hires(p, lora: SafetyLora) -> None:
    """The hires pass activates ``p.hr_extra_network_data`` (parsed from the hires prompts):
    give it our entry too, built by the webui's own tag parser, and mark the LoRA pending again:
    the hires pass must activate and verify it too (:func:`check_verified`)."""
    if not getattr(p, "enable_hr", False):
        return
    data = getattr(p, "hr_extra_network_data", None)
    if data is None:
        raise LoraLayerError("hires fix is on but the webui parsed no extra networks for the hires pass; the safety "
                             "LoRA cannot be added to it")
    from modules import extra_networks  # noqa: PLC0415

    _, ours = extra_networks.parse_prompts([lora.tag])
    entries = [e for e in data.get("lora", []) if not (getattr(e, "positional", None) or [None])[0] == lora.name]
    data["lora"] = entries + list(ours.get("lora", []))
    lora.pending = True


def check_verified(lora: SafetyLora, where: str) -> None:
    """After a batch's sampling (``postprocess_batch``): every pass that should have loaded the
    LoRA (the first pass, the hires pass) was verified by ``after_extra_networks_activate``."""
    if lora.pending:
        raise LoraLayerError(f"the {where} did not activate extra networks (or never ran them through "
                             "after_extra_networks_activate); the safety LoRA was not verified for it")


def verify_loaded(p, lora: SafetyLora, networks=None) -> str:
    """Proof that the webui loaded every target weight of our network (see the module doc)."""
    sd_model = p.sd_model
    fo = getattr(sd_model, "forge_objects_after_applying_lora", None)
    patchers = () if fo is None else (getattr(fo, "unet", None), getattr(getattr(fo, "clip", None), "patcher", None))
    if fo is not None and any(hasattr(pt, "lora_patches") for pt in patchers):
        # Forge: LoRA patches recorded per (file, strength) on the patched UNet and CLIP
        count, keys = 0, set()
        for patcher in patchers:
            for ident, patches in (getattr(patcher, "lora_patches", None) or {}).items():
                if _same_file(ident[0], lora.filename) and math.isclose(float(ident[1]), lora.strength):
                    count += len(patches)
                    keys |= set(patches)
        where = "Forge's patched UNet/CLIP"
        missing = [k for k in lora.host_keys if k not in keys]
        if missing:
            raise LoraLayerError(f"Forge recorded no patch of the safety LoRA {lora.name} for {len(missing)} of its "
                                 f"{len(lora.host_keys)} weights (e.g. {missing[0]}); the images are blocked")
    elif fo is not None:
        count = _reforge_count(sd_model, fo, lora)
        where = "reForge's patched UNet/CLIP"
    else:
        networks = networks if networks is not None else sys.modules.get("networks")
        if networks is None:
            raise LoraLayerError("the webui's built-in Lora extension is not loaded; the safety LoRA cannot be applied")
        nets = [n for n in getattr(networks, "loaded_networks", []) if getattr(n, "name", None) == lora.name]
        if not nets:
            raise LoraLayerError(f"the webui did not load the safety LoRA {lora.name} (extra networks disabled, "
                                 "or 'Lora not found' in the console)")
        net = nets[-1]
        for attr in ("te_multiplier", "unet_multiplier"):
            if not math.isclose(float(getattr(net, attr, lora.strength)), lora.strength):
                raise LoraLayerError(f"the safety LoRA {lora.name} was loaded with {attr} {getattr(net, attr)}, "
                                     f"not {lora.strength:g}")
        count = len(getattr(net, "modules", {}) or {})
        where = "networks.loaded_networks"
    if count < lora.targets:
        raise LoraLayerError(f"the webui matched only {count} of the {lora.targets} target weights of the safety LoRA "
                             f"{lora.name} ({where}); the images are blocked")
    lora.pending = False
    lora.loaded = f"{count}/{lora.targets}"
    return lora.loaded


def forge_patchers(sd_model) -> dict:
    """Forge: the UNet and CLIP patchers of ``forge_objects`` that carry LoRA patches and a
    ``lora_loader`` (empty outside Forge)."""
    fo = getattr(sd_model, "forge_objects", None)
    if fo is None:
        return {}
    out = {}
    for part, patcher in (("unet", getattr(fo, "unet", None)),
                          ("clip", getattr(getattr(fo, "clip", None), "patcher", None))):
        if isinstance(getattr(patcher, "lora_patches", None), dict) and \
                getattr(getattr(patcher, "model", None), "lora_loader", None) is not None:
            out[part] = patcher
    return out


def _merged_sets(loader) -> list:
    """The LoRA identifiers ``(filename, strength_patch, strength_model, online_mode)`` of the
    set a Forge ``LoraLoader`` merged last (its ``loaded_hash`` is ``str(list(keys))``)."""
    import ast  # noqa: PLC0415

    try:
        merged = ast.literal_eval(str(getattr(loader, "loaded_hash", "[]")))
    except (ValueError, SyntaxError):
        return []
    return [e for e in merged if isinstance(e, (list, tuple)) and len(e) >= 2] if isinstance(merged, list) else []


def check_merged(patchers, lora: SafetyLora, where: str) -> None:
    """Forge: a patcher's LoRA patches are only a record; they reach the weights when its
    memory manager loads the patcher (``refresh_loras``), and the model's shared
    ``lora_loader.loaded_hash`` says which set is merged now. For each patcher that carries our
    LoRA (checked after it was loaded: the CLIP once the conds are encoded, the UNet after its
    sampling pass), the set merged last must contain our file at our strength. (Not the
    patcher's exact set: extensions clone the UNet and add their own patches, and Forge
    encodes the hires conds with the hires pass's LoRA set, which has ours too.)"""
    for patcher in patchers:
        patches = getattr(patcher, "lora_patches", None)
        loader = getattr(getattr(patcher, "model", None), "lora_loader", None)
        if not isinstance(patches, dict) or loader is None:
            continue
        ours = [ident for ident in patches if _same_file(ident[0], lora.filename)]
        if not ours:
            continue
        merged = _merged_sets(loader)
        if not any(_same_file(e[0], lora.filename) and math.isclose(float(e[1]), float(ident[1]))
                   for e in merged for ident in ours):
            raise LoraLayerError(f"Forge did not merge the safety LoRA {lora.name} into the weights used in the "
                                 f"{where} (its LoRA loader holds {str(getattr(loader, 'loaded_hash', None))[:160]})")


def _reforge_count(sd_model, fo, lora: SafetyLora) -> int:
    """reForge (``ldm_patched`` ModelPatcher): its Lora extension records the applied set as
    ``current_lora_hash = str([[filename, unet_multiplier, te_multiplier], ...])`` and adds the
    weight patches to clones of ``forge_objects_original``'s UNet and CLIP patchers. Proof: our
    file is in that set at our strength, and the patched clones carry at least as many new
    weight patches as our file has targets (counted against the originals, per weight)."""
    import ast  # noqa: PLC0415

    try:
        applied = ast.literal_eval(str(getattr(sd_model, "current_lora_hash", "[]")))
    except (ValueError, SyntaxError):
        applied = []
    ours = [e for e in applied if isinstance(e, (list, tuple)) and len(e) >= 3 and _same_file(e[0], lora.filename)]
    if not ours:
        raise LoraLayerError(f"reForge did not apply the safety LoRA {lora.name} (not in its applied LoRA set)")
    for _, unet_m, te_m in (e[:3] for e in ours):
        if not (math.isclose(float(unet_m), lora.strength) and math.isclose(float(te_m), lora.strength)):
            raise LoraLayerError(f"reForge applied the safety LoRA {lora.name} at strengths {unet_m}/{te_m}, "
                                 f"not {lora.strength:g}")
    orig = getattr(sd_model, "forge_objects_original", None)
    count = 0
    for part in ("unet", "clip"):
        after, before = getattr(fo, part, None), getattr(orig, part, None)
        if part == "clip":
            after, before = getattr(after, "patcher", None), getattr(before, "patcher", None)
        old = getattr(before, "patches", None) or {}
        for key, entries in (getattr(after, "patches", None) or {}).items():
            count += max(0, len(entries) - len(old.get(key, ())))
    return count


__all__ = ["ForgeFlux", "LoraLayerError", "SafetyLora", "add_hires", "add_tag", "check_merged", "check_verified", "forge_dit", "forge_flux", "forge_patchers", "forge_sd3",
           "list_choices", "model_architecture", "prepare", "register", "resolve_choice", "roots", "verify_loaded",
           "write_kohya_cache"]
