"""Stand-in for ``modules/prompt_parser.py``: prompts → scheduled conditionings, ``AND``
composition, and the per-step batch reconstruction the CFG denoiser uses. Prompt editing
(``[a:b:0.5]``) is not imitated: every prompt has one schedule."""

from __future__ import annotations

import re
from collections import namedtuple

import torch

from modules import _variant

ScheduledPromptConditioning = namedtuple("ScheduledPromptConditioning", ["end_at_step", "cond"])


class SdConditioning(list):
    """A list of prompts with the image size (SDXL conditions on it)."""

    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None):
        super().__init__()
        self.extend(prompts)
        if copy_from is None:
            copy_from = prompts
        self.is_negative_prompt = is_negative_prompt or getattr(copy_from, 'is_negative_prompt', False)
        self.width = width or getattr(copy_from, 'width', None)
        self.height = height or getattr(copy_from, 'height', None)


def _rows(conds, i):
    if isinstance(conds, dict):
        return {k: v[i] for k, v in conds.items()}
    return conds[i]


def get_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    conds = model.get_learned_conditioning(prompts)
    return [[ScheduledPromptConditioning(steps, _rows(conds, i))] for i in range(len(prompts))]


_re_and = re.compile(r"\bAND\b")
_re_weight = re.compile(r"^(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$", re.S)


def get_multicond_prompt_list(prompts):
    res_indexes = []
    prompt_indexes = {}
    prompt_flat_list = SdConditioning([], copy_from=prompts) if isinstance(prompts, SdConditioning) else []
    for prompt in prompts:
        indexes = []
        for subprompt in _re_and.split(prompt):
            m = _re_weight.search(subprompt)
            text, weight = m.groups() if m is not None else (subprompt, 1.0)
            weight = float(weight) if weight is not None else 1.0
            index = prompt_indexes.get(text, None)
            if index is None:
                index = len(prompt_flat_list)
                prompt_flat_list.append(text)
                prompt_indexes[text] = index
            indexes.append((index, weight))
        res_indexes.append(indexes)
    return res_indexes, prompt_flat_list, prompt_indexes


class ComposableScheduledPromptConditioning:
    def __init__(self, schedules, weight=1.0):
        self.schedules = schedules
        self.weight = weight


class MulticondLearnedConditioning:
    def __init__(self, shape, batch):
        self.shape = shape
        self.batch = batch


def get_multicond_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    res_indexes, prompt_flat_list, _ = get_multicond_prompt_list(prompts)
    learned = get_learned_conditioning(model, prompt_flat_list, steps, hires_steps, use_old_scheduling)
    res = [[ComposableScheduledPromptConditioning(learned[i], weight) for i, weight in indexes]
           for indexes in res_indexes]
    return MulticondLearnedConditioning(shape=(len(prompts),), batch=res)


class DictWithShape(dict):
    def __init__(self, x, shape=None):
        super().__init__()
        self.update(x)

    if _variant.is_17():          # 1.7: the shape argument is required
        def __init__(self, x, shape):  # noqa: F811
            super().__init__()
            self.update(x)

    @property
    def shape(self):
        return self["crossattn"].shape


def _pick(schedules, current_step):
    for current, entry in enumerate(schedules):
        if current_step <= entry.end_at_step:
            return current
    return 0


def reconstruct_cond_batch(c, current_step):
    picked = [cond_schedule[_pick(cond_schedule, current_step)].cond for cond_schedule in c]
    if isinstance(picked[0], dict):
        stacked = {k: torch.stack([x[k] for x in picked]) for k in picked[0]}
        return DictWithShape(stacked, stacked["crossattn"].shape)
    return torch.stack(picked)


def stack_conds(tensors):
    """Upstream pads shorter prompts (repeating their last row); every prompt here has the same length."""
    return torch.stack(tensors)


def reconstruct_multicond_batch(c, current_step):
    """(conds_list, stacked): ``conds_list[i]`` = [(row, weight), ...] of image i; the rows of
    every image's sub-prompts follow each other in image order."""
    tensors = []
    conds_list = []
    for composable_prompts in c.batch:
        conds_for_batch = []
        for composable_prompt in composable_prompts:
            schedules = composable_prompt.schedules
            conds_for_batch.append((len(tensors), composable_prompt.weight))
            tensors.append(schedules[_pick(schedules, current_step)].cond)
        conds_list.append(conds_for_batch)
    if isinstance(tensors[0], dict):
        stacked = {k: stack_conds([x[k] for x in tensors]) for k in tensors[0]}
        stacked = DictWithShape(stacked, stacked["crossattn"].shape)
    else:
        stacked = stack_conds(tensors)
    return conds_list, stacked
