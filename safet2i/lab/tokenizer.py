"""The real CLIP BPE tokenizer for the lab's model, built offline.

The lab's text encoder is trained from scratch, but it reads prompts through the very
tokenizer Stable Diffusion 1.x uses (49,408 tokens: 256 byte symbols, their ``</w>`` forms,
48,894 merges, ``<|startoftext|>`` and ``<|endoftext|>``). That keeps every SafeT2I path
that looks at tokens (prompt steering's trigger tokens, attention-based guidance's concept
positions, ``"nudity"`` splitting into ``nu`` + ``dity</w>``) exactly as it is on a real
checkpoint.

No download: the merges come from ``bpe_simple_vocab_16e6.txt.gz``, which the pip package
``open-clip-torch`` ships. The file is located with :func:`importlib.util.find_spec` and never
by importing ``open_clip`` (its import needs torchvision, which SafeT2I does not require).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import tempfile
from pathlib import Path
from typing import Any

from ..errors import SafeT2IError

#: Tokens of the CLIP BPE vocabulary (byte symbols, their end-of-word forms, merges, specials).
VOCAB_SIZE = 49408
#: Prompt length of every Stable Diffusion 1.x text encoder (start token + 75 + end token).
MODEL_MAX_LENGTH = 77
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_N_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48,894


def bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins of the byte values, in CLIP's (GPT-2's) order: printable
    Latin-1 bytes stand for themselves, the others map to code points from 256 upwards."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def bpe_file() -> Path:
    """Path of open-clip-torch's shipped BPE merges file; :class:`SafeT2IError` naming the
    install command when the package (or the file) is absent."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        spec = None
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        path = Path(root) / BPE_FILE
        if path.is_file():
            return path
    where = f" (open_clip found at {', '.join(roots)}, but without {BPE_FILE})" if roots else ""
    raise SafeT2IError(
        f"The lab's CLIP tokenizer needs the BPE vocabulary file {BPE_FILE} that the Python package "
        f"open-clip-torch ships{where}. Install it without its dependencies (no torchvision needed, "
        "nothing else is downloaded at run time): python -m pip install open-clip-torch --no-deps")


def write_vocabulary(folder: str | Path) -> tuple[Path, Path]:
    """Write CLIP's ``vocab.json`` and ``merges.txt`` (the files ``CLIPTokenizer`` reads) into
    ``folder``; returns their paths. Token ids follow open_clip's order, so id 49406 is
    ``<|startoftext|>`` and 49407 ``<|endoftext|>`` as in every SD 1.x checkpoint."""
    path = bpe_file()
    try:
        lines = gzip.open(path).read().decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise SafeT2IError(f"Cannot read the CLIP BPE file {path}: {exc}. Reinstall it with: "
                           "python -m pip install --force-reinstall open-clip-torch --no-deps") from exc
    merges = lines[1:_N_MERGES + 1]
    if len(merges) != _N_MERGES or any(len(m.split()) != 2 for m in merges):
        raise SafeT2IError(f"The CLIP BPE file {path} does not hold {_N_MERGES} merges; reinstall it with: "
                           "python -m pip install --force-reinstall open-clip-torch --no-deps")
    chars = bytes_to_unicode()
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_path, merges_path


def clip_tokenizer(folder: str | Path | None = None) -> Any:
    """A ``transformers.CLIPTokenizer`` with the real CLIP BPE vocabulary (49,408 tokens,
    ``model_max_length`` 77), built from open-clip-torch's shipped merges file.

    ``folder``: where to write ``vocab.json`` and ``merges.txt`` (kept); by default a temporary
    folder that is removed once the tokenizer has read them. Raises :class:`SafeT2IError`
    naming ``pip install open-clip-torch --no-deps`` when the BPE file is absent.
    """
    try:
        from transformers import CLIPTokenizer  # noqa: PLC0415  (optional dependency)
    except ImportError as exc:
        raise SafeT2IError("The lab's CLIP tokenizer needs the Python package 'transformers': "
                           "python -m pip install transformers") from exc

    def build(where: Path) -> Any:
        vocab_path, merges_path = write_vocabulary(where)
        tok = CLIPTokenizer(str(vocab_path), str(merges_path), model_max_length=MODEL_MAX_LENGTH)
        if len(tok) != VOCAB_SIZE:
            raise SafeT2IError(f"The CLIP tokenizer built from {bpe_file()} has {len(tok)} tokens, "
                               f"not {VOCAB_SIZE}")
        return tok

    if folder is not None:
        return build(Path(folder))
    with tempfile.TemporaryDirectory(prefix="safet2i-clip-bpe-") as tmp:
        return build(Path(tmp))
