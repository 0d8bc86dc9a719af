"""LoRA layers for the trainers, and the export of what they learned.

* :func:`inject_lora` wraps the ``nn.Linear`` modules of a model (a diffusers UNet, a CLIP
  text encoder) whose path matches a preset or a regex in :class:`LoRALinear` layers and
  returns them as a :class:`LoraSet` (parameters for the optimiser, ``disabled()`` for the
  frozen reference model, checkpoint tensors, ``remove()``).
* :func:`save_lora` writes a :class:`LoraSet` as a kohya or diffusers-PEFT safetensors file,
  refuses untrained or degenerate layers first, and proves the file by reading it back with
  :func:`safet2i.lora.load_lora` (the loaders' own parser and checks) and comparing every
  target's change of weight with the one in memory.
* :func:`lora_metadata` builds the file's ``__metadata__`` (method, base model and its sha256,
  hyper-parameters, data sha256, architecture, SafeT2I version, kohya's informational keys);
  :func:`manifest_entry` the ``[models.<key>]`` entry of ``models/safety_models.toml``.

The layer, from the LoRA equations (Hu et al., 2021): a frozen weight ``W`` becomes
``W + (alpha / rank) · B·A`` with ``A`` (``down``) of shape [rank, in] and ``B`` (``up``) of
shape [out, rank]; ``B`` starts at zero, so the model is unchanged until it is trained.

Importing this module imports torch (only trainers import it).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from .. import __version__
from ..errors import SafeT2IError
from ..fileio import TMP_SUFFIX, save_safetensors
from ..lora import load_lora
from ..lora.arch import ARCHITECTURES
from ..lora.files import adapter_config_path
from ..lora.keys import LoraFormatError, Target, check_effect, to_kohya
from ..lora.manifest import Entry, _toml_load, validate

__all__ = ["COMPONENTS", "INITS", "TARGET_PRESETS", "LoRALinear", "LoraLayerError", "LoraSet", "inject_lora",
           "lora_metadata", "manifest_entry", "module_regex", "save_lora", "save_lora_files"]

TARGET_PRESETS: dict[str, str] = {
    "self-attention": r"attn1\.(to_q|to_k|to_v|to_out\.0)$",   # DUO's default (--no_cross_attn)
    "cross-attention": r"attn2\.(to_q|to_k|to_v|to_out\.0)$",
    "attention": r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$",
}

#: ``gaussian``: A ~ N(0, (1/rank)²) (PEFT's ``init_lora_weights="gaussian"``, DUO's choice);
#: ``kaiming``: A ~ U(-1/√in, 1/√in) (PEFT's default, kaiming-uniform with a = √5). B = 0 for both.
INITS = ("gaussian", "kaiming")
COMPONENTS = ("unet", "te1", "te2")
FORMATS = ("kohya", "peft")
_PEFT_PREFIX = {"unet": "unet.", "te1": "text_encoder.", "te2": "text_encoder_2."}
#: relative Frobenius-norm difference allowed between a target's change read back from the
#: file and the one in memory (both computed in float64)
READ_BACK_RTOL = 1e-6


class LoraLayerError(SafeT2IError):
    """LoRA layers cannot be injected, loaded or saved as asked."""


class LoRALinear(torch.nn.Module):
    """``base(x) + (alpha / rank) · (x·Aᵀ)·Bᵀ``; ``base`` stays as it is (the trainer freezes it).

    ``down`` (A, [rank, in]) is drawn from ``generator`` (the global generator when None) on the
    generator's device and moved to the base weight's device; ``up`` (B, [out, rank]) is zero.
    Both are float32 (float64 when the base weight is float64), also when the base weight is
    half precision: the forward pass casts them to the input's dtype. ``enabled = False``
    gives ``base(x)`` alone (the reference model of DUO / DPO-style losses).
    """

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float, generator: torch.Generator | None,
                 init: str = "gaussian"):
        super().__init__()
        if not isinstance(base, torch.nn.Linear):
            raise LoraLayerError(f"LoRALinear wraps a torch.nn.Linear, not a {type(base).__name__}")
        out_f, in_f = base.weight.shape
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1 or rank > min(in_f, out_f):
            raise LoraLayerError(f"rank {rank!r} is not an integer in [1, {min(in_f, out_f)}] for a Linear "
                                 f"[{out_f}, {in_f}] (a LoRA's rank is at most min(in, out))")
        alpha = float(alpha)
        if not math.isfinite(alpha) or alpha <= 0:
            raise LoraLayerError(f"alpha {alpha} must be a positive finite number (scale = alpha / rank; 0 patches "
                                 "nothing, a negative scale inverts the patch)")
        if init not in INITS:
            raise LoraLayerError(f"unknown LoRA init {init!r}; choose one of {list(INITS)}")
        self.base = base
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.enabled = True
        self.init = init
        dtype = torch.float64 if base.weight.dtype == torch.float64 else torch.float32
        where = generator.device if generator is not None else torch.device("cpu")
        if init == "gaussian":
            down = torch.randn((rank, in_f), generator=generator, device=where, dtype=dtype) / rank
        else:
            bound = 1.0 / math.sqrt(in_f)
            down = (torch.rand((rank, in_f), generator=generator, device=where, dtype=dtype) * 2 - 1) * bound
        self.down = torch.nn.Parameter(down.to(base.weight.device))
        self.up = torch.nn.Parameter(torch.zeros((out_f, rank), dtype=dtype, device=base.weight.device))

    # What code reading a Linear's attributes finds (the base's).
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled:
            return out
        h = torch.nn.functional.linear(x, self.down.to(x.dtype))
        return out + self.scale * torch.nn.functional.linear(h, self.up.to(x.dtype))

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:g}, enabled={self.enabled}"


def _file_module(component: str, path: str) -> str:
    """The module name LoRA files use: text-encoder paths start with ``text_model.`` (transformers
    ≥ 5 builds ``CLIPTextModel`` without that level; files and loaders keep it)."""
    if component != "unet" and not path.startswith(("text_model.", "text_projection")):
        return "text_model." + path
    return path


class LoraSet:
    """The LoRA layers :func:`inject_lora` put into one model part."""

    def __init__(self, component: str, rank: int, alpha: float, modules: dict[str, LoRALinear],
                 parents: dict[str, tuple[torch.nn.Module, str]]):
        self.component = component
        self.rank = rank
        self.alpha = alpha
        self.modules = dict(sorted(modules.items()))
        self._parents = parents
        self.removed = False

    def parameters(self) -> list[torch.nn.Parameter]:
        """``down``, ``up`` of every layer, in sorted path order (what the optimiser trains)."""
        return [p for m in self.modules.values() for p in (m.down, m.up)]

    @contextlib.contextmanager
    def disabled(self) -> Iterator[LoraSet]:
        """Inside: every layer gives its base output (the reference model); restored on exit,
        also on an exception."""
        before = {path: m.enabled for path, m in self.modules.items()}
        try:
            for m in self.modules.values():
                m.enabled = False
            yield self
        finally:
            for path, m in self.modules.items():
                m.enabled = before[path]

    def tensors(self) -> dict[str, torch.Tensor]:
        """``{path}.down`` / ``{path}.up``: detached contiguous CPU copies (for checkpoints)."""
        out: dict[str, torch.Tensor] = {}
        for path, m in self.modules.items():
            out[f"{path}.down"] = m.down.detach().to("cpu", copy=True).contiguous()
            out[f"{path}.up"] = m.up.detach().to("cpu", copy=True).contiguous()
        return out

    def load_tensors(self, tensors: dict) -> None:
        """Copy :meth:`tensors`' output back in; the keys and shapes must be exactly these layers'."""
        want = {f"{path}.{part}": getattr(m, part) for path, m in self.modules.items() for part in ("down", "up")}
        missing = [k for k in want if k not in tensors]
        if missing:
            raise LoraLayerError(f"LoRA tensors: {missing[0]} is missing ({len(missing)} missing in all): the "
                                 "checkpoint belongs to other LoRA layers (another target set)")
        extra = sorted(set(tensors) - set(want))
        if extra:
            raise LoraLayerError(f"LoRA tensors: {extra[0]} is not a tensor of these LoRA layers ({len(extra)} "
                                 "unknown in all): the checkpoint belongs to other LoRA layers (another target set)")
        for k, p in want.items():
            v = tensors[k]
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(p.shape):
                shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise LoraLayerError(f"LoRA tensors: {k} has shape {shape}, the layer's is {tuple(p.shape)} "
                                     "(another rank or model?)")
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise LoraLayerError(f"LoRA tensors: {k} contains NaN or infinite values")
        with torch.no_grad():
            for k, p in want.items():
                p.copy_(tensors[k].to(device=p.device, dtype=p.dtype))

    def targets(self) -> list[Target]:
        """One :class:`~safet2i.lora.keys.Target` per layer (diffusers naming; CPU copies)."""
        out = []
        for path, m in self.modules.items():
            if m.down.device.type == "meta":
                raise LoraLayerError(f"{self.component}:{path}: the LoRA parameters are on the meta device (no "
                                     "values): build the model on a real device to train and save it")
            out.append(Target(self.component, _file_module(self.component, path), "diffusers",
                              down=m.down.detach().to("cpu", copy=True).contiguous(),
                              up=m.up.detach().to("cpu", copy=True).contiguous(), alpha=float(m.alpha)))
        return out

    def remove(self) -> None:
        """Put the original ``nn.Linear`` modules back (the LoRA parameters stay readable here)."""
        for path, m in self.modules.items():
            parent, name = self._parents[path]
            if parent._modules.get(name) is m:
                parent._modules[name] = m.base
        self.removed = True

    def __repr__(self) -> str:
        return (f"LoraSet(component={self.component!r}, rank={self.rank}, alpha={self.alpha:g}, "
                f"layers={len(self.modules)})")


def _compile(targets: str) -> re.Pattern:
    pattern = TARGET_PRESETS.get(targets, targets)
    if not isinstance(pattern, str) or not pattern:
        raise LoraLayerError(f"LoRA targets {targets!r}: give a preset ({', '.join(TARGET_PRESETS)}) or a regex")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise LoraLayerError(f"LoRA targets {targets!r} is neither a preset ({', '.join(TARGET_PRESETS)}) nor a "
                             f"valid regex ({exc})") from exc


def inject_lora(model: torch.nn.Module, *, component: str = "unet", targets: str = "self-attention", rank: int = 4,
                alpha: float | None = None, seed: int = 0, init: str = "gaussian") -> LoraSet:
    """Wrap every ``nn.Linear`` of ``model`` whose path matches ``targets`` in a :class:`LoRALinear`.

    ``targets``: a key of :data:`TARGET_PRESETS` or a regex (``re.search`` on the module path).
    ``alpha`` None means rank (scale 1). The layers' ``down`` matrices are drawn in sorted path
    order from one CPU generator seeded with ``seed`` (the same values on any device). The
    ``requires_grad`` of the model's own parameters is left as it is (the trainer freezes them);
    the LoRA parameters require gradients.
    """
    if not isinstance(model, torch.nn.Module):
        raise LoraLayerError(f"inject_lora needs a torch.nn.Module, not a {type(model).__name__}")
    if component not in COMPONENTS:
        raise LoraLayerError(f"unknown component {component!r}; choose one of {list(COMPONENTS)}")
    if init not in INITS:
        raise LoraLayerError(f"unknown LoRA init {init!r}; choose one of {list(INITS)}")
    already = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    if already:
        raise LoraLayerError(f"the model already has {len(already)} LoRA layers (e.g. {already[0]}); remove() them "
                             "before injecting again")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise LoraLayerError(f"LoRA rank {rank!r} must be a positive integer")
    alpha = float(rank) if alpha is None else float(alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise LoraLayerError(f"LoRA alpha {alpha} must be a positive finite number (scale = alpha / rank)")
    rx = _compile(targets)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    chosen = sorted(((n, m) for n, m in linears if rx.search(n)), key=lambda nm: nm[0])
    if not chosen:
        hint = [n for n, _ in linears if "attn" in n or "proj" in n][:4] or [n for n, _ in linears][:4]
        raise LoraLayerError(f"LoRA targets {targets!r} (regex {rx.pattern!r}) match no nn.Linear module of the "
                             f"{component} ({len(linears)} Linear modules, e.g. {hint})")
    for n, m in chosen:
        out_f, in_f = m.weight.shape
        if rank > min(in_f, out_f):
            raise LoraLayerError(f"LoRA rank {rank} is larger than min(in, out) = {min(in_f, out_f)} of target {n} "
                                 f"(Linear [{out_f}, {in_f}]): a rank above that adds nothing")
    names = dict(model.named_modules())
    generator = torch.Generator().manual_seed(int(seed))
    modules: dict[str, LoRALinear] = {}
    parents: dict[str, tuple[torch.nn.Module, str]] = {}
    for n, m in chosen:
        layer = LoRALinear(m, rank, alpha, generator, init)
        parent_name, _, child = n.rpartition(".")
        parent = names[parent_name] if parent_name else model
        parent._modules[child] = layer
        modules[n], parents[n] = layer, (parent, child)
    return LoraSet(component, rank, alpha, modules, parents)


# --------------------------------------------------------------------------- metadata

_RESERVED = ("safet2i_method", "safet2i_base_model", "safet2i_base_sha256", "safet2i_hyper", "safet2i_data_sha256",
             "safet2i_arch", "safet2i_version", "ss_network_module", "ss_network_dim", "ss_network_alpha")


def lora_metadata(*, method: str, base_model: str, base_sha256: str, hyper: dict, data_sha256: str, arch: str,
                  extra: dict | None = None) -> dict[str, str]:
    """The safetensors ``__metadata__`` of a trained LoRA (every value a string).

    ``safet2i_*``: method, base model, its sha256, the hyper-parameters (sorted JSON), the
    training data's sha256, the architecture and the SafeT2I version. kohya's informational
    ``ss_network_module`` / ``ss_network_dim`` / ``ss_network_alpha`` (from ``hyper["rank"]``
    and ``hyper["alpha"]``; alpha None means rank). ``extra``: more keys (values that are not
    strings are written as JSON); they may not replace the keys above.
    """

    if not isinstance(hyper, dict):
        raise LoraLayerError(f"hyper must be a dict of hyper-parameters, not a {type(hyper).__name__}")
    meta = {"safet2i_method": str(method), "safet2i_base_model": str(base_model), "safet2i_base_sha256": str(base_sha256),
            "safet2i_hyper": json.dumps(hyper, sort_keys=True, default=str), "safet2i_data_sha256": str(data_sha256),
            "safet2i_arch": str(arch), "safet2i_version": str(__version__), "ss_network_module": "networks.lora"}
    if hyper.get("rank") is not None:
        meta["ss_network_dim"] = str(hyper["rank"])
    if hyper.get("alpha") is not None:
        meta["ss_network_alpha"] = str(hyper["alpha"])
    elif hyper.get("rank") is not None:
        meta["ss_network_alpha"] = str(hyper["rank"])
    for k, v in (extra or {}).items():
        k = str(k)
        if k in _RESERVED:
            raise LoraLayerError(f"metadata extra key {k!r} would replace a key lora_metadata sets itself")
        meta[k] = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
    return meta


# --------------------------------------------------------------------------- saving

def _all_targets(sets) -> list[Target]:
    sets = [sets] if isinstance(sets, LoraSet) else list(sets)
    if not sets or not all(isinstance(s, LoraSet) for s in sets):
        raise LoraLayerError("save_lora needs a LoraSet or a non-empty list of LoraSet objects")
    targets: list[Target] = []
    seen: set[tuple[str, str]] = set()
    for s in sets:
        for t in s.targets():
            key = (t.component, t.module)
            if key in seen:
                raise LoraLayerError(f"{t.name} is in two LoRA sets")
            seen.add(key)
            targets.append(t)
    return targets


def _refuse_degenerate(targets: list[Target]) -> None:

    bad = [t.name for t in targets if not (bool(torch.isfinite(t.down).all()) and bool(torch.isfinite(t.up).all()))]
    if bad:
        raise LoraLayerError(f"{len(bad)} LoRA layers contain NaN or infinite values (e.g. {bad[0]}): training "
                             "diverged; nothing was written")
    zero = [t.name for t in targets if not bool(torch.any(t.up != 0))]
    if len(zero) == len(targets):
        raise LoraLayerError(f"every up matrix (B) of the {len(targets)} LoRA layers is zero: the LoRA is untrained "
                             "(B starts at zero and only training moves it) and would change nothing; nothing was "
                             "written")
    if zero:
        raise LoraLayerError(f"{len(zero)} of the {len(targets)} LoRA layers have an all-zero up matrix (B), i.e. "
                             f"they were never trained (no gradient reached them?), e.g. {zero[:3]}; loaders refuse "
                             "such a file, so nothing was written. Inject LoRA layers only where the loss reaches.")
    try:
        check_effect(targets)
    except LoraFormatError as exc:
        raise LoraLayerError(f"the trained LoRA would be refused by every loader: {exc}; nothing was written") from exc


def _state(targets: list[Target], fmt: str) -> dict[str, torch.Tensor]:

    if fmt == "kohya":
        return to_kohya(targets)
    out: dict[str, torch.Tensor] = {}
    for t in targets:
        stem = _PEFT_PREFIX[t.component] + t.module
        out[f"{stem}.lora_A.weight"] = t.down.contiguous()
        up = (t.up.to(torch.float64) * t.scale).to(t.up.dtype)   # the scale folded into B
        out[f"{stem}.lora_B.weight"] = up.contiguous()
    return out


def _flat_key(t: Target) -> tuple[str, str]:
    return t.component, t.module.replace(".", "_")


def _compare(mem: list[Target], back: list[Target]) -> None:
    by_key = {_flat_key(t): t for t in back}
    if len(by_key) != len(back):
        raise LoraLayerError("two targets of the file have the same name")
    for t in mem:
        b = by_key.pop(_flat_key(t), None)
        if b is None:
            raise LoraLayerError(f"{t.name} is missing from the file")
        want, got = t.delta(torch.float64), b.delta(torch.float64)
        if got.shape != want.shape:
            raise LoraLayerError(f"{t.name}: shape {tuple(got.shape)} in the file, {tuple(want.shape)} in memory")
        err = float((got - want).norm()) / max(float(want.norm()), 1e-300)
        if not err <= READ_BACK_RTOL:
            raise LoraLayerError(f"{t.name}: its change of weight scale·B·A read back from the file differs from the "
                                 f"one in memory by {err:.3g} (relative, Frobenius norm)")
    if by_key:
        raise LoraLayerError(f"the file has {len(by_key)} targets that are not in memory (e.g. {next(iter(by_key))})")


def save_lora(sets, path: str | os.PathLike, *, fmt: str = "kohya", metadata: dict[str, str],
              overwrite: bool = False) -> Path:
    """Write trained LoRA layers as a safetensors file and prove it by reading it back.

    ``fmt="kohya"``: ``lora_unet_<flat path>.lora_down.weight`` / ``.lora_up.weight`` /
    ``.alpha`` (``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` for text encoders), as
    :func:`safet2i.lora.keys.to_kohya` writes them: ComfyUI's stock loader, A1111/Forge and
    SafeT2I's loaders apply scale = alpha / rank.

    ``fmt="peft"``: diffusers/PEFT keys ``unet.<path>.lora_A.weight`` / ``.lora_B.weight``
    (``text_encoder.`` / ``text_encoder_2.`` for text encoders) with **the scale alpha / rank
    folded into lora_B** (B' = scale·B) and no alpha: the file needs no ``adapter_config.json``
    and any loader of these keys applies it at scale 1, which is exactly the trained change
    (diffusers' ``pipe.load_lora_weights`` takes lora_alpha = rank without a config; SafeT2I's
    loaders take scale 1 without alpha). ComfyUI's stock LoraLoader does not know these UNet
    keys (it skips them: "lora key not loaded"); SafeT2I's ComfyUI node loads them. Use
    ``kohya`` (the default) for stock ComfyUI and A1111/Forge.

    Checks, in this order, before anything appears at ``path``: ``path`` is a new
    ``.safetensors`` file (an existing one only with ``overwrite``) with no PEFT adapter
    config beside it that would change its scale; no layer is untrained (all-zero B), NaN /
    infinite or otherwise refused by the loaders (:func:`safet2i.lora.keys.check_effect`); the
    file, written atomically (:func:`safet2i.fileio.save_safetensors`) under a temporary name,
    is read back with :func:`safet2i.lora.load_lora` and every target's change of weight
    (float64) must equal the one in memory (relative Frobenius difference at most 1e-6);
    only then is it renamed to ``path``. On a failed check the temporary file is removed
    and a :class:`LoraLayerError` raised (an existing file at ``path`` stays as it was).
    """
    if fmt not in FORMATS:
        raise LoraLayerError(f"unknown LoRA file format {fmt!r}; choose one of {list(FORMATS)}")
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise LoraLayerError(f"{path}: a LoRA is written as a .safetensors file (safetensors only)")
    if path.is_dir():
        raise LoraLayerError(f"{path} is a folder")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise LoraLayerError(f"{path} exists; pass overwrite=True to replace it")
    if not path.parent.is_dir():
        raise LoraLayerError(f"{path.parent}: no such folder")
    cfg = adapter_config_path(path)
    if cfg is not None:
        raise LoraLayerError(f"{path}: the PEFT config {cfg} beside it would be applied to this file by loaders and "
                             "change its scale; choose another name or folder")
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise LoraLayerError("metadata must be a dict of strings to strings (safetensors __metadata__); build it with "
                             "lora_metadata()")
    targets = _all_targets(sets)
    _refuse_degenerate(targets)
    meta = dict(metadata)
    meta.setdefault("safet2i_format", "kohya" if fmt == "kohya" else "peft (scale alpha/rank folded into lora_B)")
    state = _state(targets, fmt)
    tmp = path.with_name(f".{path.stem[:64]}.{os.getpid()}.check{TMP_SUFFIX}.safetensors")
    try:
        save_safetensors(tmp, state, meta)
        try:
            back = load_lora(tmp)
        except SafeT2IError as exc:
            raise LoraLayerError(f"{path.name}: the written file does not load ({exc}); nothing was written") from exc
        try:
            _compare(targets, back.targets)
        except LoraLayerError as exc:
            raise LoraLayerError(f"{path.name}: read-back check failed, nothing was written: {exc}") from exc
        if back.metadata != meta:
            raise LoraLayerError(f"{path.name}: the metadata read back differs from what was written")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def save_lora_files(sets, paths: dict[str, Path], *, metadata: dict[str, str], overwrite: bool = False
                    ) -> list[Path]:
    """Write the same LoRA in several formats (``paths``: format -> file), all or none.

    Every file's checks run first (:func:`save_lora`: new file unless ``overwrite``, no PEFT
    config beside it); then each format is written and read back under a staging name beside
    its target; only when every format passed are they renamed into place. A failure leaves
    every target as it was (no half-written set that a rerun would refuse without
    ``--overwrite``)."""
    if not paths:
        raise LoraLayerError("give at least one LoRA format")
    for fmt, path in paths.items():
        if fmt not in FORMATS:
            raise LoraLayerError(f"unknown LoRA file format {fmt!r}; choose one of {list(FORMATS)}")
        path = Path(path)
        if (path.exists() or path.is_symlink()) and not overwrite:
            raise LoraLayerError(f"{path} exists; pass overwrite=True to replace it")
        cfg = adapter_config_path(path)
        if cfg is not None:
            raise LoraLayerError(f"{path}: the PEFT config {cfg} beside it would be applied to this file by loaders "
                                 "and change its scale; choose another name or folder")
    staged: dict[str, Path] = {}
    try:
        for fmt, path in paths.items():
            path = Path(path)
            stage = path.with_name(f".{path.stem[:64]}.{os.getpid()}.staged{TMP_SUFFIX}.safetensors")
            staged[fmt] = stage
            save_lora(sets, stage, fmt=fmt, metadata=metadata, overwrite=True)
        for fmt, path in paths.items():
            os.replace(staged[fmt], path)
    finally:
        for stage in staged.values():
            if stage.exists():
                stage.unlink()
    return [Path(p) for p in paths.values()]


# --------------------------------------------------------------------------- manifest entry

def _toml_str(s: str) -> str:
    return json.dumps(str(s), ensure_ascii=True)   # a valid TOML basic string


def _tail(module: str) -> str:
    """The part of a module path below its last numbered block (``…transformer_blocks.0.attn1.to_out.0``
    → ``attn1.to_out.0``); the whole path when it has none."""
    parts = module.split(".")
    for i in range(len(parts) - 2, -1, -1):
        if parts[i].isdigit() and not parts[i + 1].isdigit():
            return ".".join(parts[i + 1:])
    return module


def module_regex(modules: list[str]) -> str:
    """A regex matching every module path given by its common tails, e.g.
    ``attn1\\.(to_k|to_out\\.0|to_q|to_v)$`` or ``(attn1|attn2)\\.(…)$``; an exact alternation of
    the tails where they share no head."""
    tails = sorted({_tail(m) for m in modules})
    groups: dict[str, set[str]] = {}
    single = []
    for t in tails:
        head, sep, rest = t.partition(".")
        if sep:
            groups.setdefault(head, set()).add(rest)
        else:
            single.append(t)
    by_rests: dict[tuple[str, ...], list[str]] = {}
    for head, rests in groups.items():
        by_rests.setdefault(tuple(sorted(rests)), []).append(head)
    alts = []
    for rests, heads in sorted(by_rests.items(), key=lambda kv: sorted(kv[1])):
        h = re.escape(heads[0]) if len(heads) == 1 else "(" + "|".join(re.escape(x) for x in sorted(heads)) + ")"
        r = re.escape(rests[0]) if len(rests) == 1 else "(" + "|".join(re.escape(x) for x in rests) + ")"
        alts.append(f"{h}\\.{r}")
    alts += [re.escape(s) for s in single]
    rx = (alts[0] if len(alts) == 1 else "(" + "|".join(alts) + ")") + "$"
    if not all(re.search(rx, m) for m in modules):   # pragma: no cover - by construction
        rx = "(" + "|".join(re.escape(m) for m in sorted(modules)) + ")$"
    return rx


def manifest_entry(key: str, file_name: str, *, title: str, method: str, paper: str, arch: str, base_model: str,
                   lora_path: str | Path, source: str = "trained locally with safet2i train",
                   licence: str = "a derivative of the base model: the base model's licence and use restrictions "
                                  "apply") -> str:
    """TOML text of one ``[models.<key>]`` entry of ``models/safety_models.toml`` for a saved LoRA.

    Read from the file itself (:func:`safet2i.lora.load_lora`): its sha256, its key layout
    (``format``), and ``expected = { components, targets, module_regex, rank }`` with the
    module pattern built from the file's module paths (:func:`module_regex`). The file must
    fit ``arch`` completely; the entry is parsed back and validated
    (:func:`safet2i.lora.manifest.validate`: e.g. ``file_name`` must contain the key's first
    word) before it is returned.
    """

    if not re.fullmatch(r"[A-Za-z0-9_-]+", key or ""):
        raise LoraLayerError(f"manifest key {key!r}: use letters, digits, '-' and '_' only")
    lf = load_lora(lora_path)
    if arch not in ARCHITECTURES:
        raise LoraLayerError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    if arch not in lf.architectures:
        fits = ", ".join(lf.architectures) or "none of the known ones"
        raise LoraLayerError(f"{lf.path.name} does not fit {ARCHITECTURES[arch].title} completely (it fits {fits}); "
                             "a manifest entry would describe it wrongly")
    ranks = sorted(lf.ranks)
    if len(ranks) != 1:
        raise LoraLayerError(f"{lf.path.name} has several ranks {ranks}; a manifest entry holds one")
    if "kohya" in lf.formats:
        fmt = "kohya (lora_unet_<flat path>.lora_down/lora_up.weight + alpha)"
    else:
        fmt = "diffusers-PEFT (unet.<path>.lora_A/lora_B.weight, scale folded into lora_B: scale 1)"
    rx = module_regex([t.module for t in lf.targets])
    regex = f"'{rx}'" if "'" not in rx and "\n" not in rx else _toml_str(rx)
    comps = ", ".join(_toml_str(c) for c in sorted(lf.components))
    lines = [
        f"[models.{key}]",
        f"title = {_toml_str(title)}",
        f"method = {_toml_str(method)}",
        f"paper = {_toml_str(paper)}",
        'kind = "lora"',
        f"arch = {_toml_str(arch)}",
        f"base_model = {_toml_str(base_model)}",
        f"format = {_toml_str(fmt)}",
        f"files = [{_toml_str(file_name)}]",
        f"sha256 = {_toml_str(lf.sha256)}",
        (f"expected = {{ components = [{comps}], targets = {len(lf.targets)}, module_regex = {regex}, "
         f"rank = {ranks[0]} }}"),
        f"source = {_toml_str(source)}",
        f"licence = {_toml_str(licence)}",
    ]
    text = "\n".join(lines) + "\n"
    # Parsed back as the manifest reader does, and validated, before anyone pastes it in.
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "entry.toml"
        p.write_text("schema = 1\n\n" + text, encoding="utf-8")
        data = _toml_load(p)
    entry = Entry(name=key, **data["models"][key])
    validate(entry)
    return text
