"""What every trainer of :mod:`safet2i.train` shares: the base model, devices and precision,
seeds, resumable checkpoints, the JSON loss log and the progress bar.

* :func:`load_base` opens the user's local model (a diffusers pipeline folder, the lab's
  model, or a single-file SD1.x/SDXL ``.safetensors`` checkpoint; never downloads) through the
  same loader as ``safet2i bench``; :func:`base_sha256` names it in the trained file's metadata.
* :func:`resolve_device` / :func:`autocast` / :func:`gradient_checkpointing`: CPU or CUDA,
  mixed precision (``bf16`` on CPU or CUDA, ``fp16`` on CUDA only) and activation
  checkpointing where the model supports it.
* :func:`step_generator`: every random draw of a step comes from a generator that is a pure
  function of (seed, what, step), so a resumed run draws exactly what an uninterrupted one does.
* :class:`Checkpoint`: ``checkpoint.safetensors`` + ``checkpoint.json`` (never pickle), written
  atomically, refused when it belongs to another run (config hash) or its tensors changed.
* :class:`LossLog`: one record per step (loss, its terms, seconds), written as JSON.
* :func:`run_steps`: the loop (progress bar with loss and ETA, checkpoints every N steps or
  seconds, non-finite loss → a clear error naming the step) that the trainers call.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import SafeT2IError

CHECKPOINT_TENSORS = "checkpoint.safetensors"
CHECKPOINT_STATE = "checkpoint.json"
PRECISIONS = ("no", "bf16", "fp16")


class TrainError(SafeT2IError):
    """A trainer cannot run as asked (bad input, a diverged loss, a checkpoint of another run)."""


def config_hash(config: dict) -> str:
    """16 hex digits of the sha256 of ``config`` as sorted JSON (what a checkpoint belongs to)."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def sha256_file(path: str | os.PathLike) -> str:
    from ..runtime import file_sha256  # noqa: PLC0415

    return file_sha256(path)


def output_paths(out: str | os.PathLike, formats: Sequence[str], overwrite: bool,
                 log_path: str | os.PathLike | None = None) -> dict[str, Path]:
    """Where a LoRA trainer writes each format: the first to ``out`` (``.safetensors``), the
    others to ``OUT.<format>.safetensors``; existing files refused unless ``overwrite``, the
    run's loss log too (``log_path``, default ``OUT`` with suffix ``.log.json``) unless it is
    the log of an unfinished run (``"finished": false``), which a resumed run continues."""
    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        raise TrainError(f"the output must be a .safetensors file, not {out}")
    if not formats:
        raise TrainError("give at least one LoRA format (kohya, peft)")
    paths: dict[str, Path] = {}
    for fmt in formats:
        if fmt not in ("kohya", "peft"):
            raise TrainError(f"unknown LoRA format {fmt!r}: use kohya or peft")
        paths[fmt] = out if fmt == formats[0] else out.with_name(out.stem + f".{fmt}.safetensors")
    log = Path(log_path) if log_path is not None else out.with_suffix(".log.json")
    for p in paths.values():
        if p.exists() and not overwrite:
            raise TrainError(f"{p} exists; pass overwrite=True (--overwrite) to replace it")
    if log.exists() and not overwrite and not _unfinished_log(log):
        raise TrainError(f"{log} (the loss log of an earlier run) exists; pass overwrite=True (--overwrite) to "
                         "replace it, or choose another output name")
    return paths


def _unfinished_log(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("finished") is False


def base_sha256(model: str | os.PathLike) -> str:
    """The sha256 that names a base model in a trained file's metadata: of the file for a
    single-file checkpoint; for a diffusers folder, of the sorted (relative path, file sha256)
    list of its ``unet/`` and ``text_encoder*/`` safetensors files (the weights a LoRA patches)."""
    p = Path(model)
    if p.is_file():
        return sha256_file(p)
    if not p.is_dir():
        raise TrainError(f"base model {p}: no such file or folder")
    files = sorted(f for sub in ("unet", "text_encoder", "text_encoder_2") for f in (p / sub).glob("*.safetensors"))
    if not files:
        raise TrainError(f"base model {p}: no unet/ or text_encoder/ safetensors files to hash")
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(p).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def resolve_device(device: str = "auto") -> str:
    """``auto`` → ``cuda`` when available, else ``cpu``; an explicit CUDA device must exist."""
    import torch  # noqa: PLC0415

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(f"device {device}: CUDA is not available here (use cpu or auto)")
    if device != "cpu" and not device.startswith("cuda"):
        raise TrainError(f"device {device!r}: use auto, cpu, cuda or cuda:N")
    return device


def autocast(device: str, precision: str = "no"):
    """The autocast context of ``precision``: ``no`` (float32), ``bf16`` (CPU or CUDA), ``fp16``
    (CUDA only: CPU float16 matmuls are slow and inexact)."""
    import torch  # noqa: PLC0415

    if precision not in PRECISIONS:
        raise TrainError(f"mixed precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "no":
        return contextlib.nullcontext()
    kind = "cuda" if device.startswith("cuda") else "cpu"
    if precision == "fp16" and kind == "cpu":
        raise TrainError("mixed precision fp16 needs CUDA; on CPU use bf16 or no")
    return torch.autocast(kind, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


def gradient_checkpointing(module: Any, enabled: bool) -> bool:
    """Turn activation checkpointing on where the module supports it (diffusers models do);
    returns whether it is on."""
    if not enabled:
        return False
    if not getattr(module, "_supports_gradient_checkpointing", False):
        return False
    module.enable_gradient_checkpointing()
    return True


def step_generator(seed: int, what: str, step: int, device: str = "cpu") -> Any:
    """A torch Generator that is a pure function of (seed, what, step)."""
    import torch  # noqa: PLC0415

    digest = hashlib.sha256(f"safet2i.train|{seed}|{what}|{step}".encode()).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(digest[:8], "big") & ((1 << 63) - 1))
    return g


def load_base(model: str | os.PathLike, *, config: str | None = None, device: str = "cpu",
              dtype: Any = None) -> Any:
    """The user's local SD1.x/SD2.x/SDXL pipeline (diffusers folder, the lab's model, or a
    single-file ``.safetensors`` checkpoint with ``config`` a local diffusers folder of the same
    architecture when diffusers cannot find its configs offline). Nothing is downloaded."""
    import torch  # noqa: PLC0415

    from ..bench.cli import load_pipeline  # noqa: PLC0415

    return load_pipeline(str(model), config, device, dtype or torch.float32)


# ---------------------------------------------------------------------------------- checkpoints

def optimizer_tensors(opt: Any, prefix: str = "opt.") -> dict[str, Any]:
    """The optimiser's per-parameter state as named tensors (numbers become 0-d tensors)."""
    import torch  # noqa: PLC0415

    out = {}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"{prefix}{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def load_optimizer(opt: Any, tensors: dict[str, Any], prefix: str = "opt.") -> None:
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith(prefix):
            i, name = k[len(prefix):].split(".", 1)
            state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


class Checkpoint:
    """A resumable run's state in ``folder``: tensors (safetensors) and JSON. Each save writes a
    new tensors file, then the JSON that names it (both atomically), then removes the older
    tensors file: an interruption at any point leaves a complete checkpoint. :meth:`load`
    returns None for a missing checkpoint and refuses one of another run (``run_hash``) or whose
    tensors do not match the JSON's sha256."""

    def __init__(self, folder: str | os.PathLike, run_hash: str):
        self.folder, self.run_hash = Path(folder), run_hash

    def _state(self) -> dict[str, Any] | None:
        sp = self.folder / CHECKPOINT_STATE
        if not sp.is_file():
            return None
        try:
            return json.loads(sp.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise TrainError(f"{sp}: unreadable checkpoint ({exc}); delete the folder to start over") from exc

    def save(self, tensors: dict[str, Any], state: dict[str, Any]) -> None:
        from ..fileio import atomic_write, save_safetensors  # noqa: PLC0415

        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            old = self._state()
        except TrainError:
            old = None
        index = int((old or {}).get("save_index", 0)) + 1
        name = f"checkpoint-{index:06d}.safetensors"
        t = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        save_safetensors(self.folder / name, t)
        record = dict(state, run_hash=self.run_hash, save_index=index, tensors_file=name,
                      tensors_sha256=sha256_file(self.folder / name))
        data = json.dumps(record).encode()
        atomic_write(self.folder / CHECKPOINT_STATE, lambda fh: fh.write(data))
        for f in self.folder.glob("checkpoint-*.safetensors"):
            if f.name != name:
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()

    def load(self, device: str = "cpu") -> tuple[dict[str, Any], dict[str, Any]] | None:
        from safetensors.torch import load_file  # noqa: PLC0415

        state = self._state()
        if state is None:
            return None
        sp = self.folder / CHECKPOINT_STATE
        if state.get("run_hash") != self.run_hash:
            raise TrainError(f"{self.folder} holds a checkpoint of another run (settings {state.get('run_hash')}, "
                             f"these are {self.run_hash}); use another output or delete it to start over")
        tp = self.folder / str(state.get("tensors_file", CHECKPOINT_TENSORS))
        if tp.parent != self.folder or not tp.is_file() or state.get("tensors_sha256") != sha256_file(tp):
            raise TrainError(f"{tp} does not match {sp} (changed by hand?); delete the folder to start over")
        return load_file(str(tp), device=device), state

    def remove(self) -> None:
        for f in [*self.folder.glob("checkpoint-*.safetensors"), self.folder / CHECKPOINT_TENSORS,
                  self.folder / CHECKPOINT_STATE]:
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
        with contextlib.suppress(OSError):
            self.folder.rmdir()


class LossLog:
    """Per-step records ``{"step", "loss", <terms>, "seconds"}``; :meth:`write` saves them as JSON
    together with the run's description."""

    def __init__(self, records: list[dict] | None = None):
        self.records: list[dict] = list(records or [])

    def add(self, step: int, terms: dict[str, float], seconds: float) -> None:
        self.records.append({"step": step, **{k: float(v) for k, v in terms.items()}, "seconds": round(seconds, 4)})

    def series(self, key: str = "loss") -> list[float]:
        return [r[key] for r in self.records if key in r]

    def write(self, path: str | os.PathLike, about: dict[str, Any]) -> Path:
        from ..fileio import atomic_write  # noqa: PLC0415

        data = json.dumps({**about, "steps": self.records}, indent=1, default=str).encode()
        atomic_write(path, lambda fh: fh.write(data))
        return Path(path)


StepFn = Callable[[int], dict[str, float]]


def run_steps(total: int, step_fn: StepFn, *, start: int = 0, log: LossLog, save: Callable[[int], None] | None,
              desc: str, progress: bool = True, checkpoint_every: int = 50, checkpoint_seconds: float = 120.0,
              callback: Callable[[int, dict[str, float]], None] | None = None) -> None:
    """Call ``step_fn(step)`` for ``step`` in ``[start, total)``; it returns the step's terms with
    ``"loss"`` among them. Logs each step, shows a bar (loss, ETA), calls ``save(step + 1)``
    every ``checkpoint_every`` steps or ``checkpoint_seconds`` seconds and at the end, and stops
    with :class:`TrainError` when the loss is not finite (after no save, so the last good
    checkpoint stays). ``callback(step + 1, terms)`` runs after each step and its checkpoint; an
    exception from it stops the run there (resumable)."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    bar = tqdm(total=total, initial=start, disable=not progress, desc=desc, unit="step", dynamic_ncols=True)
    last = time.monotonic()
    try:
        for step in range(start, total):
            t0 = time.perf_counter()
            terms = step_fn(step)
            loss = float(terms["loss"])
            if not math.isfinite(loss):
                raise TrainError(f"{desc}: the loss became {loss} at step {step}; lower the learning rate "
                                 "(the last checkpoint is kept)")
            log.add(step, terms, time.perf_counter() - t0)
            bar.set_postfix_str(f"loss {loss:.4g}", refresh=False)
            bar.update(1)
            if save is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == total
                                     or time.monotonic() - last > checkpoint_seconds):
                save(step + 1)
                last = time.monotonic()
            if callback is not None:
                callback(step + 1, terms)
    finally:
        bar.close()


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` inside (unchanged for None)."""
    import torch  # noqa: PLC0415

    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)
