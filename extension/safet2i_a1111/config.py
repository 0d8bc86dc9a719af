"""Per-job settings: UI arguments (positional, in ``ARGS`` order), operator enforcement, infotext.

The webui passes the script's UI values positionally to every hook (and the API fills them
from the UI defaults or ``alwayson_scripts``). An operator can start the webui with
``--safet2i-enforce`` (``preload.py``): then the output filter always runs with at least the
enforced policy and a censoring action, whatever the UI, the API or ``override_settings`` say.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from safet2i.filter.censor import ACTIONS
from safet2i.guidance import SLD_PRESETS

POLICIES = ("strict-5", "broad-9", "face-only")
#: Policies that check at least what the enforced one checks (broad-9 ⊃ strict-5).
AT_LEAST = {"strict-5": ("strict-5", "broad-9"), "broad-9": ("broad-9",), "face-only": ("face-only",)}
FILTER_ACTIONS = tuple(a for a in ACTIONS)
ENFORCE_ACTIONS = tuple(a for a in ACTIONS if a != "pass")
GUIDANCE_METHODS = ("none", "SLD", "SP-Guard-style", "Detect-and-Guide-style")
SLD_PRESET_NAMES = tuple(SLD_PRESETS)
DEFAULT_CONCEPT = ("an image showing hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, "
                   "nudity, bodily fluids, blood, obscene gestures, illegal activity, drug use, theft, vandalism, "
                   "weapons, child abuse, brutality, cruelty")


@dataclass
class JobConfig:
    # Order = the order of the UI components = the order of the hooks' *args. Append only.
    guidance_enabled: bool = False
    guidance_method: str = "SLD"
    guidance_preset: str = "MEDIUM"
    guidance_concept: str = DEFAULT_CONCEPT
    filter_enabled: bool = True
    filter_policy: str = "strict-5"
    filter_action: str = "blur"
    enforced: bool = False      # not a UI argument: set from the command line

    @classmethod
    def arg_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name != "enforced"]

    @classmethod
    def from_args(cls, args, enforce: dict | None = None) -> JobConfig:
        names = cls.arg_names()
        values = dict(zip(names, args))
        cfg = cls(**values)
        cfg.validate()
        if enforce:
            cfg.enforced = True
            cfg.filter_enabled = True
            if cfg.filter_action not in ENFORCE_ACTIONS:
                cfg.filter_action = enforce["action"]
            if cfg.filter_policy not in AT_LEAST[enforce["policy"]]:
                cfg.filter_policy = enforce["policy"]
        return cfg

    def validate(self) -> None:
        if self.guidance_method not in GUIDANCE_METHODS:
            raise ValueError(f"SafeT2I: unknown guidance method {self.guidance_method!r}; use one of {GUIDANCE_METHODS}")
        if self.guidance_preset not in SLD_PRESET_NAMES:
            raise ValueError(f"SafeT2I: unknown SLD preset {self.guidance_preset!r}; use one of {SLD_PRESET_NAMES}")
        if self.filter_policy not in POLICIES:
            raise ValueError(f"SafeT2I: unknown filter policy {self.filter_policy!r}; use one of {POLICIES}")
        if self.filter_action not in FILTER_ACTIONS:
            raise ValueError(f"SafeT2I: unknown filter action {self.filter_action!r}; use one of {FILTER_ACTIONS}")

    @property
    def guidance_active(self) -> bool:
        return self.guidance_enabled and self.guidance_method != "none"

    def infotext(self) -> dict[str, str]:
        out = {}
        if self.guidance_active:
            out["SafeT2I guidance"] = self.guidance_method + (f" {self.guidance_preset}" if self.guidance_method == "SLD" else "")
            if self.guidance_concept != DEFAULT_CONCEPT:
                out["SafeT2I concept"] = self.guidance_concept
        if self.filter_enabled:
            out["SafeT2I filter"] = f"{self.filter_policy} {self.filter_action}" + (" enforced" if self.enforced else "")
        return out

    def as_dict(self) -> dict:
        return asdict(self)


def parse_infotext(params: dict) -> dict:
    """Values for the UI from pasted generation parameters (keys absent → feature off)."""
    out: dict = {"guidance_enabled": "SafeT2I guidance" in params, "filter_enabled": "SafeT2I filter" in params}
    g = params.get("SafeT2I guidance", "")
    if g:
        for method in GUIDANCE_METHODS[1:]:
            if g.startswith(method):
                out["guidance_method"] = method
                rest = g[len(method):].strip()
                if method == "SLD" and rest in SLD_PRESET_NAMES:
                    out["guidance_preset"] = rest
    if "SafeT2I concept" in params:
        out["guidance_concept"] = params["SafeT2I concept"]
    f = params.get("SafeT2I filter", "").split()
    if len(f) >= 2 and f[0] in POLICIES and f[1] in FILTER_ACTIONS:
        out["filter_policy"], out["filter_action"] = f[0], f[1]
    return out
