"""Stand-in for ``modules/ui_components.py``: ``InputAccordion``, an accordion that is a
boolean input (open = True; its value is the script argument) and a layout (``with``)."""

import gradio as gr


class InputAccordion(gr.Checkbox):
    pass
