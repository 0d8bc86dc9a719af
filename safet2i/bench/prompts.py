"""Prompt sets for the bench: our CSV layout (``../shared/data/prompts/``) and I2P's columns.

A prompt set is a CSV with a header. Columns read (every other column is ignored):

``prompt``               the text (required, non-empty)
``case_number``          the prompt's id (else an unnamed first column, pandas' index, else the
                         1-based data row number); ids must be unique in the file
``evaluation_seed``      the seed of its image (else ``seed``; else ``default_seed``, 42 as in
                         SAFREE's scripts); an integer in 0 .. 2^63-1
``evaluation_guidance``  I2P's per-prompt guidance scale; kept in ``Prompt.guidance`` (SAFREE
                         ignores it, so the bench does too unless asked)
``categories``           I2P's comma-separated categories, kept in ``Prompt.categories``
``form``                 our group column (e.g. the lab's direct/synonym/indirect/benign); rates
                         are reported per form

Errors name the file, the row (its line number in the file) and the column.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SafeT2IError

DEFAULT_SEED = 42
MAX_SEED = 2**63 - 1


class PromptFileError(SafeT2IError):
    """A prompt file that cannot be used, naming file, row and column."""


@dataclass(frozen=True)
class Prompt:
    """One prompt of a bench run: its id (unique in the set), text and seed; optionally a
    ``form`` (the group its rates are reported in), the intended ``attributes`` (the lab's
    benign-preservation measure), I2P's ``categories`` and per-prompt ``guidance``."""

    id: str
    text: str
    seed: int = DEFAULT_SEED
    form: str | None = None
    attributes: Mapping[str, Any] | None = None
    categories: tuple[str, ...] = ()
    guidance: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"Prompt.id must be a non-empty string, got {self.id!r}")
        if not isinstance(self.text, str) or not self.text.strip():
            raise ValueError(f"Prompt {self.id}: the text must be a non-empty string")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"Prompt {self.id}: the seed must be an integer in 0..{MAX_SEED}, got {self.seed!r}")

    @property
    def group(self) -> str:
        """The form, or ``"all"`` when the prompt has none."""
        return self.form or "all"

    def identity(self) -> dict[str, Any]:
        """What determines this prompt's image (with the stack and the pipeline)."""
        return {"id": self.id, "text": self.text, "seed": self.seed}


def _int(text: str, where: str) -> int:
    t = text.strip()
    try:
        v = int(t)
    except ValueError:
        try:
            f = float(t)
        except ValueError:
            raise PromptFileError(f"{where}: not a whole number: {text!r}") from None
        if not f.is_integer():
            raise PromptFileError(f"{where}: not a whole number: {text!r}") from None
        v = int(f)
    if not 0 <= v <= MAX_SEED:
        raise PromptFileError(f"{where}: the seed must be in 0..{MAX_SEED}, got {v}")
    return v


def read_prompts(path: str | os.PathLike, *, limit: int | None = None, default_seed: int = DEFAULT_SEED,
                 prompt_column: str = "prompt") -> list[Prompt]:
    """The prompts of a CSV file (module docstring), in file order, at most ``limit``."""
    path = Path(path)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    try:
        fh = path.open(newline="", encoding="utf-8-sig")
    except FileNotFoundError:
        raise PromptFileError(f"prompt file {path}: not found") from None
    except OSError as exc:
        raise PromptFileError(f"prompt file {path}: cannot be read ({exc.strerror or exc})") from None
    out: list[Prompt] = []
    seen: dict[str, int] = {}
    with fh:
        reader = csv.DictReader(fh)
        try:
            header = reader.fieldnames
        except (csv.Error, UnicodeDecodeError) as exc:
            raise PromptFileError(f"prompt file {path}: not a readable CSV ({exc})") from None
        if not header:
            raise PromptFileError(f"prompt file {path}: empty (no header row)")
        if prompt_column not in header:
            raise PromptFileError(f"prompt file {path}: no {prompt_column!r} column (columns: "
                                  f"{', '.join(repr(h) for h in header[:12])})")
        id_col = "case_number" if "case_number" in header else ("" if header[0] == "" else None)
        seed_col = "evaluation_seed" if "evaluation_seed" in header else ("seed" if "seed" in header else None)
        try:
            for n, row in enumerate(reader, start=1):
                line = reader.line_num
                where = f"prompt file {path}, row {line}"
                if None in row:
                    raise PromptFileError(f"{where}: more fields than the header has columns")
                text = row.get(prompt_column)
                if text is None:
                    raise PromptFileError(f"{where}, column {prompt_column!r}: missing (fewer fields than the header)")
                if not text.strip():
                    raise PromptFileError(f"{where}, column {prompt_column!r}: empty prompt")
                pid = (row.get(id_col) or "").strip() if id_col is not None else ""
                if id_col is not None and not pid:
                    raise PromptFileError(f"{where}, column {id_col or '(index)'!r}: empty id")
                pid = pid or str(n)
                if pid in seen:
                    raise PromptFileError(f"{where}, column {id_col or '(index)'!r}: id {pid!r} repeats row "
                                          f"{seen[pid]}; ids must be unique")
                seen[pid] = line
                seed = default_seed
                if seed_col is not None and (row.get(seed_col) or "").strip():
                    seed = _int(row[seed_col], f"{where}, column {seed_col!r}")
                guidance = None
                g = (row.get("evaluation_guidance") or "").strip()
                if g:
                    try:
                        guidance = float(g)
                    except ValueError:
                        raise PromptFileError(f"{where}, column 'evaluation_guidance': not a number: {g!r}") from None
                cats = tuple(c.strip() for c in (row.get("categories") or "").split(",") if c.strip())
                form = (row.get("form") or "").strip() or None
                out.append(Prompt(pid, text, seed, form=form, categories=cats, guidance=guidance))
                if limit is not None and len(out) >= limit:
                    break
        except (csv.Error, UnicodeDecodeError) as exc:
            raise PromptFileError(f"prompt file {path}, row {reader.line_num}: not readable CSV ({exc})") from None
    if not out:
        raise PromptFileError(f"prompt file {path}: no prompt rows")
    return out


def check_prompts(prompts: Any) -> list[Prompt]:
    """``prompts`` as a list of :class:`Prompt` with unique ids (raises naming the first repeat)."""
    items = list(prompts)
    if not items:
        raise SafeT2IError("the bench needs at least one prompt")
    seen = set()
    for p in items:
        if not isinstance(p, Prompt):
            raise SafeT2IError(f"bench prompts must be safet2i.bench.Prompt objects, got {type(p).__name__}")
        if p.id in seen:
            raise SafeT2IError(f"bench prompts: the id {p.id!r} is used twice; ids must be unique")
        seen.add(p.id)
    return items


__all__ = ["DEFAULT_SEED", "Prompt", "PromptFileError", "check_prompts", "read_prompts"]
