"""Stand-in internal: the infotext functions of ``modules/infotext_utils.py``
(``generation_parameters_copypaste`` before 1.8): quoting and parsing of the "parameters" text, and pasting it into the UI fields
(``infotext_fields``: a key names a parameter; a callable computes the value; ``None``
leaves the field unchanged)."""

from __future__ import annotations

import json
import re


re_param_code = r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)'
re_param = re.compile(re_param_code)
re_imagesize = re.compile(r"^(\d+)x(\d+)$")


def quote(text):
    if ',' not in str(text) and '\n' not in str(text) and ':' not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text):
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def parse_generation_parameters(x: str, skip_fields=None):  # noqa: D401
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
            v = unquote(v)
        m = re_imagesize.match(v)
        if m is not None:
            res[f"{k}-1"] = m.group(1)
            res[f"{k}-2"] = m.group(2)
        else:
            res[k] = v
    res["Prompt"] = prompt
    res["Negative prompt"] = negative_prompt
    for key in (skip_fields or []):
        res.pop(key, None)
    return res


def connect_paste(button, paste_fields, input_comp, override_settings_component, tabname):
    """Upstream wires the paste button; the stand-in returns the paste function it would wire."""
    import gradio as gr

    def paste_func(prompt):
        params = parse_generation_parameters(prompt)
        from modules import script_callbacks
        script_callbacks.infotext_pasted_callback(prompt, params)
        res = []
        for output, key in paste_fields:
            if callable(key):
                try:
                    v = key(params)
                except Exception:
                    v = None
            else:
                v = params.get(key, None)
            if v is None:
                res.append(gr.update())
            elif isinstance(v, dict) and v.get("__type__") == "update":
                res.append(v)
            else:
                try:
                    valtype = type(output.value)
                    if valtype == bool and v == "False":
                        val = False
                    elif valtype == int:
                        val = float(v)
                    else:
                        val = valtype(v)
                    res.append(gr.update(value=val))
                except Exception:
                    res.append(gr.update())
        return res

    return paste_func
