"""Named steering configurations, the same in every host, and SAFREE's negative prompt.

:data:`PAPER` is SAFREE as its authors ran it (the released generation scripts): the 17-string
``nudity`` concept list, α = 0.01, the official code's projection order, the self-validating
window on SD1.x/SD2.x and off on SDXL and SD3 (the released SDXL and SD3 scripts steer every
step; Flux, Qwen-Image and Wan follow SD3), and **the
concept list joined with ", " as the negative prompt** (:func:`concepts_negative`). The latent
re-attention is not part of it: as released it never runs (see ``docs/steering.md``).
:data:`CUSTOM` keeps the user's own settings. Which part of the paper's reported effect comes
from which part is in ``docs/steering.md`` ("SAFREE as the paper ran it").
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import SafeT2IError

CUSTOM = "custom settings"
PAPER = "SAFREE (paper configuration)"
CONFIGURATIONS = (CUSTOM, PAPER)


@dataclass(frozen=True)
class SteeringSettings:
    concepts: str = "nudity"          # a concept preset name, or "custom"
    custom: str = ""                  # the custom concept list (concepts = "custom")
    alpha: float = 0.01
    order: str = "code"
    self_validating: bool = True
    concepts_as_negative: bool = False


#: Families the paper configuration steers at every step: the released SDXL and SD3 scripts have
#: no self-validating window; Flux, Qwen-Image and Wan (no released script) follow SD3, the other
#: flow-matching transformer (the window's constants were fitted to SD1.4's 50 DDIM steps).
EVERY_STEP = ("sdxl", "sd3", "flux", "qwen_image", "wan")


def configure(name: str, own: SteeringSettings, arch: str | None = None) -> SteeringSettings:
    """The settings a named configuration gives (``own`` for :data:`CUSTOM`). ``arch``: the
    model family ("sd1", "sd2", "sdxl", "sd3", "flux", "qwen_image", "wan"); the paper's SDXL and
    SD3 runs steer every step (:data:`EVERY_STEP`)."""
    if name == CUSTOM:
        return own
    if name == PAPER:
        return replace(SteeringSettings(), concepts_as_negative=True, self_validating=arch not in EVERY_STEP)
    raise SafeT2IError(f"unknown steering configuration {name!r}; use one of {', '.join(CONFIGURATIONS)}")


def describe(name: str, settings: SteeringSettings) -> str:
    """One line for reports: what the configuration set."""
    what = (f"concepts {settings.concepts}, alpha {settings.alpha:g}, order {settings.order}, "
            f"self-validating {'on' if settings.self_validating else 'off'}, "
            f"concepts as negative prompt {'on' if settings.concepts_as_negative else 'off'}")
    return f"{name}: {what}" if name != CUSTOM else what


def concepts_negative(concepts: list[str], negative: str = "") -> str:
    """The negative prompt of SAFREE's runs: the concept list joined with ", ", after the user's
    own negative prompt when there is one (kept once: a negative that already ends with the
    list, e.g. pasted from an earlier image's parameters, is returned as it is)."""
    joined = ", ".join(c.strip() for c in concepts if c.strip())
    negative = (negative or "").strip()
    if not negative:
        return joined
    if negative.endswith(joined):
        return negative
    return f"{negative}, {joined}"
