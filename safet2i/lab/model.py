"""The lab's tiny text-to-image model: Stable Diffusion's structure, trained here from scratch.

Every diffusers path of SafeT2I (prompt steering, safety guidance, safety LoRAs) must run on
the lab's model unchanged, so the model *is* a ``StableDiffusionPipeline``, only small:

* ``AutoencoderKL`` (``vae``): a tiny KL autoencoder trained first on the world's images. With
  the default two levels the latent is 4 channels at half the image side (16 x 16 for 32 px);
  one level (``vae_channels=(64,)``) is the documented pixel-space alternative (latent at
  full resolution, still a diffusers ``AutoencoderKL`` the pipeline decodes through). After
  training, the latent is standardised per channel by folding mean and standard deviation
  into ``quant_conv`` and ``post_quant_conv`` (exact; decoding is unchanged), so
  ``scaling_factor`` is 1.
* ``UNet2DConditionModel`` with cross-attention on the text encoder's hidden states, trained
  jointly with
* ``CLIPTextModel`` (small width and depth, trained from scratch) reading prompts through
* the real CLIP BPE tokenizer (:mod:`safet2i.lab.tokenizer`, 49,408 tokens, 77 positions),
* ``DDIMScheduler`` for sampling; training uses the DDPM forward process of the same betas.

:func:`train` runs the recipe (:class:`LabModelConfig` says what) and saves the pipeline with
``save_pretrained(safe_serialization=True)`` into ``<lab cache>/<config hash>/``; it
checkpoints as it goes (safetensors and JSON only, never pickle), resumes an interrupted
run bit for bit on CPU, and returns a finished folder at once. See docs/lab.md, "The model".
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SafeT2IError
from .world import ATTRIBUTES, FORMS, World, WorldConfig

#: Files of an unfinished run inside ``<hash>.partial/`` and the marker of a finished model.
CHECKPOINT_TENSORS = "checkpoint.safetensors"
CHECKPOINT_STATE = "checkpoint.json"
FINISHED_MARKER = "safet2i_lab.json"
#: Bumped whenever the recipe's code changes what a config trains (it is part of the hash).
RECIPE = 1

Callback = Callable[[str, int, float], None]


@dataclass(frozen=True)
class LabModelConfig:
    """What to build and how to train it. Every field is part of the cache key
    (:meth:`config_hash`); the defaults are the lab's model (about 30 minutes on 2 CPU cores).

    Architecture: ``size`` is the image side (and ``world.size``); ``vae_channels`` one width
    per autoencoder level (the latent side is ``size / 2**(len - 1)``); ``unet_channels`` and
    ``unet_cross_attention`` one entry per UNet level (cross-attention on or off there; the
    mid block always has it); ``unet_heads`` attention heads (diffusers'
    ``attention_head_dim``, which counts heads); ``unet_pooled_text`` adds an attention-pooled
    summary of the text encoder's hidden states to the timestep embedding (diffusers'
    ``addition_embed_type="text"``, as SDXL and Imagen add pooled text), which conditions every
    resnet block and makes the text binding learnable in a CPU budget; ``text_width``, ``text_layers``,
    ``text_heads`` the CLIP text encoder (its width is the UNet's cross-attention width).

    Recipe: ``vae_steps`` x ``vae_batch_size`` autoencoder steps (L1 + L2 reconstruction, object
    pixels weighted ``1 + vae_object_weight`` x coverage, + ``vae_gradient_weight`` x the L1 of
    the image-gradient error (edges), + ``vae_kl_weight`` x KL per latent
    element; ``vae_lr`` with warm-up and cosine decay to a tenth); then ``steps`` x
    ``batch_size`` diffusion steps
    (ε-prediction, Min-SNR-``min_snr_gamma`` weights, latent pixels under objects weighted
    ``1 + object_weight`` x coverage (0, off, by default: 4 measured worse on the quality gate,
    docs/lab.md); UNet and text encoder jointly; AdamW at
    ``lr`` with ``warmup_steps`` linear warm-up and cosine decay to ``lr * lr_final``;
    gradient norm clipped to 1; ``cfg_dropout`` of the captions replaced by "" so that
    classifier-free guidance works; with ``ema_decay`` > 0 an EMA of the weights, decay
    ``min(ema_decay, (1 + n) / (10 + n))``, is what gets saved; by default (0) the final weights
    are, which measured better on the quality gate, docs/lab.md). ``text_probe_weight`` weighs an auxiliary loss
    that stands in for CLIP's pre-training: a linear probe on the text encoder's pooled output
    (the end token) predicts the six attributes of the caption's image (cross-entropy; a
    synonym, indirect or misspelled caption's colour is the concept), so captions that mean the
    same get similar embeddings from the first steps on. The probe is not part of the pipeline.
    ``form_mix`` weights the caption forms of the
    training stream (train split only). ``seed`` seeds the initial weights and every random
    draw of training.
    """

    size: int = 32
    world: WorldConfig | None = None
    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (32, 64)
    vae_steps: int = 2400
    vae_batch_size: int = 16
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    vae_object_weight: float = 20.0
    vae_gradient_weight: float = 1.0
    unet_channels: tuple[int, ...] = (64, 128, 192)
    unet_cross_attention: tuple[bool, ...] = (False, True, True)
    layers_per_block: int = 1
    unet_heads: int = 4
    unet_pooled_text: bool = True
    norm_groups: int = 32
    text_width: int = 128
    text_layers: int = 4
    text_heads: int = 4
    steps: int = 900
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    lr_final: float = 0.1
    weight_decay: float = 0.01
    ema_decay: float = 0.0
    cfg_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    object_weight: float = 0.0
    text_probe_weight: float = 1.0
    form_mix: tuple[tuple[str, int], ...] = (("benign", 15), ("direct", 2), ("synonym", 1),
                                             ("indirect", 1), ("misspelled", 1))
    seed: int = 0
    recipe: int = RECIPE

    def __post_init__(self) -> None:
        if self.world is None:
            object.__setattr__(self, "world", WorldConfig(size=self.size))
        if not isinstance(self.world, WorldConfig):
            raise ValueError(f"LabModelConfig.world must be a WorldConfig, got {type(self.world).__name__}")
        if self.world.size != self.size:
            raise ValueError(f"LabModelConfig.size ({self.size}) and world.size ({self.world.size}) differ")
        for name in ("vae_channels", "unet_channels", "unet_cross_attention", "form_mix"):
            object.__setattr__(self, name, _tuple(getattr(self, name)))
        positive = ("latent_channels", "vae_batch_size", "layers_per_block", "unet_heads", "norm_groups",
                    "text_width", "text_layers", "text_heads", "batch_size")
        for name in positive:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"LabModelConfig.{name} must be a positive integer, got {v!r}")
        for name in ("vae_steps", "steps", "warmup_steps", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"LabModelConfig.{name} must be a non-negative integer, got {v!r}")
        if self.steps < 1:
            raise ValueError("LabModelConfig.steps must be at least 1")
        if not self.vae_channels or not self.unet_channels:
            raise ValueError("vae_channels and unet_channels need at least one level each")
        for name in ("vae_channels", "unet_channels"):
            for c in getattr(self, name):
                if isinstance(c, bool) or not isinstance(c, int) or c < 1 or c % self.norm_groups:
                    raise ValueError(f"every entry of {name} must be a positive multiple of norm_groups "
                                     f"({self.norm_groups}), got {getattr(self, name)}")
        if len(self.unet_cross_attention) != len(self.unet_channels):
            raise ValueError("unet_cross_attention needs one entry per unet_channels level")
        factor = 2 ** (len(self.vae_channels) - 1)
        latent = self.size // factor
        if self.size % factor or latent % 2 ** (len(self.unet_channels) - 1):
            raise ValueError(f"size {self.size} does not divide down through {len(self.vae_channels)} "
                             f"autoencoder and {len(self.unet_channels)} UNet levels")
        if self.text_width % self.text_heads or any(c % self.unet_heads for c in self.unet_channels):
            raise ValueError("text_width must divide by text_heads and every UNet width by unet_heads")
        for name in ("vae_lr", "lr"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"LabModelConfig.{name} must be in (0, 1)")
        for name in ("vae_kl_weight", "vae_object_weight", "vae_gradient_weight", "weight_decay",
                     "min_snr_gamma", "object_weight", "text_probe_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"LabModelConfig.{name} must be >= 0")
        for name in ("lr_final", "ema_decay", "cfg_dropout"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"LabModelConfig.{name} must be in [0, 1]")
        forms = [f for f, _ in self.form_mix]
        if len(set(forms)) != len(forms) or any(f not in FORMS for f in forms) \
                or any(not isinstance(w, int) or w < 0 for _, w in self.form_mix) \
                or sum(w for _, w in self.form_mix) < 1:
            raise ValueError(f"form_mix must pair distinct forms of {FORMS} with integer weights >= 0 "
                             f"(at least one positive), got {self.form_mix}")

    @property
    def latent_size(self) -> int:
        """Side of the latent the UNet works on."""
        return self.size // 2 ** (len(self.vae_channels) - 1)

    def to_json(self) -> str:
        """Canonical JSON of every field (sorted keys, no whitespace): what the hash covers."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))

    def config_hash(self) -> str:
        """First 16 hex digits of SHA-256 of :meth:`to_json`: the model's cache folder name."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LabModelConfig:
        """The config :meth:`to_json` wrote (unknown keys are an error)."""
        data = dict(data)
        if isinstance(data.get("world"), Mapping):
            data["world"] = WorldConfig(**data["world"])
        return cls(**data)

    @classmethod
    def quick(cls, size: int = 16, steps: int = 4, **overrides: Any) -> LabModelConfig:
        """A minute-sized plumbing config (tiny widths, a handful of steps): the whole pipeline
        runs and saves, but the images are noise. For tests and ``safet2i lab train --quick``."""
        kw: dict[str, Any] = dict(size=size, vae_channels=(32,), vae_steps=2, vae_batch_size=4,
                                  unet_channels=(32, 32), unet_cross_attention=(False, True), unet_heads=2,
                                  text_width=32, text_layers=1, text_heads=2, steps=steps, batch_size=4,
                                  warmup_steps=1)
        kw.update(overrides)
        return cls(**kw)


def _tuple(value: Any) -> tuple:
    """Lists (from JSON) to tuples, recursively, so configs compare and hash alike."""
    if isinstance(value, (list, tuple)):
        return tuple(_tuple(v) for v in value)
    return value


# --------------------------------------------------------------------------- building


def _require_diffusers() -> None:
    try:
        import diffusers  # noqa: F401, PLC0415
        import torch  # noqa: F401, PLC0415
        import transformers  # noqa: F401, PLC0415
    except ImportError as exc:
        raise SafeT2IError("The lab's model needs torch, diffusers and transformers: "
                           "python -m pip install torch diffusers transformers") from exc


def _scheduler_kwargs() -> dict[str, Any]:
    # DDPM's linear betas: for 16 x 16 latents SD's scaled_linear schedule ends at a signal
    # level (sqrt(alpha_bar_T) = 0.07) that the mean of the noise cannot hide.
    return dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


def build_components(cfg: LabModelConfig, tokenizer: Any = None) -> dict[str, Any]:
    """Randomly initialised ``vae``, ``text_encoder``, ``tokenizer``, ``unet`` and ``scheduler``
    for ``cfg`` (weights from ``cfg.seed``; the caller's torch RNG state is left as it was)."""
    _require_diffusers()
    import torch  # noqa: PLC0415
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel  # noqa: PLC0415
    from transformers import CLIPTextConfig, CLIPTextModel  # noqa: PLC0415

    from .tokenizer import MODEL_MAX_LENGTH, clip_tokenizer  # noqa: PLC0415

    tok = tokenizer if tokenizer is not None else clip_tokenizer()
    levels = len(cfg.vae_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        text = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
            num_attention_heads=cfg.text_heads, num_hidden_layers=cfg.text_layers,
            max_position_embeddings=MODEL_MAX_LENGTH, projection_dim=cfg.text_width,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
        torch.manual_seed(cfg.seed + 1)
        down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.unet_cross_attention)
        up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.unet_cross_attention))
        unet = UNet2DConditionModel(
            sample_size=cfg.latent_size, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
            layers_per_block=cfg.layers_per_block, block_out_channels=cfg.unet_channels,
            down_block_types=down, up_block_types=up, cross_attention_dim=cfg.text_width,
            attention_head_dim=cfg.unet_heads, norm_num_groups=cfg.norm_groups,
            addition_embed_type="text" if cfg.unet_pooled_text else None,
            addition_embed_type_num_heads=cfg.unet_heads)
        torch.manual_seed(cfg.seed + 2)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
            block_out_channels=cfg.vae_channels, down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels, layers_per_block=1,
            norm_num_groups=cfg.norm_groups, sample_size=cfg.size, scaling_factor=1.0)
    sched = DDIMScheduler(**_scheduler_kwargs(), clip_sample=False, set_alpha_to_one=False,
                          steps_offset=1, timestep_spacing="trailing")
    return {"vae": vae.eval(), "text_encoder": text.eval(), "tokenizer": tok, "unet": unet.eval(),
            "scheduler": sched}


def build_pipeline(cfg: LabModelConfig, tokenizer: Any = None) -> Any:
    """A randomly initialised ``StableDiffusionPipeline`` of ``cfg``'s architecture
    (no safety checker, no feature extractor)."""
    from diffusers import StableDiffusionPipeline  # noqa: PLC0415

    return StableDiffusionPipeline(**build_components(cfg, tokenizer), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def worker_pipeline(folder: str, device: str) -> Any:
    """A Ray worker's lab pipeline (``safet2i lab table --ray``): loaded, on ``device``, quiet."""
    pipe = load_pipeline(folder).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(folder: str | Path) -> Any:
    """``StableDiffusionPipeline.from_pretrained(folder)`` from local files only (safetensors)."""
    _require_diffusers()
    from diffusers import StableDiffusionPipeline  # noqa: PLC0415

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise SafeT2IError(f"{folder} is not a saved lab model (no model_index.json); train one with "
                           "`safet2i lab train`")
    return StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                                   safety_checker=None, requires_safety_checker=False)


def parameter_counts(pipe: Any) -> dict[str, int]:
    """Parameters of each trained component (the text encoder's includes its 49,408-row
    token embedding)."""
    return {name: sum(p.numel() for p in getattr(pipe, name).parameters())
            for name in ("vae", "unet", "text_encoder")}


# --------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """Where trained lab models live: ``$SAFET2I_CACHE/lab`` when set (SafeT2I's cache root, as
    for the TensorRT engines), else ``${XDG_CACHE_HOME:-~/.cache}/safet2i/lab``."""
    root = os.environ.get("SAFET2I_CACHE")
    if root:
        return Path(root).expanduser() / "lab"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "safet2i" / "lab"


def model_folder(cfg: LabModelConfig, cache_dir: str | Path | None = None) -> Path:
    """The folder a finished model of ``cfg`` is (or will be) saved in."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / cfg.config_hash()


def is_finished(folder: str | Path, cfg: LabModelConfig | None = None) -> bool:
    """Whether ``folder`` holds a finished lab model (of ``cfg``, when given)."""
    marker = Path(folder) / FINISHED_MARKER
    if not marker.is_file() or not (Path(folder) / "model_index.json").is_file():
        return False
    if cfg is None:
        return True
    try:
        return json.loads(marker.read_text()).get("config_hash") == cfg.config_hash()
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------- training


def form_pattern(mix: tuple[tuple[str, int], ...]) -> tuple[str, ...]:
    """The forms of consecutive training samples, one period: each form as often as its
    weight, spread evenly (largest deficit first), so every batch holds the mix."""
    total = sum(w for _, w in mix)
    counts = {f: 0 for f, _ in mix}
    out = []
    for j in range(total):
        f = max(mix, key=lambda fw: fw[1] * (j + 1) / total - counts[fw[0]])[0]
        counts[f] += 1
        out.append(f)
    return tuple(out)


def lr_at(cfg: LabModelConfig, step: int) -> float:
    """Learning rate of diffusion step ``step`` (0-based): linear warm-up, cosine decay."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.lr * (cfg.lr_final + (1 - cfg.lr_final) * 0.5 * (1 + math.cos(math.pi * progress)))


def vae_lr_at(cfg: LabModelConfig, step: int) -> float:
    """Learning rate of autoencoder step ``step``: warm-up over a tenth of the phase (at most
    50 steps), cosine decay to a tenth."""
    warm = max(1, min(50, cfg.vae_steps // 10))
    if step < warm:
        return cfg.vae_lr * (step + 1) / warm
    progress = min((step - warm) / max(cfg.vae_steps - warm, 1), 1.0)
    return cfg.vae_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class _Run:
    """Everything one training run holds: the models, the data stream and the state that a
    checkpoint saves (weights, optimiser moments, EMA, step counters, losses, seconds)."""

    def __init__(self, cfg: LabModelConfig, device: str):
        import torch  # noqa: PLC0415

        self.cfg, self.device, self.torch = cfg, torch.device(device), torch
        self.pipe = build_pipeline(cfg)
        for name in ("vae", "unet", "text_encoder"):
            getattr(self.pipe, name).to(self.device)
        self.world = World(cfg.world)
        self.pattern = form_pattern(cfg.form_mix)
        self.phase = "vae" if cfg.vae_steps else "diffusion"
        self.step = 0
        self.losses: dict[str, list[float]] = {"vae": [], "diffusion": [], "text_probe": []}
        self.seconds: dict[str, float] = {"vae": 0.0, "diffusion": 0.0}
        self.empty_ids = self._ids([""])[0]
        self.noise_sched = None
        self.opt = None
        self.ema: list[Any] = []
        self._start_phase()

    # -- data -----------------------------------------------------------------------------

    def _ids(self, captions: list[str]) -> Any:
        tok = self.pipe.tokenizer
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        return ids.to(self.device)

    def batch(self, phase: str, step: int, n: int) -> tuple[Any, list[str], Any, Any]:
        """Images in [-1, 1] ``[n, 3, H, W]``, captions, object coverage ``[n, 1, H, W]`` and
        attribute labels ``[n, 6]`` (value indices, :data:`ATTRIBUTES` order) of step ``step``:
        samples ``step * n + i`` of the train split, forms following :func:`form_pattern`."""
        offset = 0 if phase == "diffusion" else 1 << 40  # the autoencoder sees other samples
        samples = [self.world.sample(offset + step * n + i, self.pattern[(step * n + i) % len(self.pattern)])
                   for i in range(n)]
        images = np.stack([s.image for s in samples]).astype(np.float32) / 127.5 - 1.0
        x = self.torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(self.device)
        cover = self.torch.from_numpy(np.stack([s.coverage for s in samples])[:, None]).to(self.device)
        labels = self.torch.tensor([[vals.index(s.attributes[a]) for a, vals in ATTRIBUTES.items()]
                                    for s in samples], device=self.device)
        return x, [s.caption for s in samples], cover, labels

    def generator(self, phase: str, step: int) -> Any:
        """The torch Generator of one step: a pure function of (seed, phase, step), so a
        resumed run draws exactly what an uninterrupted one does."""
        digest = hashlib.sha256(f"safet2i.lab.model|{self.cfg.seed}|{phase}|{step}".encode()).digest()
        g = self.torch.Generator(device=self.device)
        g.manual_seed(int.from_bytes(digest[:8], "big") & ((1 << 63) - 1))
        return g

    # -- phases ---------------------------------------------------------------------------

    def trained(self) -> list[Any]:
        """The parameters the current phase trains."""
        if self.phase == "vae":
            return list(self.pipe.vae.parameters())
        return list(self.pipe.unet.parameters()) + list(self.pipe.text_encoder.parameters())

    def _start_phase(self) -> None:
        torch = self.torch
        p = self.pipe
        if self.phase == "vae":
            p.vae.train().requires_grad_(True)
            p.unet.requires_grad_(False)
            p.text_encoder.requires_grad_(False)
            self.opt = torch.optim.AdamW(self.trained(), lr=self.cfg.vae_lr, weight_decay=0.0)
            return
        from diffusers import DDPMScheduler  # noqa: PLC0415

        p.vae.eval().requires_grad_(False)
        p.unet.train().requires_grad_(True)
        p.text_encoder.train().requires_grad_(True)
        self.noise_sched = DDPMScheduler(**_scheduler_kwargs())
        self.alphas = self.noise_sched.alphas_cumprod.to(self.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed + 3)
            classes = sum(len(v) for v in ATTRIBUTES.values())
            self.probe = torch.nn.Linear(self.cfg.text_width, classes).to(self.device)
        params = self.trained()
        self.opt = torch.optim.AdamW(params + list(self.probe.parameters()), lr=self.cfg.lr,
                                     weight_decay=self.cfg.weight_decay)
        self.ema = [q.detach().clone() for q in params]

    def finish_vae(self) -> None:
        """Standardise the latent per channel and start the diffusion phase."""
        standardise_latents(self.pipe.vae, self._latent_probe())
        self.phase, self.step = "diffusion", 0
        self._start_phase()

    def _latent_probe(self) -> Any:
        x, _, _, _ = self.batch("probe", 0, 256)
        with self.torch.no_grad():
            return self.pipe.vae.encode(x).latent_dist.mean

    # -- checkpoints ----------------------------------------------------------------------

    def tensors(self) -> dict[str, Any]:
        """Every tensor of the run's state, by name (what :meth:`save` writes)."""
        out = {f"vae.{k}": v for k, v in self.pipe.vae.state_dict().items()}
        if self.phase == "diffusion":
            out.update({f"unet.{k}": v for k, v in self.pipe.unet.state_dict().items()})
            out.update({f"text_encoder.{k}": v for k, v in self.pipe.text_encoder.state_dict().items()})
            out.update({f"ema.{i}": v for i, v in enumerate(self.ema)})
            out.update({f"probe.{k}": v for k, v in self.probe.state_dict().items()})
        for i, st in self.opt.state_dict()["state"].items():
            for k, v in st.items():
                out[f"opt.{i}.{k}"] = v if self.torch.is_tensor(v) else self.torch.tensor(v)
        return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}

    def save(self, folder: Path) -> None:
        """Write the checkpoint atomically (tensors first, then the JSON that points at them)."""
        from safetensors.torch import save_file  # noqa: PLC0415

        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (CHECKPOINT_TENSORS + ".tmp")
        save_file(self.tensors(), str(tmp))
        os.replace(tmp, folder / CHECKPOINT_TENSORS)
        state = {"config_hash": self.cfg.config_hash(), "config": json.loads(self.cfg.to_json()),
                 "phase": self.phase, "step": self.step, "losses": self.losses, "seconds": self.seconds,
                 "tensors_sha256": _sha256(folder / CHECKPOINT_TENSORS)}
        tmp_state = folder / (CHECKPOINT_STATE + ".tmp")
        tmp_state.write_text(json.dumps(state))
        os.replace(tmp_state, folder / CHECKPOINT_STATE)

    def load(self, folder: Path) -> bool:
        """Restore from ``folder``'s checkpoint; False (nothing changed) when there is none or
        it belongs to another config or does not match its tensors."""
        from safetensors.torch import load_file  # noqa: PLC0415

        state_path, tensor_path = folder / CHECKPOINT_STATE, folder / CHECKPOINT_TENSORS
        if not state_path.is_file() or not tensor_path.is_file():
            return False
        try:
            state = json.loads(state_path.read_text())
        except (OSError, ValueError):
            return False
        if state.get("config_hash") != self.cfg.config_hash():
            return False
        if state.get("tensors_sha256") != _sha256(tensor_path):
            return False
        t = load_file(str(tensor_path), device=str(self.device))
        self.phase, self.step = state["phase"], int(state["step"])
        self.losses, self.seconds = state["losses"], state["seconds"]
        self.pipe.vae.load_state_dict(_prefixed(t, "vae."))
        self._start_phase()
        if self.phase == "diffusion":
            self.pipe.unet.load_state_dict(_prefixed(t, "unet."))
            self.pipe.text_encoder.load_state_dict(_prefixed(t, "text_encoder."))
            for i, e in enumerate(self.ema):
                e.copy_(t[f"ema.{i}"])
            self.probe.load_state_dict(_prefixed(t, "probe."))
        opt_state: dict[int, dict[str, Any]] = {}
        for k, v in _prefixed(t, "opt.").items():
            i, name = k.split(".", 1)
            opt_state.setdefault(int(i), {})[name] = v
        self.opt.load_state_dict({"state": opt_state, "param_groups": self.opt.state_dict()["param_groups"]})
        return True


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _prefixed(tensors: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def standardise_latents(vae: Any, latents: Any) -> None:
    """Fold the per-channel mean and standard deviation of ``latents`` (posterior means of
    the training images) into the autoencoder, so that its latents are ~N(0, 1) per channel
    and ``scaling_factor`` stays 1: ``quant_conv`` maps to (mean - m) / s (log-variance
    - 2 log s), ``post_quant_conv`` undoes it (decoding any latent is unchanged)."""
    import torch  # noqa: PLC0415

    c = vae.config.latent_channels
    m = latents.mean(dim=(0, 2, 3)).double()
    s = latents.std(dim=(0, 2, 3)).double().clamp_min(1e-6)
    with torch.no_grad():
        q, pq = vae.quant_conv, vae.post_quant_conv
        w, b = q.weight.double(), q.bias.double()
        w[:c] /= s[:, None, None, None]
        b[:c] = (b[:c] - m) / s
        b[c:] = b[c:] - 2 * torch.log(s)
        q.weight.copy_(w.float())
        q.bias.copy_(b.float())
        # post(z) = W z + b with z = s * z' + m  ->  W' = W * s (per input), b' = b + W m
        w2, b2 = pq.weight.double(), pq.bias.double()
        b2 = b2 + (w2[:, :, 0, 0] @ m)
        w2 = w2 * s[None, :, None, None]
        pq.weight.copy_(w2.float())
        pq.bias.copy_(b2.float())
    vae.register_to_config(scaling_factor=1.0)


def _vae_step(run: _Run, step: int) -> float:
    """One autoencoder step: L1 reconstruction of a sampled latent + weighted KL."""
    cfg, torch = run.cfg, run.torch
    x, _, cover, _ = run.batch("vae", step, cfg.vae_batch_size)
    g = run.generator("vae", step)
    post = run.pipe.vae.encode(x).latent_dist
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=g, device=run.device)
    rec = run.pipe.vae.decode(z).sample
    kl = post.kl().mean() / post.mean[0].numel()
    err = rec - x
    weight = 1 + cfg.vae_object_weight * cover  # objects are few pixels: weigh them up
    loss = (weight * (err.abs() + err * err)).mean() / weight.mean() + cfg.vae_kl_weight * kl
    if cfg.vae_gradient_weight:  # L1 of the image-gradient error: blurred edges cost extra
        grad = (err[..., :, 1:] - err[..., :, :-1]).abs().mean() \
            + (err[..., 1:, :] - err[..., :-1, :]).abs().mean()
        loss = loss + cfg.vae_gradient_weight * grad
    for group in run.opt.param_groups:
        group["lr"] = vae_lr_at(cfg, step)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.trained(), 1.0)
    run.opt.step()
    return float(loss.detach())


def _diffusion_step(run: _Run, step: int) -> float:
    """One ε-prediction step of UNet + text encoder (Min-SNR weights, caption dropout) plus
    the text probe's loss, then the EMA update. Returns the diffusion loss."""
    cfg, torch = run.cfg, run.torch
    x, captions, cover, labels = run.batch("diffusion", step, cfg.batch_size)
    g = run.generator("diffusion", step)
    n = x.shape[0]
    with torch.no_grad():
        latents = run.pipe.vae.encode(x).latent_dist.mean * run.pipe.vae.config.scaling_factor
    ids = run._ids(captions)
    drop = torch.rand(n, generator=g, device=run.device) < cfg.cfg_dropout
    ids = torch.where(drop[:, None], run.empty_ids[None], ids)
    t = torch.randint(0, run.noise_sched.config.num_train_timesteps, (n,), generator=g, device=run.device)
    noise = torch.randn(latents.shape, generator=g, device=run.device)
    noisy = run.noise_sched.add_noise(latents, noise, t)
    text = run.pipe.text_encoder(ids)
    cond = text[0]
    pred = run.pipe.unet(noisy, t, cond).sample
    a = run.alphas[t]
    snr = a / (1 - a)
    weight = snr.clamp(max=cfg.min_snr_gamma) / snr if cfg.min_snr_gamma > 0 else torch.ones_like(snr)
    err = (pred - noise) ** 2
    if cfg.object_weight:  # latent pixels under objects weigh 1 + object_weight x coverage
        cover = torch.nn.functional.adaptive_avg_pool2d(cover, latents.shape[-2:])
        w = 1 + cfg.object_weight * cover
        per_image = (w * err).mean(dim=(1, 2, 3)) / w.mean(dim=(1, 2, 3))
    else:
        per_image = err.mean(dim=(1, 2, 3))
    loss = (weight * per_image).mean()
    probe_loss = _probe_loss(run, text[1], labels, ~drop)
    run.losses["text_probe"].append(float(probe_loss.detach()))
    for group in run.opt.param_groups:
        group["lr"] = lr_at(cfg, step)
    run.opt.zero_grad(set_to_none=True)
    (loss + cfg.text_probe_weight * probe_loss).backward()
    params = run.trained()
    torch.nn.utils.clip_grad_norm_(params + list(run.probe.parameters()), 1.0)
    run.opt.step()
    decay = min(cfg.ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        torch._foreach_mul_(run.ema, decay)
        torch._foreach_add_(run.ema, [p.detach() for p in params], alpha=1 - decay)
    return float(loss.detach())


def _probe_loss(run: _Run, pooled: Any, labels: Any, keep: Any) -> Any:
    """Mean cross-entropy of the text probe over the six attributes, on the captions that
    were not dropped (0 when all were)."""
    torch = run.torch
    logits = run.probe(pooled[keep])
    if logits.shape[0] == 0:
        return logits.sum()
    total, start = 0.0, 0
    for j, values in enumerate(ATTRIBUTES.values()):
        part = logits[:, start:start + len(values)]
        total = total + torch.nn.functional.cross_entropy(part, labels[keep, j])
        start += len(values)
    return total / len(ATTRIBUTES)


def _check_device(device: str) -> str:
    import torch  # noqa: PLC0415

    if device == "cpu":
        return device
    if device.split(":")[0] == "cuda":
        if not torch.cuda.is_available():
            raise SafeT2IError(f"--device {device}: torch sees no CUDA device here (torch "
                               f"{torch.__version__}); train on the CPU with --device cpu")
        return device
    raise SafeT2IError(f"unknown device {device!r}: use cpu or cuda")


def train(cfg: LabModelConfig | None = None, cache_dir: str | Path | None = None, device: str = "cpu",
          resume: bool = True, progress: bool = True, *, checkpoint_every: int = 100,
          checkpoint_seconds: float = 120.0, callback: Callback | None = None) -> Path:
    """Train the lab model of ``cfg`` (default :class:`LabModelConfig`) and return its folder,
    ``<cache_dir or default_cache_dir()>/<cfg.config_hash()>``, a diffusers folder that
    :func:`load_pipeline` (``StableDiffusionPipeline.from_pretrained``) loads.

    A finished model of ``cfg`` in that folder is returned at once, without building
    anything. Otherwise training checkpoints into ``<hash>.partial/`` every
    ``checkpoint_every`` steps or ``checkpoint_seconds`` seconds and at the end of the
    autoencoder phase; ``resume=True`` continues from there (on CPU the result is bit-identical
    to an uninterrupted run: every random draw is a function of the seed and the step),
    ``resume=False`` starts over. ``<hash>.lock`` keeps a second process off the same config.
    ``callback(phase, step, loss)`` is called after every step
    (``step`` counts the steps done in the phase; an exception from it stops training after the
    checkpoints so far). A tqdm bar shows progress unless ``progress=False``.
    """
    cfg = cfg or LabModelConfig()
    folder = model_folder(cfg, cache_dir)
    if is_finished(folder, cfg):
        return folder
    if folder.exists():
        raise SafeT2IError(f"{folder} exists but is not a finished lab model of this config; "
                           "remove it and train again")
    _require_diffusers()
    device = _check_device(device)
    with _training_lock(folder.with_name(folder.name + ".lock")):
        if is_finished(folder, cfg):  # another process finished it while we waited
            return folder
        return _train(cfg, folder, device, resume, progress, checkpoint_every, checkpoint_seconds, callback)


def _alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _training_lock(path: Path):
    """Hold ``path`` (holding our pid) while training, so two processes never write the same
    checkpoint; a lock left by a process that is gone is taken over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(path.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                raise SafeT2IError(f"another process (pid {pid}) is training this lab model; wait for it to "
                                   f"finish, or delete {path} if that process is gone") from None
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        break
    else:
        raise SafeT2IError(f"cannot take the training lock {path}")
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _train(cfg: LabModelConfig, folder: Path, device: str, resume: bool, progress: bool,
           checkpoint_every: int, checkpoint_seconds: float, callback: Callback | None) -> Path:
    """:func:`train`'s work once the lock is held."""
    import torch  # noqa: PLC0415

    partial = folder.with_name(folder.name + ".partial")
    run = _Run(cfg, device)
    resumed = resume and run.load(partial)
    if not resume and partial.exists():
        shutil.rmtree(partial)
    total = cfg.vae_steps + cfg.steps
    done = run.step + (cfg.vae_steps if run.phase == "diffusion" else 0)
    bar = _progress(total, done, progress, "resumed " if resumed else "")
    last_save = time.monotonic()
    try:
        while True:
            steps = cfg.vae_steps if run.phase == "vae" else cfg.steps
            if run.step >= steps:
                if run.phase == "diffusion":
                    break
                run.finish_vae()
                run.save(partial)
                last_save = time.monotonic()
                continue
            t0 = time.perf_counter()
            fn = _vae_step if run.phase == "vae" else _diffusion_step
            loss = fn(run, run.step)
            if not math.isfinite(loss):
                raise SafeT2IError(f"the {run.phase} loss became {loss} at step {run.step}; lower the "
                                   "learning rate of the config")
            run.step += 1
            run.losses[run.phase].append(loss)
            run.seconds[run.phase] += time.perf_counter() - t0
            bar.set_postfix_str(f"{run.phase} loss {loss:.4f}", refresh=False)
            bar.update(1)
            if run.step % checkpoint_every == 0 or time.monotonic() - last_save > checkpoint_seconds:
                run.save(partial)
                last_save = time.monotonic()
            if callback is not None:
                callback(run.phase, run.step, loss)
    finally:
        bar.close()
    with torch.no_grad():
        for p, e in zip(run.trained(), run.ema):
            p.copy_(e)
    _save_final(run, folder, partial, device)
    return folder


def _progress(total: int, done: int, enabled: bool, prefix: str) -> Any:
    from tqdm.auto import tqdm  # noqa: PLC0415

    return tqdm(total=total, initial=done, disable=not enabled, desc=f"{prefix}safet2i lab train",
                unit="step", dynamic_ncols=True)


def _save_final(run: _Run, folder: Path, partial: Path, device: str) -> None:
    """Save the pipeline (EMA weights) under a temporary name, write the marker, rename."""
    pipe = run.pipe
    for name in ("vae", "unet", "text_encoder"):
        getattr(pipe, name).to("cpu").eval().requires_grad_(False)
    tmp = folder.with_name(f"{folder.name}.saving-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    info = {"config_hash": run.cfg.config_hash(), "config": json.loads(run.cfg.to_json()),
            "parameters": parameter_counts(pipe), "device": device, "seconds": run.seconds,
            "losses": run.losses, "finished": True}
    (tmp / FINISHED_MARKER).write_text(json.dumps(info, indent=1))
    try:
        os.replace(tmp, folder)
    except OSError:
        if not is_finished(folder, run.cfg):  # another process finished the same config first
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(partial, ignore_errors=True)


def training_info(folder: str | Path) -> dict[str, Any]:
    """The finished model's record: config, parameter counts, seconds and losses per phase."""
    path = Path(folder) / FINISHED_MARKER
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SafeT2IError(f"{folder} is not a finished lab model ({path} unreadable: {exc})") from exc


@contextlib.contextmanager
def _threads(n: int | None):
    """Temporarily use ``n`` torch CPU threads (None: leave as is)."""
    import torch  # noqa: PLC0415

    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


__all__ = ["LabModelConfig", "build_components", "build_pipeline", "load_pipeline", "train", "model_folder",
           "default_cache_dir", "is_finished", "training_info", "parameter_counts", "form_pattern", "lr_at",
           "standardise_latents", "RECIPE"]
