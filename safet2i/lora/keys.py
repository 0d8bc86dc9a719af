"""LoRA key formats → one canonical form, and back out as kohya keys.

Recognised layouts (per key; a file may mix components):

==================  ===========================================================================
kohya               ``lora_unet_<flat path>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
                    (``lora_te_``, ``lora_te1_``, ``lora_te2_`` for text encoders; DoRA ``.dora_scale``)
diffusers           ``unet.<path>.lora.down.weight`` / ``.lora.up.weight`` (``save_lora_weights``
                    after ``convert_state_dict_to_diffusers``; DUO's release)
diffusers-PEFT      ``unet.<path>.lora_A.weight`` / ``.lora_B.weight`` (also ``.lora_A.default.weight``,
                    ``base_model.model.<path>`` and no prefix; DoRA ``.lora_magnitude_vector``)
attn-processor      ``unet.<path>.processor.to_q_lora.down.weight`` (old diffusers),
                    ``….to_q.lora_linear_layer.down.weight``
LDM / ComfyUI       ``diffusion_model.input_blocks.1.1.….lora_A.weight`` / ``lora_unet_input_blocks_1_1_…``
text encoders       ``text_encoder.`` / ``text_encoder_2.`` + any of the suffixes above
==================  ===========================================================================

Canonical form: one :class:`Target` per patched module, with its component (``unet``, ``te1``,
``te2``), its module path (diffusers/HF naming where known, else LDM or kohya-flat naming), the
down (A, [r, in, …]) and up (B, [out, r, …]) tensors, alpha and scale = alpha / rank (1.0 when
there is no alpha, as in DUO's files; ``adapter_config.json``'s ``lora_alpha`` when given).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from ..errors import SafeT2IError
from .arch import ARCHITECTURES, inventory


class LoraFormatError(SafeT2IError):
    """A LoRA file whose keys or tensors cannot be understood."""


@dataclass
class Target:
    component: str                 # unet | te1 | te2
    module: str                    # path in `naming`
    naming: str                    # diffusers | ldm | flat
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    mid: torch.Tensor | None = None
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None  # PEFT magnitude as [out, 1] or kohya/LyCORIS dora_scale
    dora_kind: str | None = None            # "peft" (‖W + ΔW‖ per output row) or "kohya" (ComfyUI's rule)
    source_keys: list[str] = field(default_factory=list)
    rslora: bool = False                    # PEFT use_rslora: scale = alpha / sqrt(rank)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        if self.alpha is None:
            return 1.0
        return float(self.alpha) / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def kohya_alpha(self) -> float:
        """The alpha a kohya-format loader (scale = alpha / rank) needs for the same scale."""
        if self.alpha is None:
            return float(self.rank)
        return self.scale * self.rank if self.rslora else float(self.alpha)

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.down.shape[1])

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the weight this target patches (Linear: [out, in]; Conv: [out, in, kh, kw])."""
        if self.down.dim() == 4:
            if self.mid is not None:
                return (self.out_features, self.in_features, *self.mid.shape[2:])
            return (self.out_features, self.in_features, *self.down.shape[2:])
        return (self.out_features, self.in_features)

    def delta(self, dtype=torch.float64) -> torch.Tensor:
        """scale · B·A as a weight-shaped tensor (no DoRA normalisation)."""
        up, down = self.up.to(dtype), self.down.to(dtype)
        if self.mid is not None:
            raise LoraFormatError(f"{self.name}: LoCon/Tucker mid tensors are loaded by hosts, not merged here.")
        if down.dim() == 4:  # conv: up [out, r, 1, 1] · down [r, in, kh, kw]
            d = (up.flatten(1) @ down.flatten(1)).reshape(self.weight_shape)
        else:
            d = up @ down
        return d * self.scale

    @property
    def name(self) -> str:
        return f"{self.component}:{self.module}"


_SUFFIXES = [  # (regex on the key's tail, part)
    (r"\.lora_down\.weight$", "down"), (r"\.lora_up\.weight$", "up"), (r"\.lora_mid\.weight$", "mid"),
    (r"\.lora\.down\.weight$", "down"), (r"\.lora\.up\.weight$", "up"),
    (r"\.lora_linear_layer\.down\.weight$", "down"), (r"\.lora_linear_layer\.up\.weight$", "up"),
    (r"\.lora_A(\.default)?\.weight$", "down"), (r"\.lora_B(\.default)?\.weight$", "up"),
    (r"_lora\.down\.weight$", "down"), (r"_lora\.up\.weight$", "up"),
    (r"\.lora_magnitude_vector(\.default)?(\.weight)?$", "magnitude"),
    (r"\.dora_scale$", "dora_scale"), (r"\.alpha$", "alpha"),
]
_SUFFIX_RES = [(re.compile(p), part) for p, part in _SUFFIXES]

_FLAT_PREFIXES = {"lora_unet__": "unet", "lora_unet_": "unet", "lora_transformer_": "unet", "lora_te1_": "te1",
                  "lora_te2_": "te2", "lora_te_": "te1"}
_DOTTED_PREFIXES = [
    ("model.diffusion_model.", "unet", "ldm"), ("diffusion_model.", "unet", "ldm"),
    ("base_model.model.", None, None), ("unet.", "unet", None), ("transformer.", "unet", None),
    ("text_encoder_2.", "te2", "diffusers"), ("text_encoder.", "te1", "diffusers"),
    ("te2.", "te2", "diffusers"), ("te1.", "te1", "diffusers"),
]
_LDM_ROOTS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb.", "out.")
_DIFFUSERS_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "time_embedding.", "add_embedding.")


def _split_key(key: str) -> tuple[str, str]:
    for rx, part in _SUFFIX_RES:
        m = rx.search(key)
        if m:
            return key[: m.start()], part
    raise LoraFormatError(f"unrecognised LoRA key {key!r} (not a LoRA down/up/alpha/DoRA tensor)")


def _module_of(stem: str) -> tuple[str, str, str]:
    """(component, module path, naming) of a key stem."""
    for prefix, comp in _FLAT_PREFIXES.items():
        if stem.startswith(prefix):
            return comp, stem[len(prefix):], "flat"
    for prefix, comp, naming in _DOTTED_PREFIXES:
        if stem.startswith(prefix):
            rest = stem[len(prefix):]
            break
    else:
        comp, rest, naming = None, stem, None
    if comp in (None, "unet"):
        if rest.startswith(_LDM_ROOTS):
            comp, naming = "unet", "ldm"
        elif rest.startswith(_DIFFUSERS_ROOTS):
            comp, naming = "unet", "diffusers"
        elif rest.split(".")[0] in _dit_roots():
            # A diffusion transformer's module (diffusers or native/ComfyUI name): which one, and
            # whether it is a stacked native weight, is decided per architecture (dit_arch).
            comp, naming = "unet", "dit"
        elif comp is None and rest.startswith("text_model."):
            comp, naming = "te1", "diffusers"
    if comp is None or naming is None:
        raise LoraFormatError(f"cannot tell which model part LoRA key {stem!r} belongs to")
    # Old attention-processor names: ….attn1.processor.to_q_lora → ….attn1.to_q
    rest = re.sub(r"\.processor\.(to_q|to_k|to_v)$", r".\1", rest)
    rest = re.sub(r"\.processor\.to_out$", ".to_out.0", rest)
    return comp, rest, naming


def _flat_tables() -> dict[tuple[str, str], tuple[str, str]]:
    """kohya flat name → (diffusers path) for every known architecture's modules, both namings;
    transformers (``dit_arch``): both namings → the dotted name, naming ``dit``."""
    from .dit_arch import DIT_ARCHITECTURES, arch_inventory  # noqa: PLC0415

    table: dict[tuple[str, str], tuple[str, str]] = {}
    for arch in ARCHITECTURES:
        for comp, mods in inventory(arch).items():
            for m in mods.values():
                table[(comp, m.diffusers.replace(".", "_"))] = (m.diffusers, "diffusers")
                table.setdefault((comp, m.ldm.replace(".", "_")), (m.ldm, "ldm"))
    for arch in DIT_ARCHITECTURES:
        inv = arch_inventory(arch)
        for name in (*inv.modules, *inv.natives):
            table.setdefault(("unet", name.replace(".", "_")), (name, "dit"))
    return table


_ROOTS: set[str] | None = None


def _dit_roots() -> set[str]:
    global _ROOTS  # noqa: PLW0603
    if _ROOTS is None:
        from .dit_arch import roots  # noqa: PLC0415

        _ROOTS = roots()
    return _ROOTS


_FLAT: dict | None = None


def parse(state: dict[str, torch.Tensor]) -> list[Target]:
    """Canonical targets of a LoRA state dict; raises :class:`LoraFormatError` on anything odd."""
    global _FLAT  # noqa: PLW0603
    if not state:
        raise LoraFormatError("the file contains no tensors")
    targets: dict[tuple[str, str, str], Target] = {}
    for key, tensor in state.items():
        stem, part = _split_key(key)
        comp, module, naming = _module_of(stem)
        if naming == "flat":
            _FLAT = _FLAT or _flat_tables()
            found = _FLAT.get((comp, module))
            if found:
                module, naming = found
        t = targets.setdefault((comp, module, naming), Target(comp, module, naming))
        t.source_keys.append(key)
        if part == "alpha":
            if tensor.numel() == 0:
                raise LoraFormatError(f"{t.name}: alpha tensor {key} is empty (shape {tuple(tensor.shape)}), so its "
                                      "scale is undefined")
            t.alpha = float(tensor.float().reshape(-1)[0])
            if not math.isfinite(t.alpha):
                raise LoraFormatError(f"{t.name}: alpha is {t.alpha} (must be a finite number)")
        elif part == "magnitude":
            # PEFT stores (out,) for Linear and (1, out, 1, 1) for Conv2d: one value per output row
            t.dora_scale, t.dora_kind = tensor.reshape(-1, 1), "peft"
        elif part == "dora_scale":
            t.dora_scale, t.dora_kind = tensor, "kohya"
        else:
            if getattr(t, part) is not None:
                raise LoraFormatError(f"{t.name}: two {part} tensors ({t.source_keys})")
            setattr(t, part, tensor)
    out = []
    for t in targets.values():
        if t.down is None or t.up is None:
            raise LoraFormatError(f"{t.name}: has {'up' if t.up is not None else 'down'} but no "
                                  f"{'down' if t.up is not None else 'up'} tensor ({t.source_keys})")
        if t.down.dim() not in (2, 4) or t.up.dim() != t.down.dim() or t.up.shape[1] != t.down.shape[0]:
            raise LoraFormatError(f"{t.name}: inconsistent shapes down {tuple(t.down.shape)} up {tuple(t.up.shape)}")
        for name in ("down", "up", "mid", "dora_scale"):
            v = getattr(t, name)
            if v is not None and v.numel() == 0:
                rank0 = " (rank 0: a LoRA of rank 0 patches nothing)" if t.down.shape[0] == 0 else ""
                raise LoraFormatError(f"{t.name}: {name} tensor {part_key(t, name)} has zero size "
                                      f"{tuple(v.shape)}{rank0}")
        for name in ("down", "up", "mid", "dora_scale"):
            v = getattr(t, name)
            if v is not None and not torch.isfinite(v).all():
                raise LoraFormatError(f"{t.name}: {name} tensor contains NaN or infinite values")
        out.append(t)
    return out


def part_key(t: Target, part: str) -> str:
    """The file key of one part (``down``, ``up``, ``mid``, ``alpha``, ``dora_scale``) of a target."""
    want = {"dora_scale": ("dora_scale", "magnitude")}.get(part, (part,))
    for k in t.source_keys:
        try:
            if _split_key(k)[1] in want:
                return k
        except LoraFormatError:
            continue
    return t.source_keys[0] if t.source_keys else t.name


_F32 = torch.finfo(torch.float32)


#: A target whose whole change scale·B·A has a Frobenius norm below this (so no single weight
#: moves by more than it) changes nothing a host can show: float16 cannot represent a change
#: of 1e-6 to any weight of magnitude above about 0.002, and trained LoRAs change weights by
#: 1e-4 .. 1e-1.
NEGLIGIBLE_CHANGE = 1e-6


def check_effect(targets: list[Target], alpha_from: str = "") -> None:
    """Refuse targets that change nothing, or not as trained, so none is ever reported as patched.

    Per target: the scale (alpha / rank, alpha / √rank with rsLoRA) must be a positive finite
    number (0 patches nothing; a negative scale inverts the patch as a negative strength would);
    down, up and mid must not be all zeros; B·A must not vanish (up and down cancelling, checked
    as ‖B·A‖² = tr(BᵀB·AAᵀ), an r×r product) and scale·‖B·A‖ must neither underflow nor overflow
    float32. DoRA targets are exempt from the all-zero and B·A checks (not from the scale checks):
    their magnitude vector changes the weight even when B·A is zero, which only the host's own
    weight could tell. ``alpha_from`` names where a config's alpha came from.
    """
    for t in targets:
        if t.alpha is None:
            alpha = "no alpha"
        else:
            src = part_key(t, "alpha") if any(k.endswith(".alpha") for k in t.source_keys) else (alpha_from or "config")
            alpha = f"alpha {t.alpha:g} ({src})"
        scale = t.scale
        if not math.isfinite(scale):
            raise LoraFormatError(f"{t.name}: {alpha} with rank {t.rank} gives a scale of {scale}, not a finite number")
        if scale == 0:
            raise LoraFormatError(f"{t.name}: {alpha} makes its scale 0, so this target changes nothing; refused so "
                                  "it is never reported as patched")
        if scale < 0:
            raise LoraFormatError(f"{t.name}: {alpha} makes its scale negative ({scale:g}), which INVERTS the patch "
                                  "(as a negative strength would, which every loader refuses)")
        for name in ("down", "up", "mid"):
            v = getattr(t, name)
            if v is not None and t.dora_scale is None and not bool(torch.any(v != 0)):
                raise LoraFormatError(f"{t.name}: {name} tensor {part_key(t, name)} is all zeros, so this target "
                                      "changes nothing (an untrained or zeroed LoRA); refused so it is never reported "
                                      "as patched")
        if t.dora_scale is not None or t.mid is not None:
            continue
        up = t.up.reshape(t.up.shape[0], -1).to(torch.float64)
        down = t.down.reshape(t.down.shape[0], -1).to(torch.float64)
        if up.shape[1] != down.shape[0]:
            continue  # an up kernel other than 1×1: hosts decide
        prod = float(((up.T @ up) * (down @ down.T)).sum())      # ‖B·A‖²_F
        bound = float(up.pow(2).sum()) * float(down.pow(2).sum())  # ‖B‖²‖A‖² ≥ ‖B·A‖²
        if not math.isfinite(prod) or not math.isfinite(bound):
            raise LoraFormatError(f"{t.name}: B·A overflows ({part_key(t, 'up')}, {part_key(t, 'down')})")
        if prod <= 1e-12 * bound:
            raise LoraFormatError(f"{t.name}: up {part_key(t, 'up')} times down {part_key(t, 'down')} is zero (the "
                                  "two cancel), so this target changes nothing; refused so it is never reported as "
                                  "patched")
        size = scale * math.sqrt(prod)
        if size < NEGLIGIBLE_CHANGE:
            raise LoraFormatError(f"{t.name}: {alpha} makes scale·B·A so small (Frobenius norm {size:.3g}) that no "
                                  f"weight changes by more than {NEGLIGIBLE_CHANGE:g}: below what float16 weights "
                                  "can show, so this target changes nothing; refused so it is never reported as "
                                  "patched")
        if size < _F32.tiny:
            raise LoraFormatError(f"{t.name}: {alpha} makes scale·B·A ({size:.3g}) smaller than float32 can hold "
                                  "(a normal number), so this target changes nothing")
        if not math.isfinite(size) or size > _F32.max:
            raise LoraFormatError(f"{t.name}: {alpha} makes scale·B·A ({size:.3g}) overflow float32 (inf weights)")


_DIT_KEY_PREFIXES = ("transformer.", "base_model.model.", "model.diffusion_model.", "diffusion_model.", "lora_unet__",
                     "lora_unet_", "lora_transformer_")


def detect_format(state: dict) -> list[str]:
    """Human names of the key layouts present."""
    kinds = set()
    for key in state:
        if key.startswith(("lora_unet_", "lora_te")):
            kinds.add("kohya")
        elif re.search(r"\.lora_[AB](\.default)?\.weight$|lora_magnitude_vector", key):
            kinds.add("diffusers-PEFT")
        elif "_lora.down" in key or "_lora.up" in key or ".processor." in key:
            kinds.add("diffusers attn-processor (old)")
        elif ".lora_linear_layer." in key:
            kinds.add("diffusers attn-processor")
        elif ".lora.down" in key or ".lora.up" in key:
            kinds.add("diffusers")
        if key.startswith(("diffusion_model.", "model.diffusion_model.")) or "_input_blocks_" in key \
                or "_output_blocks_" in key or "_middle_block_" in key:
            kinds.add("LDM/ComfyUI names")
        if ".dora_scale" in key or "lora_magnitude_vector" in key:
            kinds.add("DoRA")
        stem = next((key[len(p):] for p in _DIT_KEY_PREFIXES if key.startswith(p)), key)
        if re.match(r"(double_blocks|single_blocks)[._]\d", stem):
            kinds.add("Flux BFL/ComfyUI names")
        elif re.match(r"joint_blocks[._]\d", stem):
            kinds.add("SD3 MMDiT (SAI/ComfyUI) names")
        elif re.match(r"blocks[._]\d+[._](self_attn|cross_attn|ffn[._]\d)", stem):
            kinds.add("Wan original/ComfyUI names")
        elif re.match(r"(single_)?transformer_blocks[._]\d|blocks[._]\d+[._](attn[12]|ffn[._]net)", stem):
            kinds.add("transformer (diffusers) names")
    return sorted(kinds)


def to_diffusers_naming(targets: list[Target], arch: str | None) -> None:
    """Rename LDM-named UNet targets to diffusers paths using ``arch``'s inventory, in place;
    for a transformer architecture (``dit_arch``) see :func:`normalise_dit`."""
    if arch is None:
        return
    from .arch import is_dit  # noqa: PLC0415

    if is_dit(arch):
        from .dit_arch import arch_inventory  # noqa: PLC0415

        targets[:] = normalise_dit(targets, arch_inventory(arch))
        return
    back = {m.ldm: m.diffusers for m in inventory(arch)["unet"].values()}
    for t in targets:
        if t.component == "unet" and t.naming == "ldm" and t.module in back:
            t.module, t.naming = back[t.module], "diffusers"


def normalise_dit(targets: list[Target], inv) -> list[Target]:
    """Targets of a transformer LoRA in diffusers naming against a ``dit_arch.DitInventory``:
    native names renamed, stacked native targets split into one target per diffusers module
    (up rows split, halves swapped back where stored swapped; the same down, alpha and rank:
    exact). Targets the inventory does not know are returned unchanged (coverage reports them)."""
    from .dit_arch import split_factors  # noqa: PLC0415

    out: list[Target] = []
    for t in targets:
        if t.component != "unet" or t.naming not in ("dit", "diffusers", "flat"):
            out.append(t)
            continue
        name = t.module
        if t.naming == "flat":
            flat = {k.replace(".", "_"): k for k in (*inv.modules, *inv.natives)}
            name = flat.get(name)
            if name is None:
                out.append(t)
                continue
        if name in inv.modules:
            t.module, t.naming = name, "diffusers"
            out.append(t)
            continue
        nat = inv.natives.get(name)
        if nat is None:
            out.append(t)
            continue
        if not nat.fused:
            t.module, t.naming = nat.pieces[0].diffusers, "diffusers"
            out.append(t)
            continue
        if t.down.dim() != 2 or tuple(t.up.shape[:1]) != nat.shape[:1]:
            out.append(t)   # wrong shape: left for coverage to report
            continue
        if t.mid is not None or t.dora_scale is not None:
            raise LoraFormatError(f"{t.name}: DoRA / LoCon mid tensors on a stacked native weight ({nat.name} = "
                                  f"{' + '.join(p.diffusers.rsplit('.', 1)[-1] for p in nat.pieces)}) cannot be "
                                  "split exactly per module; not supported")
        for mod, up, down in split_factors(nat, t.up, t.down):
            if not bool(torch.any(up != 0)):
                continue    # a piece the stacked LoRA leaves unchanged (zero rows): nothing to patch
            out.append(Target(t.component, mod, "diffusers", down=down, up=up, alpha=t.alpha,
                              source_keys=list(t.source_keys), rslora=t.rslora))
    return out


def to_native_kohya(targets: list[Target], inv) -> dict[str, torch.Tensor]:
    """Kohya state dict of transformer targets (diffusers naming) in native names
    (``lora_unet_double_blocks_0_img_attn_qkv``), which stock ComfyUI loads for every family
    (its generic ``lora_unet_<diffusion_model key>`` map) and sd-scripts/Forge for Flux: the
    pieces of a stacked native weight fused (``dit_arch.fuse_factors``), alpha always written."""
    from .dit_arch import fuse_factors  # noqa: PLC0415

    groups: dict[str, dict] = {}
    out: dict[str, torch.Tensor] = {}
    for t in targets:
        if t.component != "unet" or t.naming != "diffusers" or t.module not in inv.owner:
            raise LoraFormatError(f"{t.name}: not a module of this transformer; cannot be written in native names")
        if t.dora_scale is not None or t.mid is not None:
            raise LoraFormatError(f"{t.name}: DoRA / LoCon targets are not converted to native transformer names")
        groups.setdefault(inv.owner[t.module], {})[t.module] = (t.up, t.down, t.scale)
    for native, parts in groups.items():
        nat = inv.natives[native]
        k = "lora_unet_" + native.replace(".", "_")
        if nat.fused:
            up, down, alpha = fuse_factors(nat, parts)
        else:
            up, down, scale = parts[nat.pieces[0].diffusers]
            alpha = scale * int(down.shape[0])
        out[k + ".lora_down.weight"] = down.contiguous()
        out[k + ".lora_up.weight"] = up.contiguous()
        out[k + ".alpha"] = torch.tensor(float(alpha))
    return out


_KOHYA_PREFIX = {"unet": "lora_unet_", "te1": "lora_te1_", "te2": "lora_te2_"}


def kohya_name(t: Target, single_text_encoder: bool = True) -> str:
    prefix = "lora_te_" if (t.component == "te1" and single_text_encoder) else _KOHYA_PREFIX[t.component]
    return prefix + t.module.replace(".", "_")


def to_kohya(targets: list[Target], single_text_encoder: bool | None = None) -> dict[str, torch.Tensor]:
    """Kohya state dict (``lora_down``/``lora_up``/``alpha``[/``dora_scale``]) with the same effect.

    ``alpha`` is always written: rank when the source had none (scale 1), so readers that
    default to another scale cannot change the strength.
    """
    if single_text_encoder is None:
        single_text_encoder = not any(t.component == "te2" for t in targets)
    out: dict[str, torch.Tensor] = {}
    for t in targets:
        if t.dora_kind == "peft":
            raise LoraFormatError(
                f"{t.name}: PEFT DoRA normalises by the norm of the *patched* weight, which kohya-format loaders "
                "(ComfyUI, A1111) do not reproduce; load this file with SafeT2I's loader instead of converting it."
            )
        k = kohya_name(t, single_text_encoder)
        if k + ".lora_down.weight" in out:
            raise LoraFormatError(f"two targets map to the same kohya name {k}")
        out[k + ".lora_down.weight"] = t.down.contiguous()
        out[k + ".lora_up.weight"] = t.up.contiguous()
        if t.mid is not None:
            out[k + ".lora_mid.weight"] = t.mid.contiguous()
        out[k + ".alpha"] = torch.tensor(t.kohya_alpha)
        if t.dora_scale is not None:
            out[k + ".dora_scale"] = t.dora_scale.contiguous()
    return out


def _pattern_key(patterns: dict, module: str) -> str | None:
    """PEFT's rule (peft.utils.other.get_pattern_key): a key matches a module name as a regex
    suffix at a dot boundary, ``re.match(rf"(.*\\.)?({key})$", name)``; the first matching key wins."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def apply_peft_config(targets: list[Target], cfg: dict, where: str = "adapter_config.json") -> bool:
    """Apply a PEFT ``LoraConfig`` (``adapter_config.json``) to targets whose file has no alpha.

    Per module, as PEFT builds it: rank ``rank_pattern[key]`` or ``r``, alpha ``alpha_pattern[key]``
    or ``lora_alpha`` (``key`` the first pattern matching the module name), scale alpha / r, or
    alpha / sqrt(r) with ``use_rslora``. The config's rank must equal the tensors' rank: a
    mismatch means the config belongs to another adapter and is an error naming the module.
    Returns whether any alpha came from the config.
    """
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    if not isinstance(rank_pattern, dict) or not isinstance(alpha_pattern, dict):
        raise LoraFormatError(f"{where}: rank_pattern and alpha_pattern must be JSON objects")
    rslora = bool(cfg.get("use_rslora", False))
    used = False
    for t in targets:
        rkey = _pattern_key(rank_pattern, t.module)
        r = rank_pattern[rkey] if rkey is not None else cfg.get("r")
        if r is not None:
            if isinstance(r, bool) or not isinstance(r, (int, float)) or int(r) != r:
                raise LoraFormatError(f"{where}: rank {r!r} for {t.module} is not an integer")
            if int(r) != t.rank:
                src = f"rank_pattern[{rkey!r}]" if rkey is not None else "r"
                raise LoraFormatError(
                    f"{where}: {src} = {int(r)} for module {t.module}, but the file's tensors for it have rank "
                    f"{t.rank} ({t.source_keys[0]}): the config belongs to another adapter")
        if t.alpha is not None:  # the file's own alpha tensor wins
            continue
        akey = _pattern_key(alpha_pattern, t.module)
        alpha = alpha_pattern[akey] if akey is not None else cfg.get("lora_alpha")
        if alpha is None:
            continue
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise LoraFormatError(f"{where}: lora_alpha {alpha!r} for {t.module} is not a finite number")
        t.alpha, t.rslora, used = float(alpha), rslora, True
    return used
