"""Stand-in internal: the infotext functions of ``modules/infotext_utils.py``
(``generation_parameters_copypaste`` before 1.8): quoting and parsing of the "parameters"
text, and pasting it into the UI fields (``infotext_fields``: here the key is a callable that
computes the value from the parsed parameters; ``None`` leaves the field unchanged)."""

from __future__ import annotations

import json
import re

re_param = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
re_imagesize = re.compile(r"^(\d+)x(\d+)$")


def quote(text):
    if ',' not in str(text) and '\n' not in str(text) and ':' not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def parse_generation_parameters(x: str):
    res = {}
    prompt = ""
    negative_prompt = ""
    done_with_prompt = False
    *lines, lastline = x.strip().split("\n")
    if len(re_param.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ''
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    for k, v in re_param.findall(lastline):
        if v and v[0] == '"' and v[-1] == '"':
            v = json.loads(v)
        m = re_imagesize.match(v)
        if m is not None:
            res[f"{k}-1"] = m.group(1)
            res[f"{k}-2"] = m.group(2)
        else:
            res[k] = v
    res["Prompt"] = prompt
    res["Negative prompt"] = negative_prompt
    return res


def connect_paste(button, paste_fields, input_comp, override_settings_component, tabname):
    """Upstream wires the paste button; the stand-in returns the paste function it would wire."""
    import gradio as gr

    def paste_func(prompt):
        params = parse_generation_parameters(prompt)
        res = []
        for output, key in paste_fields:
            v = key(params)
            if v is None:
                res.append(gr.update())
            else:
                res.append(gr.update(value=type(output.value)(v)))
        return res

    return paste_func
