"""Stand-in for ``modules/ui_components.py``: ``InputAccordion``, an accordion that is a
boolean input (open = True). Forge builds it through a factory over ``InputAccordionImpl``."""

import gradio as gr

from modules import _variant


class _InputAccordionImpl(gr.Checkbox):
    global_index = 0

    def __init__(self, value, **kwargs):
        self.accordion_id = kwargs.get('elem_id') or f"input-accordion-{_InputAccordionImpl.global_index}"
        _InputAccordionImpl.global_index += 1
        super().__init__(value, **{**kwargs, "elem_id": f"{self.accordion_id}-checkbox", "visible": False})
        self.accordion = gr.Accordion(**{**kwargs, "elem_id": self.accordion_id, "open": value})

    def __enter__(self):
        self.accordion.__enter__()
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.accordion.__exit__(exc_type, exc_val, exc_tb)

    def get_block_name(self):
        return "checkbox"


if _variant.VARIANT == "forge":
    InputAccordionImpl = _InputAccordionImpl

    def InputAccordion(value=None, **kwargs):
        return InputAccordionImpl(value=value, **kwargs)
else:
    InputAccordion = _InputAccordionImpl
