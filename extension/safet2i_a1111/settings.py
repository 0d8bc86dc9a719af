"""Operator settings: ``--safet2i-enforce``, the SafeT2I settings section, and the guard that
keeps the webui's options API from changing the filter's settings.

The filter settings are marked ``restrict_api``: A1111's ``POST /sdapi/v1/options`` sets
options with ``is_api=True`` and so leaves them alone, and ``override_settings`` is applied
with ``is_api=True`` in every variant. Forge's ``POST /sdapi/v1/options`` calls
``modules.sysinfo.set_config(req)`` without ``is_api``, so there ``restrict_api`` is not
honoured and the change is saved to ``config.json``: every later API request without
SafeT2I's arguments (they come from the UI defaults these settings give) would run with the
filter off. :func:`guard_options_api` wraps that function: the restricted SafeT2I keys are
taken out of an options request before the webui applies the rest (logged); they change only
in the Settings tab (or by editing ``config.json``).
"""

from __future__ import annotations

import functools
import logging

from modules import shared

from .config import ENFORCE_ACTIONS, POLICIES, JobConfig

log = logging.getLogger("safet2i")
#: The UI's defaults: :class:`JobConfig`'s (one source for the settings, the accordion and Extras).
DEFAULTS = JobConfig()
SECTION = ("safet2i", "SafeT2I")

#: Settings that could switch the filter off or weaken it: never changed through the API.
RESTRICTED = ("safet2i_filter_default", "safet2i_filter_policy", "safet2i_filter_action", "safet2i_previews",
              "safet2i_cost_model")


def enforcement() -> dict | None:
    """``--safet2i-enforce`` (preload.py): cannot be changed from the UI, the API or override_settings."""
    opts = getattr(shared, "cmd_opts", None)
    if not getattr(opts, "safet2i_enforce", False):
        return None
    policy = getattr(opts, "safet2i_enforce_policy", "strict-5") or "strict-5"
    action = getattr(opts, "safet2i_enforce_action", "blur") or "blur"
    if policy not in POLICIES or action not in ENFORCE_ACTIONS:
        # A bad flag must not disable enforcement: fall back to the strictest sensible values.
        log.error("SafeT2I: invalid enforcement flags (%s, %s); using strict-5 / placeholder", policy, action)
        policy, action = "strict-5", "placeholder"
    return {"policy": policy, "action": action}


def default_config(enforce: dict | None = None) -> JobConfig:
    """Settings for a check no job asked for (a save outside a job, the Extras safety net, the
    API route's defaults): the operator's policy and action when enforced."""
    if not enforce:
        return JobConfig()
    return JobConfig(filter_enabled=True, filter_policy=enforce["policy"], filter_action=enforce["action"],
                     enforced=True)


def opt(key: str, default):
    return getattr(shared.opts, key, default) if hasattr(shared, "opts") else default


def on_ui_settings():
    add = shared.opts.add_option
    OptionInfo = shared.OptionInfo
    add("safet2i_filter_default", OptionInfo(DEFAULTS.filter_enabled, "Output filter on by default", section=SECTION, restrict_api=True))
    add("safet2i_filter_policy", OptionInfo(DEFAULTS.filter_policy, "Default filter policy", section=SECTION, restrict_api=True))
    add("safet2i_filter_action", OptionInfo(DEFAULTS.filter_action, "Default filter action", section=SECTION, restrict_api=True))
    add("safet2i_previews", OptionInfo("filter", "Live previews: 'filter' (check each preview) or 'hide'",
                                       section=SECTION, restrict_api=True))
    from .filtering import NO_COST_MODEL, cost_model_choices  # noqa: PLC0415

    try:
        import gradio as gr  # noqa: PLC0415
        dropdown = getattr(gr, "Dropdown", None)
    except ImportError:
        dropdown = None
    add("safet2i_cost_model", OptionInfo(
        NO_COST_MODEL, "Learned cost model checked with NudeNet (a 'safet2i train cost-model' sidecar in the "
        "pack's models/filters; unsafe if either flags)", dropdown, lambda: {"choices": cost_model_choices()},
        section=SECTION, restrict_api=True))
    add("safet2i_guidance_method", OptionInfo(DEFAULTS.guidance_method, "Default guidance method", section=SECTION))
    add("safet2i_guidance_preset", OptionInfo(DEFAULTS.guidance_preset, "Default SLD preset", section=SECTION))


def guard_options_api() -> bool:
    """Wrap Forge's ``modules.sysinfo.set_config`` (what its ``POST /sdapi/v1/options`` calls;
    the API route imports it at each request, so the wrapper is what it gets): the
    :data:`RESTRICTED` keys are dropped from the request. Idempotent; False where the webui has
    no such function (A1111 sets options through the API with ``is_api=True`` itself).

    ``modules.processing`` bound the original when it was imported (before any extension), so
    ``override_settings`` (applied with ``is_api=True``: refused anyway) and their restore are
    not affected."""
    try:
        from modules import sysinfo  # noqa: PLC0415
    except ImportError:
        return False
    original = getattr(sysinfo, "set_config", None)
    if original is None:
        return False
    if getattr(original, "_safet2i_guard", False):
        return True

    @functools.wraps(original)
    def set_config(req, *args, **kwargs):
        refused = [k for k in RESTRICTED if k in req] if hasattr(req, "items") else []
        if refused:
            log.warning("SafeT2I: the options API cannot change %s (set them in the Settings tab); ignored",
                        ", ".join(refused))
            req = {k: v for k, v in req.items() if k not in RESTRICTED}
        return original(req, *args, **kwargs)

    set_config._safet2i_guard = True
    sysinfo.set_config = set_config
    return True
