"""Full safety weights (ESD-u / SafeGen UNets, the AdvUnlearn text encoder) written into a host's
own torch modules: key mapping, coverage, CPU backup, bit-exact copy with proof, restore.

Host-agnostic: a host hands over the part to replace as a ``{name: tensor}`` dict (a module's
``state_dict(keep_vars=True)``, so the tensors are the live parameters), :func:`pair` names the
file's tensors in it and :func:`plan` checks coverage, giving a :class:`Replacement`. Used by
both hosts: the A1111/Forge extension (``extension/safet2i_a1111/weights.py``) copies it in
place with :func:`apply` and later :func:`restore`; ComfyUI's node
(``nodes/lora_nodes.py``) turns ``Replacement.pairs`` into ``set`` patches instead.

* File layouts (:func:`safet2i.lora.load_full_weights`): UNets in diffusers or LDM names, text
  encoders in transformers names (``text_model.…``; transformers ≥ 5's ``CLIPTextModel`` layout
  without ``text_model.`` is renamed to it), a whole-file prefix (``unet.``, ``text_encoder.``, …)
  stripped.
* UNet: files in LDM names (``input_blocks.…``) map 1:1; diffusers names (``down_blocks.…``)
  go through a diffusers → LDM map: :func:`unet_key_map`, derived from the architecture
  inventory (every weight, bias and norm of the SD1/SD2/SDXL UNet; tested against diffusers'
  own converter), or the host's own (ComfyUI: ``comfy.utils.unet_to_diffusers`` of the loaded
  model's config). Either is put under the host's prefix (ComfyUI: ``diffusion_model.``).
* Text encoder: transformers ``CLIPTextModel`` names (``text_model.…``), found under whichever
  prefix of the host's dict holds them (A1111's ``wrapped.transformer.``, ComfyUI/Forge's
  ``clip_l.transformer.``); the webui's ``.wrapped`` embedding hooks are looked through.
* Coverage: every tensor in the file must match a host tensor of the same shape, and every
  tensor of the host part must be replaced (:func:`require_whole`), except
  :func:`text_encoder_weights`' exclusions (``position_ids`` buffers, ``text_projection`` when
  the file has none); a host may let the user accept a partial file (``allow_partial``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import ModelLoadError
from .arch import UNetConfig, unet_modules
from .manifest import verify
from .coverage import Coverage, CoverageError, TargetStatus, _list


class WeightsError(CoverageError):
    """Full weights that cannot be applied (wholly and exactly) to the host part."""


# --------------------------------------------------------------------------- key maps

def unet_key_map(cfg: UNetConfig) -> dict[str, str]:
    """diffusers ``UNet2DConditionModel`` state-dict keys → LDM (``openaimodel.UNetModel``) keys."""
    out: dict[str, str] = {}
    mods = unet_modules(cfg)
    for m in mods:
        for p in ("weight", "bias"):
            out[f"{m.diffusers}.{p}"] = f"{m.ldm}.{p}"
    for m in mods:
        if m.diffusers.endswith(".conv1"):                 # resnet: norm1/norm2
            d, ldm = m.diffusers[: -len(".conv1")], m.ldm[: -len(".in_layers.2")]
            for p in ("weight", "bias"):
                out[f"{d}.norm1.{p}"] = f"{ldm}.in_layers.0.{p}"
                out[f"{d}.norm2.{p}"] = f"{ldm}.out_layers.0.{p}"
        elif m.diffusers.endswith(".proj_in"):             # transformer: its norms keep their names
            d, ldm = m.diffusers[: -len(".proj_in")], m.ldm[: -len(".proj_in")]
            for p in ("weight", "bias"):
                out[f"{d}.norm.{p}"] = f"{ldm}.norm.{p}"
        elif ".transformer_blocks." in m.diffusers and m.diffusers.endswith(".attn1.to_q"):
            d, ldm = m.diffusers[: -len(".attn1.to_q")], m.ldm[: -len(".attn1.to_q")]
            for n in ("norm1", "norm2", "norm3"):
                for p in ("weight", "bias"):
                    out[f"{d}.{n}.{p}"] = f"{ldm}.{n}.{p}"
    for p in ("weight", "bias"):
        out[f"conv_norm_out.{p}"] = f"out.0.{p}"
    return out


def _normalised(rest: str) -> str:
    # A1111 wraps the token embedding (EmbeddingsWithFixes: ``token_embedding.wrapped.weight``).
    return rest.replace(".wrapped.", ".")


def text_encoder_map(host: dict[str, torch.Tensor], file_tensors: dict[str, torch.Tensor]) -> tuple[str | None, dict[str, str]]:
    """(prefix, {file key: host key}) for an HF ``CLIPTextModel`` file: the prefix of ``host``
    under which the most file tensors exist with the same shape (SDXL/Forge: ``clip_l.`` vs
    ``clip_g.``); keys are paired by name, :func:`plan` checks the shapes."""
    anchor = "text_model.embeddings.token_embedding"
    prefixes = set()
    for k in host:
        i = k.find("text_model.")
        if i >= 0 and _normalised(k[i:]).startswith(anchor):
            prefixes.add(k[:i])
    best: tuple[str | None, dict[str, str]] = (None, {})
    score = -1
    for p in sorted(prefixes):
        norm = {_normalised(k[len(p):]): k for k in host if k.startswith(p)}
        named = {k: norm[k] for k in file_tensors if k in norm}       # by name: a wrong shape is reported as such
        fits = sum(tuple(host[h].shape) == tuple(file_tensors[k].shape) for k, h in named.items())
        if best[0] is None or fits > score:
            best, score = (p, named), fits
    return best


def text_encoder_weights(host_keys, file_tensors: dict, prefix: str = "") -> list[str]:
    """The host keys (under ``prefix``) a full text-encoder file must replace: all of them except
    those a transformers ``CLIPTextModel`` file never has: buffers such as ``position_ids`` and
    ``text_projection`` (only ``CLIPTextModelWithProjection`` saves one) unless the file has it."""
    has_projection = any(k.startswith("text_projection") for k in file_tensors)
    out = []
    for k in host_keys:
        if not k.startswith(prefix):
            continue
        rest = k[len(prefix):]
        if rest.endswith("position_ids") or (rest.startswith("text_projection") and not has_projection):
            continue
        out.append(k)
    return out


def host_aliases(host: dict, keys: list[str], prefer=()) -> tuple[list[str], dict[str, str]]:
    """``keys`` less those naming a tensor another key already names, and {dropped key: kept key}.

    A host may register one parameter under two names (Forge's ``CLIPEmbeddingForTextualInversion``:
    ``token_embedding.weight`` and ``token_embedding.wrapped.weight``); replacing one replaces
    both, so the part has one tensor there, not two. The same tensor means the same object or the
    same storage, offset, shape, stride and dtype (never two tensors without storage: meta tensors
    have no address). A key in ``prefer`` (the paired keys) is kept over its aliases."""
    preferred = set(prefer)

    def ident(t):
        try:
            ptr = t.untyped_storage().data_ptr()
        except (AttributeError, RuntimeError, NotImplementedError):
            return ("id", id(t))
        if not ptr or getattr(t, "is_meta", False):
            return ("id", id(t))
        return ("mem", str(t.device), ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)

    first: dict = {}
    for k in sorted(keys, key=lambda k: k not in preferred):    # stable: preferred keys first
        first.setdefault(ident(host[k]), k)
    kept = set(first.values())
    aliases = {k: first[ident(host[k])] for k in keys if k not in kept}
    return [k for k in keys if k in kept], aliases


def drop_index_buffers(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """transformers ``CLIPTextModel`` files (before 4.31) carry ``position_ids``: an index table, not a weight."""
    ignored = sorted(k for k, v in tensors.items() if k.endswith("position_ids") and not v.is_floating_point())
    return {k: v for k, v in tensors.items() if k not in ignored}, ignored


@dataclass
class Pairing:
    """A full-weights file named in one host part (shapes not checked yet: :func:`plan` does)."""

    tensors: dict[str, torch.Tensor]   # the file's tensors that count (index buffers dropped)
    pairs: dict[str, str]              # file key → host key, by name
    required: list[str]                # host keys the file must replace (the whole part)
    ignored: list[str]                 # file keys left out (``position_ids``)
    prefix: str | None                 # host prefix of the part (text encoder: None when no CLIP found)
    aliases: dict[str, str] = field(default_factory=dict)   # host key → the key of ``required`` it is the same tensor as


def pair(fw, host: dict, unet_names: Callable[[], dict[str, str]] | None = None, unet_prefix: str = "") -> Pairing:
    """Name the tensors of ``fw`` (a :class:`~safet2i.lora.FullWeights`) in ``host``.

    UNet: ``host``'s keys under ``unet_prefix`` are the part; LDM files map 1:1, diffusers files
    through ``unet_names()`` (a diffusers → LDM map, asked for only then). Text encoder: the
    CLIP under whichever prefix of ``host`` fits best (:func:`text_encoder_map`), its keys less
    :func:`text_encoder_weights`' exclusions."""
    tensors = dict(fw.tensors)
    if fw.component == "unet":
        if fw.naming == "ldm":
            pairs = {k: unet_prefix + k for k in tensors}
        else:
            names = unet_names() if unet_names is not None else {}
            pairs = {k: unet_prefix + names[k] for k in tensors if k in names}
        return Pairing(tensors, pairs, [k for k in host if k.startswith(unet_prefix)], [], unet_prefix)
    tensors, ignored = drop_index_buffers(tensors)
    prefix, pairs = text_encoder_map(host, tensors)
    required = text_encoder_weights(host, tensors, prefix) if prefix is not None else []
    required, aliases = host_aliases(host, required, pairs.values())
    return Pairing(tensors, pairs, required, ignored, prefix, aliases)


# --------------------------------------------------------------------------- bit-exact proof

_INT_OF = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bytes (``-0.0`` ≠ ``0.0``; NaN payloads compared as bits)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.detach(), b.detach().to(a.device)
    if a.is_floating_point() or a.is_complex():
        size = a.element_size()
        if a.is_complex():
            a, b = torch.view_as_real(a), torch.view_as_real(b)
            size //= 2
        a, b = a.contiguous().view(_INT_OF[size]), b.contiguous().view(_INT_OF[size])
    return bool(torch.equal(a, b))


# --------------------------------------------------------------------------- plan / apply / restore

@dataclass
class Replacement:
    """What a full-weights file replaces in one host part, and how to undo it."""

    what: str                                  # "Safety weights FILE"
    part: str                                  # unet | text_encoder
    host: str                                  # the host part, in words
    pairs: dict[str, str]                      # file key → host key
    tensors: dict[str, torch.Tensor]           # file key → file tensor (CPU)
    cov: Coverage
    total: int                                 # host tensors the part has (that a file must replace)
    ignored: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)                 # host keys the file leaves as they were
    aliases: dict[str, str] = field(default_factory=dict)            # host key → replaced key, the same tensor
    backup: dict[str, torch.Tensor] = field(default_factory=dict)   # host key → CPU copy of the original
    applied: bool = False

    @property
    def fraction(self) -> float:
        return len(self.pairs) / max(1, self.total)

    def summary(self) -> str:
        return f"{len(self.pairs)}/{self.total} {self.part} tensors"

    @property
    def partial(self) -> bool:
        """Left file tensors out or host tensors unreplaced (only with ``allow_partial``)."""
        return bool(self.missing or self.cov.unmatched)


def plan(what: str, part: str, tensors: dict[str, torch.Tensor], host: dict[str, torch.Tensor],
         pairs: dict[str, str], required: list[str], host_name: str, ignored: list[str] | None = None,
         allow_partial: bool = False, partial_hint: str = "", aliases: dict[str, str] | None = None) -> Replacement:
    """Check the file before anything changes: every file tensor → a host tensor of the same
    shape (``pairs``; with ``allow_partial`` the others are left out, but a file matching
    nothing is refused regardless). Raises :class:`WeightsError` naming the keys otherwise.
    Which keys of ``required`` (the host part) it leaves unreplaced is kept in
    ``Replacement.missing``, for :func:`require_whole` (after the manifest's check, whose
    message names the release)."""
    cov = Coverage(host_name)
    for k, v in tensors.items():
        h = pairs.get(k)
        shape = tuple(host[h].shape) if h in host else None
        cov.statuses.append(TargetStatus(f"{part}:{k}", k, h if shape is not None else None, tuple(v.shape),
                                         shape, 0, 1.0))
    if not cov.statuses:
        raise WeightsError(f"{what}: the file contains no tensors.")
    bad = cov.unmatched
    if len(bad) == len(cov.statuses):
        raise WeightsError(f"{what} replaces NOTHING in {host_name}: none of its {len(bad)} tensors exists there with "
                           f"the same shape (made for another architecture?). First: " + _list(bad, 8))
    if bad and not allow_partial:
        raise WeightsError(f"{what}: {len(bad)} of its {len(cov.statuses)} tensors match no tensor of {host_name} "
                           f"with the same shape (another architecture or a different model): " + _list(bad, 8)
                           + partial_hint)
    targets = {s.host_key for s in cov.matched}
    if len(targets) != len(cov.matched):
        raise WeightsError(f"{what}: several file tensors map to the same weight of {host_name}.")
    chosen = {s.source_key: s.host_key for s in cov.matched}
    rep = Replacement(what, part, host_name, chosen, dict(tensors), cov, len(required), list(ignored or []))
    rep.missing = [k for k in required if k not in targets]
    # a second name of a replaced tensor (:func:`host_aliases`) is replaced with it, and proven by :func:`apply`
    rep.aliases = {a: h for a, h in (aliases or {}).items() if h in targets}
    return rep


def require_whole(rep: Replacement, allow_partial: bool = False, partial_hint: str = "") -> None:
    """Refuse a file that leaves part of the host part as it was (unless ``allow_partial``)."""
    missing = rep.missing
    if missing and not allow_partial:
        raise WeightsError(f"{rep.what} would replace only {rep.total - len(missing)} of the {rep.total} tensors of "
                           f"{rep.host} (a partial file: the rest would stay the original model's): missing "
                           f"{missing[:8]}" + (f" … and {len(missing) - 8} more" if len(missing) > 8 else "")
                           + partial_hint)


def check_manifest(fw, rep: Replacement) -> str:
    """The manifest's check of ``fw`` (contents, minimum fraction of the part replaced)."""
    comp = "unet" if fw.component == "unet" else "te1"
    return verify(fw.entry, fw.sha256, {comp: len(rep.tensors)}, [], set(), {comp: rep.fraction})


@torch.no_grad()
def apply(rep: Replacement, host: dict[str, torch.Tensor]) -> None:
    """Back the host tensors up (CPU copies), copy the file's values in (host dtype and device)
    and prove every replaced tensor equals the file's tensor in the host dtype, bit for bit.
    On any failure the originals are written back before the error is raised."""
    if rep.applied:
        raise WeightsError(f"{rep.what}: already applied")
    for h in rep.pairs.values():
        rep.backup[h] = host[h].detach().to("cpu", copy=True)
    try:
        for k, h in rep.pairs.items():
            dst = host[h]
            dst.data.copy_(rep.tensors[k].to(dtype=dst.dtype))
        rep.applied = True
        wrong = [h for k, h in rep.pairs.items() if not same_bits(host[h], rep.tensors[k].to(host[h].dtype))]
        of = {h: k for k, h in rep.pairs.items()}
        wrong += [a for a, h in rep.aliases.items()
                  if a not in host or not same_bits(host[a], rep.tensors[of[h]].to(host[a].dtype))]
        if wrong:
            raise WeightsError(f"{rep.what}: after copying, {len(wrong)} weights of {rep.host} differ from the file "
                               f"(e.g. {wrong[:3]}); the model is NOT the safety model.")
    except Exception:
        restore(rep, host)
        raise


@torch.no_grad()
def restore(rep: Replacement, host: dict[str, torch.Tensor]) -> list[str]:
    """Write the originals back (by name: ``host`` is read fresh, the host may have replaced the
    parameter objects meanwhile); returns the keys that are not bit-identical afterwards."""
    wrong = []
    for h, orig in rep.backup.items():
        dst = host.get(h)
        if dst is None or tuple(dst.shape) != tuple(orig.shape):
            wrong.append(h)
            continue
        dst.data.copy_(orig.to(dtype=dst.dtype))
        if not same_bits(dst, orig.to(dst.dtype)):
            wrong.append(h)
    rep.applied = False
    rep.backup.clear()
    return wrong


def check_file_part(fw, part: str) -> None:
    """``part``: ``auto``, ``unet`` or ``text_encoder``; the file's own part must agree."""
    if part not in ("auto", fw.component):
        raise ModelLoadError(f"{fw.path.name} holds {fw.component} weights ({fw.naming} names), not {part}.")


__all__ = ["Pairing", "Replacement", "WeightsError", "apply", "check_file_part", "check_manifest", "drop_index_buffers",
           "host_aliases",
           "pair", "plan", "require_whole", "restore", "same_bits", "text_encoder_map", "text_encoder_weights",
           "unet_key_map"]
