"""Stand-in for Forge's ``backend/text_processing/parsing.py``: ``parse_prompt_attention``, written
here from its documented contract (the webui's prompt-weight syntax), not copied.

Returns ``[[text, weight], ...]``: ``(text)`` multiplies by 1.1, ``[text]`` divides by 1.1,
``(text:w)`` sets w, ``\\(`` etc. are literal, ``BREAK`` on its own is ``["BREAK", -1]``, adjacent
pieces of equal weight are merged, and an empty prompt is ``[["", 1.0]]``. The stand-in's tests
only need plain words, weights and BREAK; nested weights multiply as upstream's do.
"""

import re

_TOKEN = re.compile(r"\\[()\[\]\\]|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:|\\")


def parse_prompt_attention(text, emphasis):
    if emphasis == "None":       # upstream: the syntax is off, the text is taken as it is
        return [[text, 1.0]]
    out, round_open, square_open = [], [], []

    def scale(start, factor):
        for piece in out[start:]:
            piece[1] *= factor

    for m in _TOKEN.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\") and len(tok) == 2:
            out.append([tok[1], 1.0])
        elif tok == "(":
            round_open.append(len(out))
        elif tok == "[":
            square_open.append(len(out))
        elif weight is not None and round_open:
            scale(round_open.pop(), float(weight))
        elif tok == ")" and round_open:
            scale(round_open.pop(), 1.1)
        elif tok == "]" and square_open:
            scale(square_open.pop(), 1 / 1.1)
        else:
            parts = re.split(r"\s*\bBREAK\b\s*", tok)
            for i, part in enumerate(parts):
                if i:
                    out.append(["BREAK", -1])
                out.append([part, 1.0])
    for start in round_open:
        scale(start, 1.1)
    for start in square_open:
        scale(start, 1 / 1.1)
    if not out:
        return [["", 1.0]]
    merged = [out[0]]
    for piece in out[1:]:
        if piece[1] == merged[-1][1] and piece[1] != -1 and merged[-1][1] != -1:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return merged
