"""Tiny stand-in for gradio (stand-in internal, not checked against upstream): components
keep their ``value``; layouts are context managers. Enough for an extension's ``ui()`` to run
outside a browser and for the API to read default values."""

from __future__ import annotations


def update(**kwargs):
    return {"__type__": "update", **kwargs}


class Block:
    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class Blocks(Block):
    pass


class Group(Block):
    pass


class Row(Block):
    pass


class Accordion(Block):
    pass


class Component(Block):
    def __init__(self, value=None, **kwargs):
        self.value = value


class Checkbox(Component):
    pass


class Textbox(Component):
    pass


class Number(Component):
    pass


class Markdown(Component):
    pass


class Dropdown(Component):
    def __init__(self, choices=None, value=None, **kwargs):
        super().__init__(value)


class Slider(Component):
    def __init__(self, minimum=0, maximum=100, value=None, **kwargs):
        super().__init__(value)
