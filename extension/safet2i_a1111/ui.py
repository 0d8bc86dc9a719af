"""The SafeT2I accordion (one per tab): its components are the script's arguments, in
:meth:`JobConfig.arg_names` order, with their infotext fields for paste."""

from __future__ import annotations

from . import lora as lora_layer
from . import weights as weights_layer
from .config import (
    CONFIGURATIONS, CUSTOM, DEFAULT_CONCEPT, FILTER_ACTIONS, GUIDANCE_METHODS, LORA_STRENGTH, POLICIES,
    SLD_PRESET_NAMES, STEERING_ORDERS, JobConfig, parse_infotext, steering_presets,
)
from .settings import DEFAULTS as D
from .settings import enforcement, opt as _opt


def _refresh_button(component, refresh, tab: str):
    """The webui's own refresh button (``modules.ui_common.create_refresh_button``) when present."""
    try:
        from modules.ui_common import create_refresh_button  # noqa: PLC0415
    except ImportError:        # older webuis: no button
        return None
    return create_refresh_button(component, lambda: None, refresh, f"safet2i_lora_refresh_{tab}")


def build(is_img2img):
    """(components, infotext_fields, paste_field_names)."""
    import gradio as gr  # noqa: PLC0415

    from modules.ui_components import InputAccordion  # noqa: PLC0415

    tab = "img2img" if is_img2img else "txt2img"
    with gr.Group(elem_id=f"safet2i_{tab}"):
        with gr.Accordion("SafeT2I safety", open=False):
            with InputAccordion(False, label="Safety LoRA (model weights)") as lora_enabled:
                with gr.Row():
                    lora_file = gr.Dropdown(lora_layer.list_choices(), value=lora_layer.NONE,
                                            label="Safety LoRA (models/Lora, models/safety_models)")
                    _refresh_button(lora_file, lambda: {"choices": lora_layer.list_choices()}, tab)
                lora_strength = gr.Slider(0.05, LORA_STRENGTH[1], value=1.0, step=0.05, label="Strength")
                lora_partial = gr.Checkbox(False, label="Allow partial coverage (load the matching weights only)")
            with InputAccordion(False, label="Safety weights (full UNet / text encoder, for this job)") \
                    as weights_enabled:
                with gr.Row():
                    weights_file = gr.Dropdown(weights_layer.list_choices(), value=weights_layer.NONE,
                                               label="Safety weights (models/safety_models: ESD-u, SafeGen, "
                                                     "AdvUnlearn)")
                    _refresh_button(weights_file, lambda: {"choices": weights_layer.list_choices()},
                                    f"{tab}_weights")
                weights_part = gr.Dropdown(list(weights_layer.PARTS), value="auto",
                                           label="Replaces (auto: from the file's keys)")
            with InputAccordion(False, label="Concept steering (prompt, SAFREE-style)") as steering_enabled:
                steer_concepts = gr.Dropdown(list(steering_presets()), value=D.steering_concepts, label="Concepts")
                steer_custom = gr.Textbox("", label="Custom concepts (one per line or comma-separated)", lines=2)
                with gr.Row():
                    steer_alpha = gr.Number(0.01, label="Trigger margin α (0-10)")
                    steer_order = gr.Dropdown(list(STEERING_ORDERS), value="code", label="Projection order")
                    steer_svf = gr.Checkbox(True, label="Self-validating window (steer the first t' of 50 steps)")
                with gr.Row():
                    steer_negative = gr.Checkbox(False, label="Concepts as negative prompt (as SAFREE's runs)")
                    steer_config = gr.Dropdown(list(CONFIGURATIONS), value=CUSTOM, label="Configuration (a named one "
                                               "overrides the settings above)")
            with InputAccordion(False, label="Safety guidance (sampler)") as guidance_enabled:
                method = gr.Dropdown(list(GUIDANCE_METHODS), value=_opt("safet2i_guidance_method", D.guidance_method),
                                     label="Method")
                preset = gr.Dropdown(list(SLD_PRESET_NAMES), value=_opt("safet2i_guidance_preset", D.guidance_preset),
                                     label="SLD preset")
                concept = gr.Textbox(DEFAULT_CONCEPT, label="Unsafe concept", lines=2)
            with InputAccordion(bool(_opt("safet2i_filter_default", True)), label="Output filter") as filter_enabled:
                policy = gr.Dropdown(list(POLICIES), value=_opt("safet2i_filter_policy", D.filter_policy), label="Policy")
                action = gr.Dropdown(list(FILTER_ACTIONS), value=_opt("safet2i_filter_action", D.filter_action),
                                     label="Action")
                if enforcement():
                    gr.Markdown("The operator enforces the output filter on this server.")
    components = [guidance_enabled, method, preset, concept, filter_enabled, policy, action,
                  steering_enabled, steer_concepts, steer_custom, steer_alpha, steer_order, steer_svf,
                  lora_enabled, lora_file, lora_strength, lora_partial,
                  weights_enabled, weights_file, weights_part, steer_negative, steer_config]
    names = JobConfig.arg_names()
    assert len(components) == len(names)
    infotext_fields = [(c, (lambda key: (lambda params: parse_infotext(params).get(key, None)))(n))
                            for c, n in zip(components, names)]
    paste_field_names = ["SafeT2I guidance", "SafeT2I concept", "SafeT2I filter", "SafeT2I steering",
                              "SafeT2I steering concepts", "SafeT2I steering configuration", "SafeT2I LoRA",
                              "SafeT2I LoRA strength", "SafeT2I LoRA partial", "SafeT2I weights", "SafeT2I weights part"]
    return components, infotext_fields, paste_field_names
