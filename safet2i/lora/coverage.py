"""Which weights a LoRA means to patch, and proof that the host matched every one of them.

A safety LoRA that silently patches nothing (ComfyUI's stock loader and DUO's diffusers keys)
or only part of what it contains leaves the user unprotected while they believe otherwise, so
:func:`require_full` turns any unmatched target into an error naming the keys, unless the user
explicitly allows a partial load, which is then reported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import SafeT2IError
from .arch import inventory, is_dit, titles
from .keys import Target


class CoverageError(SafeT2IError):
    """A safety weight file would not (fully) patch the model it is applied to."""


@dataclass
class TargetStatus:
    target: str              # component:module
    source_key: str          # first key in the file
    host_key: str | None
    expected_shape: tuple[int, ...]
    host_shape: tuple[int, ...] | None
    rank: int
    scale: float

    @property
    def matched(self) -> bool:
        return self.host_key is not None and self.host_shape == self.expected_shape

    @property
    def reason(self) -> str:
        if self.host_key is None:
            return "no such weight in the model"
        if self.host_shape != self.expected_shape:
            return f"shape {self.host_shape} in the model, {self.expected_shape} in the file"
        return "matched"


@dataclass
class Coverage:
    host: str
    statuses: list[TargetStatus] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)  # host keys proven patched after loading

    @property
    def matched(self) -> list[TargetStatus]:
        return [s for s in self.statuses if s.matched]

    @property
    def unmatched(self) -> list[TargetStatus]:
        return [s for s in self.statuses if not s.matched]

    def as_dict(self, weights: bool = True) -> dict:
        by_comp: dict[str, list[int]] = {}
        for s in self.statuses:
            c = by_comp.setdefault(s.target.split(":")[0], [0, 0])
            c[0] += s.matched
            c[1] += 1
        return {
            "host": self.host, "targets": len(self.statuses), "matched": len(self.matched),
            "unmatched": [{"key": s.source_key, "target": s.target, "reason": s.reason} for s in self.unmatched],
            "by_component": {k: {"matched": v[0], "targets": v[1]} for k, v in by_comp.items()},
            "applied": len(self.applied),
            **({"weights": [{"key": s.source_key, "target": s.target, "host": s.host_key, "status": s.reason,
                             "rank": s.rank, "scale": s.scale} for s in self.statuses]} if weights else {}),
        }

    def summary(self) -> str:
        d = self.as_dict()
        parts = ", ".join(f"{k} {v['matched']}/{v['targets']}" for k, v in d["by_component"].items())
        return f"{d['matched']}/{d['targets']} target weights matched in {self.host} ({parts})"


def check(targets: list[Target], resolve: Callable[[Target], tuple[str | None, tuple | None]], host: str) -> Coverage:
    """``resolve(target) -> (host weight key or None, host weight shape or None)``."""
    cov = Coverage(host)
    for t in targets:
        key, shape = resolve(t)
        cov.statuses.append(TargetStatus(t.name, t.source_keys[0], key, tuple(t.weight_shape),
                                         tuple(shape) if shape is not None else None, t.rank, t.scale))
    return cov


def require_full(cov: Coverage, what: str, allow_partial: bool = False, limit: int = 12) -> None:
    """Raise :class:`CoverageError` if nothing, or (unless allowed) not everything, matched."""
    bad = cov.unmatched
    if not cov.statuses:
        raise CoverageError(f"{what}: the file contains no LoRA targets.")
    if len(bad) == len(cov.statuses):
        raise CoverageError(
            f"{what} patches NOTHING in {cov.host}: none of its {len(bad)} target weights exists there with the "
            f"same shape (made for another architecture?). First: " + _list(bad, limit)
        )
    if bad and not allow_partial:
        raise CoverageError(
            f"{what} would patch only {len(cov.matched)} of its {len(cov.statuses)} target weights in {cov.host}; "
            f"unmatched ({len(bad)}): " + _list(bad, limit) + ". Enable allow_partial to load the rest anyway."
        )


def check_strengths(components: dict[str, int], strength_model: float, strength_clip: float, what: str,
                    names: tuple[str, str] = ("strength_model", "strength_clip")) -> None:
    """Refuse strengths that invert or switch off a safety LoRA while it would be reported as loaded.

    A negative strength subtracts the safety patch (it *adds* what the LoRA removes); zero for a
    part the file has targets in (UNet, text encoder) patches nothing there.
    """
    parts = [(names[0], "UNet", strength_model, components.get("unet", 0)),
             (names[1], "text-encoder", strength_clip, components.get("te1", 0) + components.get("te2", 0))]
    for name, part, value, n in parts:
        if value < 0:
            raise SafeT2IError(f"{what}: {name} = {value} is negative, which INVERTS a safety LoRA (it would add "
                               "what the LoRA removes). Use a positive strength (1.0 = as trained).")
        if value == 0 and n:
            raise SafeT2IError(f"{what}: {name} = 0 switches off its {n} {part} patches, so this part would not be "
                               "protected while the model is reported as patched. Use a positive strength "
                               "(1.0 = as trained), or do not load the LoRA.")


def patch_counts(patches: dict) -> dict[str, int]:
    """Number of patches per weight key of a ComfyUI ``ModelPatcher.patches`` dict."""
    return {k: len(v) for k, v in patches.items()}


def patch_gain_problems(before: dict[str, int], after: dict[str, int], keys: list[str]) -> list[str]:
    """Keys that did not gain exactly one patch between ``before`` and ``after``.

    ``ModelPatcher.clone()`` copies the patches already on a model, so "the key has a patch" is
    also true when an earlier LoRA patched the same weight and this one patched nothing.
    """
    want: dict[str, int] = {}
    for k in keys:   # a stacked weight (Flux qkv) gets one patch per target it holds
        want[k] = want.get(k, 0) + 1
    out = []
    for k, n in want.items():
        gained = after.get(k, 0) - before.get(k, 0)
        if gained != n:
            out.append(f"{k} (+{gained} patches" + (f", expected {n})" if n != 1 else ")"))
    return out


def _list(statuses: list[TargetStatus], limit: int) -> str:
    s = "; ".join(f"{x.source_key} ({x.reason})" for x in statuses[:limit])
    return s + (f"; … and {len(statuses) - limit} more" if len(statuses) > limit else "")


def dit_resolver(inv) -> Callable[[Target], tuple[str | None, tuple | None]]:
    """Resolve transformer targets against a ``dit_arch.DitInventory`` (diffusers names, native
    names, stacked native weights as a whole, kohya-flat forms of both)."""
    flat = {k.replace(".", "_"): k for k in (*inv.modules, *inv.natives)}

    def resolve(t: Target):
        if t.component != "unet" or t.naming not in ("dit", "diffusers", "flat"):
            return None, None
        name = flat.get(t.module) if t.naming == "flat" else t.module
        if name in inv.modules:
            return f"unet.{name}", inv.modules[name].shape
        if name in inv.natives:
            return f"unet.{name}", inv.natives[name].shape
        return None, None

    return resolve


def resolver_for(arch: str) -> Callable[[Target], tuple[str | None, tuple | None]]:
    """Resolve targets against a known architecture's inventory (no host needed)."""
    if is_dit(arch):
        from .dit_arch import arch_inventory  # noqa: PLC0415

        return dit_resolver(arch_inventory(arch))
    inv = inventory(arch)
    by_ldm = {m.ldm: m for m in inv["unet"].values()}
    by_flat = {(c, m.diffusers.replace(".", "_")): m for c, mods in inv.items() for m in mods.values()}

    def resolve(t: Target):
        mods = inv.get(t.component, {})
        m = None
        if t.naming == "diffusers":
            m = mods.get(t.module)
        elif t.naming == "ldm" and t.component == "unet":
            m = by_ldm.get(t.module)
        elif t.naming == "flat":
            m = by_flat.get((t.component, t.module))
        return (f"{t.component}.{m.diffusers}", m.shape) if m else (None, None)

    return resolve


def detect_architectures(targets: list[Target]) -> dict[str, Coverage]:
    """Coverage of the file against every known architecture (full matches first)."""
    covs = {a: check(targets, resolver_for(a), title) for a, title in titles().items()}
    return dict(sorted(covs.items(), key=lambda kv: -len(kv[1].matched)))


def full_matches(targets: list[Target]) -> list[str]:
    return [a for a, c in detect_architectures(targets).items() if not c.unmatched]


def merged(weight: torch.Tensor, t: Target, strength: float = 1.0) -> torch.Tensor:
    """New weight: ``W + strength·scale·B·A``; with DoRA ``W + strength·(m·V/‖·‖ − W)``, V = W + scale·B·A.

    DoRA norms: PEFT's magnitude vector divides by ‖V‖ per output row (PEFT's rule); a kohya/LyCORIS
    ``dora_scale`` follows ComfyUI's loader (per output row of W when it has one value per output,
    otherwise per input column of V), so a file gives the same weights here and in ComfyUI.
    """
    w = weight.detach().to(torch.float64)
    delta = t.delta(torch.float64)
    if t.dora_scale is None:
        return (w + strength * delta).to(weight.dtype)
    v = w + delta
    ones = [1] * (v.dim() - 1)
    m = t.dora_scale.to(torch.float64)
    if t.dora_kind == "peft" or m.shape[0] == v.shape[0]:
        src = v if t.dora_kind == "peft" else w
        norm = src.reshape(src.shape[0], -1).norm(dim=1).reshape(src.shape[0], *ones)
        m = m.reshape(v.shape[0], *ones)
    else:
        norm = v.transpose(0, 1).reshape(v.shape[1], -1).norm(dim=1).reshape(v.shape[1], *ones).transpose(0, 1)
    return (w + strength * (m * v / norm - w)).to(weight.dtype)
