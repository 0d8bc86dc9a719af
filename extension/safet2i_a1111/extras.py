"""Extras tab: the output filter on upscaled / post-processed images."""

from __future__ import annotations

from modules import scripts_postprocessing

from .config import FILTER_ACTIONS, POLICIES, JobConfig
from .filtering import blocked_image, filter_image
from .settings import DEFAULTS, default_config, enforcement


class SafeT2IExtras(scripts_postprocessing.ScriptPostprocessing):
    name = "SafeT2I output filter"
    order = 100000  # last: after upscaling and face restoration

    def ui(self):
        import gradio as gr  # noqa: PLC0415

        from modules.ui_components import InputAccordion  # noqa: PLC0415

        with InputAccordion(True, label="SafeT2I output filter") as enabled:
            policy = gr.Dropdown(list(POLICIES), value=DEFAULTS.filter_policy, label="Policy")
            action = gr.Dropdown(list(FILTER_ACTIONS), value=DEFAULTS.filter_action, label="Action")
        return {"enabled": enabled, "policy": policy, "action": action}

    def process(self, pp, enabled=True, policy="strict-5", action="blur"):
        try:
            enforce = enforcement()
            try:
                cfg = JobConfig.from_args([False, "SLD", "MEDIUM", "", enabled, policy, action], enforce)
            except ValueError:                      # unknown policy / action: the strictest handling
                cfg = default_config(enforce)
                cfg.filter_action = "placeholder"
            if not cfg.filter_enabled:
                return
            o = filter_image(pp.image, cfg.filter_policy, cfg.filter_action)
            pp.image = o.image
            verdict = o.verdict
        except Exception as exc:  # noqa: BLE001 - the webui would log it and pass the image on unchecked
            pp.image = blocked_image(getattr(pp.image, "size", (64, 64)), "error")
            verdict = f"error: {type(exc).__name__}: {exc}"
        info = getattr(pp, "info", None)
        if isinstance(info, dict):
            info["SafeT2I verdict"] = verdict
