"""Tiny stand-in for gradio (stand-in internal, not checked against upstream): components
record their constructor arguments and ``value``; layouts are context managers. Enough for
an extension's ``ui()`` to run outside a browser and for the API to read default values."""

from __future__ import annotations

_stack: list = []


def update(**kwargs):
    return {"__type__": "update", **kwargs}


class Block:
    def __init__(self, *args, **kwargs):
        self.args = args
        self.kwargs = kwargs
        self.elem_id = kwargs.get("elem_id")
        self.label = kwargs.get("label")
        self.visible = kwargs.get("visible", True)
        self.children = []
        if _stack:
            _stack[-1].children.append(self)

    def __enter__(self):
        _stack.append(self)
        return self

    def __exit__(self, *exc):
        _stack.pop()
        return False

    def change(self, *args, **kwargs):
        return None

    def click(self, *args, **kwargs):
        return None

    def select(self, *args, **kwargs):
        return None


class Blocks(Block):
    pass


class Group(Block):
    pass


class Row(Block):
    pass


class Column(Block):
    pass


class Accordion(Block):
    pass


class Tab(Block):
    pass


class Component(Block):
    def __init__(self, value=None, *args, **kwargs):
        if "value" in kwargs:
            value = kwargs.pop("value")
        super().__init__(*args, **kwargs)
        self.value = value() if callable(value) else value
        self.choices = kwargs.get("choices")
        self.minimum = kwargs.get("minimum")
        self.maximum = kwargs.get("maximum")
        self.step = kwargs.get("step")


class Checkbox(Component):
    pass


class Textbox(Component):
    pass


class Dropdown(Component):
    def __init__(self, choices=None, value=None, *args, **kwargs):
        kwargs.setdefault("choices", choices)
        super().__init__(value, *args, **kwargs)


class Slider(Component):
    def __init__(self, minimum=0, maximum=100, value=None, *args, **kwargs):
        kwargs.setdefault("minimum", minimum)
        kwargs.setdefault("maximum", maximum)
        super().__init__(value if value is not None else minimum, *args, **kwargs)


class Number(Component):
    pass


class Radio(Dropdown):
    pass


class Markdown(Component):
    pass


class HTML(Component):
    pass


class Button(Component):
    pass


class Image(Component):
    pass
