"""Per-job settings: UI arguments (positional, in ``ARGS`` order), operator enforcement, infotext.

The webui passes the script's UI values positionally to every hook (and the API fills them
from the UI defaults or ``alwayson_scripts``). An operator can start the webui with
``--safet2i-enforce`` (``preload.py``): then the output filter always runs with at least the
enforced policy and a censoring action, whatever the UI, the API or ``override_settings`` say.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from safet2i.filter.censor import ACTIONS
from safet2i.filter.policy import DEFAULT_POLICY, PRESETS as FILTER_PRESETS
from safet2i.guidance import DEFAULT_CONCEPT, METHODS, SLD_PRESETS
from safet2i.steering.safree import ORDERS
from safet2i.steering.settings import CONFIGURATIONS, CUSTOM, SteeringSettings, configure

# Every choice list comes from the core; only the host's own additions are spelt out here.
POLICIES = tuple(FILTER_PRESETS)
#: Policies that check at least what the enforced one checks (broad-9 ⊃ strict-5).
AT_LEAST = {"strict-5": ("strict-5", "broad-9"), "broad-9": ("broad-9",), "face-only": ("face-only",)}
FILTER_ACTIONS = tuple(a for a in ACTIONS)
ENFORCE_ACTIONS = tuple(a for a in ACTIONS if a != "pass")
GUIDANCE_METHODS = ("none", *METHODS)
SLD_PRESET_NAMES = tuple(SLD_PRESETS)


@dataclass
class JobConfig:
    # Order = the order of the UI components = the order of the hooks' *args. Append only.
    guidance_enabled: bool = False
    guidance_method: str = "SLD"
    guidance_preset: str = "MEDIUM"
    guidance_concept: str = DEFAULT_CONCEPT
    filter_enabled: bool = True
    filter_policy: str = DEFAULT_POLICY
    filter_action: str = "blur"
    enforced: bool = False      # not a UI argument: set from the command line
    # Prompt layer (steering.py), appended after the arguments above.
    steering_enabled: bool = False
    steering_concepts: str = "nudity"
    steering_custom: str = ""
    steering_alpha: float = 0.01
    steering_order: str = "code"
    steering_self_validating: bool = True
    # Model layer (lora.py): a safety LoRA through the webui's built-in networks.
    lora_enabled: bool = False
    lora_file: str = "None"
    lora_strength: float = 1.0
    lora_allow_partial: bool = False
    # Model layer (weights.py): full safety weights (UNet or text encoder) for the job.
    weights_enabled: bool = False
    weights_file: str = "None"
    weights_part: str = "auto"      # auto (from the file's keys) | unet | text_encoder
    # Prompt layer, appended later (issue 21): SAFREE's negative prompt and named configurations.
    steering_concepts_as_negative: bool = False
    steering_configuration: str = CUSTOM

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
        # API callers send JSON: "false" must not read as True (bool("false") is True).
        self.guidance_enabled, self.filter_enabled = as_bool(self.guidance_enabled), as_bool(self.filter_enabled)
        if self.guidance_method not in GUIDANCE_METHODS:
            raise ValueError(f"SafeT2I: unknown guidance method {self.guidance_method!r}; use one of {GUIDANCE_METHODS}")
        if self.guidance_preset not in SLD_PRESET_NAMES:
            raise ValueError(f"SafeT2I: unknown SLD preset {self.guidance_preset!r}; use one of {SLD_PRESET_NAMES}")
        if self.filter_policy not in POLICIES:
            raise ValueError(f"SafeT2I: unknown filter policy {self.filter_policy!r}; use one of {POLICIES}")
        if self.filter_action not in FILTER_ACTIONS:
            raise ValueError(f"SafeT2I: unknown filter action {self.filter_action!r}; use one of {FILTER_ACTIONS}")
        validate_layers(self)

    def steering(self, arch: str | None) -> SteeringSettings:
        """The steering settings of this job (a named configuration overrides the others)."""
        own = SteeringSettings(self.steering_concepts, self.steering_custom, self.steering_alpha, self.steering_order,
                               self.steering_self_validating, self.steering_concepts_as_negative)
        return configure(self.steering_configuration, own, arch)

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
        else:
            out["SafeT2I filter"] = "off"     # explicit: pasting an image without the key leaves the filter as is
        out.update(layers_infotext(self))
        return out

    def as_dict(self) -> dict:
        return asdict(self)


def as_bool(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def parse_infotext(params: dict) -> dict:
    """Values for the UI from pasted generation parameters. A safety layer is switched on when
    its key is present and the filter off only by an explicit ``SafeT2I filter: off``; a
    missing key leaves the UI as it is (pasting any other image's parameters must not turn
    protection off)."""
    out: dict = {}
    if "SafeT2I guidance" in params:
        out["guidance_enabled"] = True
    if "SafeT2I filter" in params:
        out["filter_enabled"] = str(params["SafeT2I filter"]).strip() != "off"
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
    out.update(parse_layers_infotext(params))
    return out


# --------------------------------------------------------------------------- steering and LoRA arguments

STEERING_ORDERS = tuple(ORDERS)
WEIGHTS_PARTS = ("auto", "unet", "text_encoder")
LORA_STRENGTH = (0.0, 2.0)      # exclusive, inclusive: a safety LoRA is never turned off or inverted here


def steering_presets() -> tuple[str, ...]:
    from safet2i.steering.concepts import preset_choices  # noqa: PLC0415

    return tuple(preset_choices())


def validate_layers(cfg: JobConfig) -> None:
    import math  # noqa: PLC0415

    # API callers send JSON: "false" must not read as True.
    cfg.steering_enabled, cfg.lora_enabled = as_bool(cfg.steering_enabled), as_bool(cfg.lora_enabled)
    cfg.steering_self_validating = as_bool(cfg.steering_self_validating)
    cfg.steering_concepts_as_negative = as_bool(cfg.steering_concepts_as_negative)
    if cfg.steering_configuration not in CONFIGURATIONS:
        raise ValueError(f"SafeT2I: unknown steering configuration {cfg.steering_configuration!r}; "
                         f"use one of {CONFIGURATIONS}")
    cfg.lora_allow_partial = as_bool(cfg.lora_allow_partial)
    cfg.steering_alpha, cfg.lora_strength = float(cfg.steering_alpha), float(cfg.lora_strength)
    cfg.steering_custom, cfg.lora_file = str(cfg.steering_custom or ""), str(cfg.lora_file or "None")
    if cfg.steering_concepts not in steering_presets():
        raise ValueError(f"SafeT2I: unknown steering concepts {cfg.steering_concepts!r}; use one of {steering_presets()}")
    if cfg.steering_order not in STEERING_ORDERS:
        raise ValueError(f"SafeT2I: unknown steering order {cfg.steering_order!r}; use one of {STEERING_ORDERS}")
    if not (math.isfinite(cfg.steering_alpha) and 0.0 <= cfg.steering_alpha <= 10.0):
        raise ValueError(f"SafeT2I: steering alpha must be in [0, 10], not {cfg.steering_alpha}")
    lo, hi = LORA_STRENGTH
    if not (math.isfinite(cfg.lora_strength) and lo < cfg.lora_strength <= hi):
        raise ValueError(f"SafeT2I: safety LoRA strength must be in ({lo:g}, {hi:g}], not {cfg.lora_strength}")
    if cfg.lora_enabled and cfg.lora_file == "None":
        raise ValueError("SafeT2I: the safety LoRA is enabled but no file is chosen")
    cfg.weights_enabled = as_bool(cfg.weights_enabled)
    cfg.weights_file, cfg.weights_part = str(cfg.weights_file or "None"), str(cfg.weights_part or "auto")
    if cfg.weights_part not in WEIGHTS_PARTS:
        raise ValueError(f"SafeT2I: unknown safety-weights part {cfg.weights_part!r}; use one of {WEIGHTS_PARTS}")
    if cfg.weights_enabled and cfg.weights_file == "None":
        raise ValueError("SafeT2I: the safety weights are enabled but no file is chosen")


def layers_infotext(cfg: JobConfig) -> dict[str, str]:
    out = {}
    if cfg.steering_enabled:
        out["SafeT2I steering"] = (f"{cfg.steering_concepts} alpha={cfg.steering_alpha:g} order={cfg.steering_order} "
                                   f"svf={'on' if cfg.steering_self_validating else 'off'}"
                                   + (" negative=concepts" if cfg.steering_concepts_as_negative else ""))
        if cfg.steering_configuration != CUSTOM:
            out["SafeT2I steering configuration"] = cfg.steering_configuration
        if cfg.steering_concepts == "custom":
            out["SafeT2I steering concepts"] = cfg.steering_custom
    if cfg.lora_enabled:
        out["SafeT2I LoRA"] = cfg.lora_file
        out["SafeT2I LoRA strength"] = f"{cfg.lora_strength:g}"
        if cfg.lora_allow_partial:
            out["SafeT2I LoRA partial"] = "allowed"
    if cfg.weights_enabled:
        out["SafeT2I weights"] = cfg.weights_file    # process() adds "[sha256 … part n/N verified]"
        if cfg.weights_part != "auto":
            out["SafeT2I weights part"] = cfg.weights_part
    return out


def weights_file_of(value: str) -> str:
    """The choice in an infotext value ``CHOICE [sha256 … unet 10/10 verified]``."""
    value = str(value).strip()
    if value.endswith("]") and " [" in value:
        return value.rpartition(" [")[0]
    return value


def parse_layers_infotext(params: dict) -> dict:
    """Like :func:`parse_infotext`: a present key switches its layer on; a missing key leaves
    the UI as it is (pasting another image's parameters never switches steering or the
    safety LoRA off)."""
    out: dict = {}
    if "SafeT2I steering" in params:
        out["steering_enabled"] = True
    if "SafeT2I LoRA" in params:
        out["lora_enabled"] = True
    words = str(params.get("SafeT2I steering", "")).split()
    if words:
        if words[0] in steering_presets():
            out["steering_concepts"] = words[0]
        for w in words[1:]:
            key, _, value = w.partition("=")
            if key == "alpha":
                try:
                    out["steering_alpha"] = float(value)
                except ValueError:
                    pass
            elif key == "order" and value in STEERING_ORDERS:
                out["steering_order"] = value
            elif key == "svf" and value in ("on", "off"):
                out["steering_self_validating"] = value == "on"
        out["steering_concepts_as_negative"] = "negative=concepts" in words[1:]
    if "SafeT2I steering" in params:      # a configuration applies to this image's steering only
        configuration = str(params.get("SafeT2I steering configuration", CUSTOM)).strip()
        out["steering_configuration"] = configuration if configuration in CONFIGURATIONS else CUSTOM
    if "SafeT2I steering concepts" in params:
        out["steering_custom"] = params["SafeT2I steering concepts"]
    if "SafeT2I LoRA" in params:
        out["lora_file"] = params["SafeT2I LoRA"]
        out["lora_allow_partial"] = "SafeT2I LoRA partial" in params
        try:
            out["lora_strength"] = float(params.get("SafeT2I LoRA strength", 1.0))
        except ValueError:
            pass
    if "SafeT2I weights" in params:        # a missing key leaves the UI as it is
        out["weights_enabled"] = True
        out["weights_file"] = weights_file_of(params["SafeT2I weights"])
        part = str(params.get("SafeT2I weights part", "auto")).strip()
        out["weights_part"] = part if part in WEIGHTS_PARTS else "auto"
    return out
