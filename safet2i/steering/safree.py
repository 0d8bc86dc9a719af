"""SAFREE-style prompt-embedding steering: Yoon, Yu, Patil, Yao, Bansal, "SAFREE:
Training-Free and Adaptive Guard for Safe Text-to-Image and Video Generation", ICLR 2025
(arXiv 2410.12761). Implemented from the equations (``docs/steering.md``); the official
code has no licence and is not used. How a prompt is planned over a host's text encoders:
:mod:`safet2i.steering.plan`.

Notation: rows h_j ∈ R^d of the prompt's conditioning H (one 77-token chunk), pooled
vectors p = H[eos] taken from the *same* encoder and layer (identical to CLIP's pooler output
for SD1.x; consistent for SD2.x's penultimate layer and each SDXL encoder)::

    C    = [pool(k_1) … pool(k_K)]             concept subspace,  P_C = C (CᵀC)⁺ Cᵀ
    M    = [pool(T with token i := id 0) …]    leave-one-token-out, P_M = M (MᵀM)⁺ Mᵀ
    d_i  = ‖(I − P_C) p_\\i‖                    trigger iff d_i ≥ (1 + α) · mean_{j≠i} d_j
                                               (one token: d_1 ≥ (1 + α) · ‖(I − P_C) p‖)
    h'_j = (I − P_C) P_M h_j                   (official code's order; the paper prints P_M (I − P_C))
    β    = 1 − mean_j cos(h_j, h'_j)           over BOS, prompt tokens and the first EOS
    t'   = round(up_t · sigmoid(2k · (10β − t0)))     steered rows for steps i ≤ t' of 50

Only trigger rows are replaced; BOS, other tokens, EOS and padding rows are left as they are.
A prompt with no trigger token is returned unchanged (the very same tensor).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import torch

ORDERS = ("code", "paper")
#: SVF constants of the official code (nudity: k = 2.5, t0 = 5.333; artists: 3.5, 5.5).
SVF_PRESETS = {"nudity": (2.5, 5.333), "artist": (3.5, 5.5)}
REFERENCE_STEPS = 50


def projector(vectors: torch.Tensor) -> torch.Tensor:
    """Orthogonal projector onto the span of the rows of ``vectors`` [k, d]: A (AᵀA)⁺ Aᵀ
    with A = vectorsᵀ, computed in float64."""
    a = vectors.to(torch.float64).T  # [d, k]
    return a @ torch.linalg.pinv(a.T @ a) @ a.T


def trigger_tokens(loo_pooled: torch.Tensor, p_concept: torch.Tensor, alpha: float = 0.01,
                   pooled: torch.Tensor | None = None) -> list[int]:
    """Indices i (0-based among the prompt's n tokens) whose removal pushes the prompt
    notably farther from the concept subspace. ``loo_pooled`` [n, d].

    One token (n = 1) has no other token to compare with; it is compared with the prompt
    itself, ``pooled`` [d] (its own pooled vector): a trigger iff ‖(I − P_C) p_\\1‖ ≥ (1 + α) ·
    ‖(I − P_C) p‖. A lone concept word lies in the subspace (distance 0) and always triggers;
    without ``pooled`` a lone token is never a trigger. (The released code's mean over no other
    token is NaN, which it counts as a trigger: every lone token, ``cat`` too, is steered.)"""
    n = loo_pooled.shape[0]
    if n < 1 or (n == 1 and pooled is None):
        return []
    eye = torch.eye(p_concept.shape[0], dtype=torch.float64, device=p_concept.device)
    vectors = loo_pooled if n > 1 else torch.cat([loo_pooled, pooled.reshape(1, -1).to(loo_pooled)])
    dist = ((eye - p_concept) @ vectors.to(device=p_concept.device, dtype=torch.float64).T).norm(dim=0)
    if n == 1:
        return [0] if dist[0] >= (1.0 + alpha) * dist[1] else []
    others = (dist.sum() - dist) / (n - 1)
    return [i for i in range(n) if dist[i] >= (1.0 + alpha) * others[i]]


def project_rows(rows: torch.Tensor, p_concept: torch.Tensor, p_input: torch.Tensor, order: str = "code") -> torch.Tensor:
    """h' for every row of ``rows`` [L, d] (float64 result)."""
    eye = torch.eye(p_concept.shape[0], dtype=torch.float64, device=p_concept.device)
    h = rows.to(device=p_concept.device, dtype=torch.float64).T
    if order == "code":
        p_input = p_input.to(p_concept.device)
        out = (eye - p_concept) @ (p_input @ h)
    elif order == "paper":
        out = p_input.to(p_concept.device) @ ((eye - p_concept) @ h)
    else:
        raise ValueError(f"order must be one of {ORDERS}")
    return out.T


def svf_steps(beta: float, up_t: float = 10.0, k: float = 2.5, t0: float = 5.333) -> int:
    """t' = round(up_t · sigmoid(2k · (10β − t0)))."""
    return int(round(up_t / (1.0 + math.exp(-2.0 * k * (10.0 * beta - t0)))))


@dataclass
class SteerResult:
    rows: torch.Tensor                 # the chunk's conditioning rows, steered (or the input itself)
    triggers: list[int] = field(default_factory=list)   # row positions replaced (CLIP: 1..n)
    beta: float = 0.0
    t_prime: int = -1                  # last steered step of 50; -1 = never steered
    changed: bool = False

    @property
    def fraction(self) -> float:
        """Share of the sampling schedule that uses the steered rows ((t'+1)/50)."""
        return 0.0 if not self.changed else min(1.0, (self.t_prime + 1) / REFERENCE_STEPS)


def steer_chunk(
    rows: torch.Tensor,
    loo_pooled: torch.Tensor,
    p_concept: torch.Tensor,
    n_tokens: int,
    *,
    alpha: float = 0.01,
    order: str = "code",
    svf: tuple[float, float] | None = SVF_PRESETS["nudity"],
    up_t: float = 10.0,
    pooled: torch.Tensor | None = None,
    first: int = 1,
    real: int | None = None,
) -> SteerResult:
    """Steer one chunk whose prompt tokens occupy rows first..first+n_tokens−1 (CLIP: BOS at 0,
    tokens from 1, EOS at n_tokens + 1). ``loo_pooled`` [n, d]: pooled vectors with each token
    replaced in turn; ``pooled`` [d]: the chunk's own pooled vector (the one-token trigger test
    needs it). β is taken over the chunk's first ``real`` rows (default first + n_tokens + 1:
    CLIP's BOS, tokens and first EOS; T5's tokens and end token; a chat template's prompt and
    closing rows). ``svf=None`` steers every step (t' = 50)."""
    if n_tokens < 1 or loo_pooled.shape[0] != n_tokens:
        return SteerResult(rows)
    if first < 0 or first + n_tokens > rows.shape[0]:
        raise ValueError(f"prompt rows {first}..{first + n_tokens - 1} outside a chunk of {rows.shape[0]} rows")
    p_concept = p_concept.to(rows.device)  # all float64 work on the rows' device
    loo_pooled = loo_pooled.to(rows.device)
    trig = trigger_tokens(loo_pooled, p_concept, alpha, pooled)
    if not trig:
        return SteerResult(rows)
    p_input = projector(loo_pooled)
    span = min(rows.shape[0], first + n_tokens + 1 if real is None else max(real, first + n_tokens))
    projected = project_rows(rows[:span], p_concept, p_input, order)
    orig = rows[:span].to(torch.float64)
    cos = torch.nn.functional.cosine_similarity(orig, projected, dim=1, eps=1e-12)
    beta = float(1.0 - cos.mean())
    t_prime = svf_steps(beta, up_t, *svf) if svf is not None else REFERENCE_STEPS - 1
    out = rows.clone()
    positions = [i + first for i in trig]
    out[positions] = projected[positions].to(rows.dtype)
    return SteerResult(out, positions, beta, t_prime, True)


# --------------------------------------------------------------------------- orchestration

#: Token id that replaces a prompt token in the leave-one-out encodings ("!" in CLIP's BPE;
#: the official code uses id 0, not the padding or end token).
MASK_TOKEN = 0

_SUBSPACES: dict[tuple, tuple] = {}


def first_index(ids: list[int], value: int) -> int:
    try:
        return ids.index(value)
    except ValueError:
        return len(ids)


def concept_projector(key, concepts: list[str], encode_pooled, owner=None) -> torch.Tensor:
    """P_C for ``concepts``, cached per (encoder ``key``, concept list): a second prompt
    with the same encoder and concepts pays nothing for it. ``encode_pooled(concepts)`` ->
    [K, d] pooled vectors.

    ``owner``: the object the key describes (e.g. the text encoder module). The entry holds
    only a weak reference to it; an entry whose owner has died or is a different object
    (``id()`` values are reused after garbage collection) is a miss. The key must also
    change whenever the owner's weights change (hosts add a patch id or a weights
    fingerprint): the cache cannot see in-place edits.
    """
    cache_key = (key, tuple(concepts))
    hit = _SUBSPACES.get(cache_key)
    if hit is not None:
        ref, p_c = hit
        same_owner = ref is None if owner is None else (ref is not None and ref() is owner)
        if same_owner:
            return p_c
        del _SUBSPACES[cache_key]
    p_c = projector(encode_pooled(list(concepts)))
    if len(_SUBSPACES) > 32:
        _SUBSPACES.pop(next(iter(_SUBSPACES)))
    _SUBSPACES[cache_key] = (weakref.ref(owner) if owner is not None else None, p_c)
    return p_c


def packed_layout(original: list[int], variants: list[list[int]]):
    """One packed sequence for a prompt and its same-length variants (CLIP is causal).

    Variant v shares the hidden states of the prompt before its first changed token k_v, so
    only its suffix v[k_v:] is computed: the packed sequence is the prompt followed by every
    suffix. Returns (ids, positions, allowed [T, T] bool, index of each variant's last row):
    a prompt row attends to prompt rows at or before its position; a suffix row to prompt
    rows before k_v and to its own suffix rows at or before its position.
    """
    length = len(original)
    ids, pos, seq, first = list(original), list(range(length)), [-1] * length, []
    for j, v in enumerate(variants):
        if len(v) != length:
            raise ValueError("variants must have the prompt's length")
        k = next((i for i in range(length) if v[i] != original[i]), length - 1)
        first.append(k)
        ids += v[k:]
        pos += list(range(k, length))
        seq += [j] * (length - k)
    pos_t, seq_t = torch.tensor(pos), torch.tensor(seq)
    k_of = torch.tensor([0] + first)[seq_t + 1]  # k_v of each query row's sequence (0 for the prompt)
    own = (seq_t[:, None] == seq_t[None, :]) & (pos_t[None, :] <= pos_t[:, None])
    shared = (seq_t[None, :] == -1) & (pos_t[None, :] < k_of[:, None])
    last = torch.cumsum(torch.tensor([length] + [length - k for k in first]), 0)[1:] - 1
    return ids, pos, own | shared, last
