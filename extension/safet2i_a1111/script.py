"""The webui script: one always-visible SafeT2I accordion, its hooks, settings, API route, Extras.

Hook map (a1111.md §1.3/§1.5): ``setup`` (job state, live-preview filter), ``process``
(infotext), ``process_batch`` (guidance callbacks armed for this batch), the CFG callbacks
(guidance rows), ``postprocess_image_after_composite`` (or ``postprocess_image`` on older
webuis: the output filter on the full composited image), ``on_before_image_saved`` (every
file written while a job runs, and everything when enforced: intermediate saves, grids,
Extras), ``postprocess`` (clean-up). The webui swallows exceptions raised in hooks, so every
hook catches its own and the job is marked failed: images of a failed job are blocked.
"""

from __future__ import annotations

import base64
import functools
import io
import logging
from dataclasses import dataclass, field

from PIL import Image

import modules.scripts as scripts
from modules import script_callbacks, shared

from . import TITLE
from .settings import SECTION, default_config, enforcement, guard_options_api, on_ui_settings, opt  # noqa: F401
from .config import (
    DEFAULT_CONCEPT, ENFORCE_ACTIONS, FILTER_ACTIONS, GUIDANCE_METHODS, POLICIES, SLD_PRESET_NAMES, JobConfig,
    parse_infotext,
)
from .config import LORA_STRENGTH, STEERING_ORDERS, steering_presets
from . import lora as lora_layer
from . import weights as weights_layer
from .steering import SteeringHook, candidate_texts
from . import forge_guidance
from .filtering import blocked_image, filter_image, verdict_text, was_checked
from .guidance import GuidanceHook, make_method

log = logging.getLogger("safet2i")
_opt = opt


def _refresh_button(component, refresh, tab: str):
    """The webui's own refresh button (``modules.ui_common.create_refresh_button``) when present."""
    try:
        from modules.ui_common import create_refresh_button  # noqa: PLC0415
    except Exception:  # noqa: BLE001 - older webuis / stand-ins: no button
        return None
    return create_refresh_button(component, lambda: None, refresh, f"safet2i_lora_refresh_{tab}")


# --------------------------------------------------------------------------- job state

@dataclass
class Job:
    cfg: JobConfig
    p: object = None
    hook: GuidanceHook | None = None
    error: str | None = None
    verdicts: dict[int, str] = field(default_factory=dict)
    restore: list = field(default_factory=list)
    steering: SteeringHook | None = None          # prompt layer (steering.py)
    lora: lora_layer.SafetyLora | None = None     # model layer (lora.py)
    weights: weights_layer.SafetyWeights | None = None   # model layer (weights.py): full safety weights
    steering_texts: list = field(default_factory=list)   # the texts of the current batch (report)
    concept: object = None                        # Forge/reForge: the concept embedding of the batch
    runs: list = field(default_factory=list)      # guidance hooks / UNet-patch runs (steps_guided each)
    guided_mark: int = 0                          # guided steps counted at the last check
    steer_mark: int = 0                           # steering callback calls counted at the last check

    @property
    def failed(self) -> str | None:
        return self.error or (self.hook.error if self.hook else None)

    def guided_steps(self) -> int:
        return sum(getattr(r, "steps_guided", 0) for r in self.runs)

    def check_guided(self, where: str) -> None:
        """Guidance must have guided at least one step since the last check; else (callbacks
        removed, a sampler or extension that bypasses them, an interrupted pass) the images
        are blocked rather than passed unguided."""
        if not self.cfg.guidance_active or self.failed:
            return
        now = self.guided_steps()
        if now <= self.guided_mark:
            self.error = (f"safety guidance did not run in the {where} (no guided step: another extension or the "
                          "sampler bypassed it)")
            log.error("SafeT2I: %s; images of this job will be blocked", self.error)
        self.guided_mark = now

    def check_steered(self, where: str) -> None:
        """Steering must have seen the conditioning at least once since the last check; else
        (callback removed, a sampler that bypasses ``on_cfg_denoiser``) the images are
        blocked rather than passed with an unsteered prompt."""
        if not self.cfg.steering_enabled or self.failed:
            return
        now = self.steering.calls if self.steering is not None else 0
        if now <= self.steer_mark:
            self.error = (f"concept steering did not run in the {where} (its conditioning callback never fired: "
                          "another extension or the sampler bypassed it)")
            log.error("SafeT2I: %s; images of this job will be blocked", self.error)
        self.steer_mark = now

    def check_weights(self, p, where: str, full: bool = True) -> None:
        """The full safety weights are still in the model the job samples with (a model
        switched or reloaded mid-job would otherwise run with infotext saying "verified").
        After each sampling pass every tensor is compared (``full``); before one, only that
        the model and its part are the same objects (so nothing is sampled in vain)."""
        sw = self.weights
        if sw is None or sw.restored or self.failed:
            return
        try:
            weights_layer.check_applied(sw, getattr(p if p is not None else self.p, "sd_model", None), where, full)
        except Exception as exc:  # noqa: BLE001
            self.error = f"safety weights: {exc}"
            log.error("SafeT2I: %s; images of this job will be blocked", self.error)

    def check_layers(self, where: str, p=None) -> None:
        self.check_guided(where)
        self.check_steered(where)
        self.check_weights(p, where)


_ACTIVE: list[Job] = []   # the job being generated (the webui runs one at a time)


def current_job() -> Job | None:
    return _ACTIVE[-1] if _ACTIVE else None


def _job(p) -> Job | None:
    return getattr(p, "_safet2i_job", None)


def _encode_concept(p, text: str):
    """Concept embedding rows with the job's model: tensor [T, D], or SDXL dict."""
    from modules import prompt_parser  # noqa: PLC0415

    model = p.sd_model
    if getattr(model, "is_sdxl", False):
        cond = model.get_learned_conditioning(prompt_parser.SdConditioning([text], width=p.width, height=p.height))
        return {k: v[0].detach().clone() for k, v in cond.items()}
    cond = model.get_learned_conditioning([text])
    if isinstance(cond, dict):
        return {k: v[0].detach().clone() for k, v in cond.items()}
    return cond[0].detach().clone()


def _loaded_checkpoint_names(p) -> set:
    """The names the loaded checkpoint goes by (a hires / refiner choice equal to one of them
    is no switch)."""
    info = getattr(getattr(p, "sd_model", None), "sd_checkpoint_info", None)
    names = {getattr(info, a, None) for a in ("title", "name", "short_title", "model_name", "name_for_extra")}
    names.add(_opt("sd_model_checkpoint", None))
    return {n for n in names if isinstance(n, str) and n}


def _other_checkpoint(p, hires: bool = True) -> str | None:
    """The hires-fix checkpoint or Forge hires modules (``hires``) or the refiner a job switches
    to (None: it stays on the loaded model)."""
    loaded = _loaded_checkpoint_names(p)
    if hires and getattr(p, "enable_hr", False):
        hr = getattr(p, "hr_checkpoint_name", None)
        if hr and hr != "Use same checkpoint" and hr not in loaded:
            return f"a hires-fix checkpoint ({hr})"
        modules = getattr(p, "hr_additional_modules", None)       # Forge: hires VAE / text encoder
        if isinstance(modules, list) and "Use same choices" not in modules \
                and list(modules) != list(_opt("forge_additional_modules", []) or []):
            return f"other hires-fix modules ({', '.join(map(str, modules)) or 'built-in'})"
    refiner = getattr(p, "refiner_checkpoint", None)
    if refiner and refiner not in ("None", "none") and refiner not in loaded \
            and (getattr(p, "refiner_switch_at", None) or 0) < 1:
        return f"a refiner ({refiner})"
    return None


def _unet_replaced() -> str | None:
    """A1111 ``sd_unet``: an alternative UNet (TensorRT, ...) the webui routes the model's
    forward to; the weights in the model (safety weights, a merged safety LoRA) are then unused."""
    try:
        from modules import sd_unet  # noqa: PLC0415
    except Exception:  # noqa: BLE001 - no such module: nothing replaces the UNet
        return None
    current = getattr(sd_unet, "current_unet", None)
    if current is None:
        return None
    return (f"the webui runs an alternative UNet ({type(current).__name__}, setting 'SD Unet'), not the model's "
            "weights; the safety weights / LoRA would not be used (set 'SD Unet' to None)")


def _guidance_model_error(model) -> str | None:
    """Guidance assumes x = x0 + σ·ε (ε- and v-prediction SD1.x / SD2.x / SDXL); flow models
    (SD3, Flux) would be guided wrongly, so they are refused (the images are then blocked)."""
    if getattr(model, "is_sd3", False):
        return "SafeT2I guidance supports SD1.x, SD2.x and SDXL models, not SD3"
    kinds = [a for a in ("is_sd1", "is_sd2", "is_sdxl") if hasattr(model, a)]
    if kinds and not any(getattr(model, a) for a in kinds):
        return f"SafeT2I guidance supports SD1.x, SD2.x and SDXL models, not {type(model).__name__}"
    return None


def _is_eps_sampler(p, params=None) -> bool:
    denoiser = getattr(params, "denoiser", None) if params is not None else None
    names = [type(denoiser).__name__ if denoiser is not None else "", type(getattr(p, "sampler", None)).__name__]
    return any("Timesteps" in n or "CompVis" in n for n in names)


# --------------------------------------------------------------------------- CFG callbacks (global)

def _on_cfg_denoiser(params):
    job = current_job()
    if not (job and job.hook):
        return
    p = getattr(getattr(params, "denoiser", None), "p", None)
    if p is not None and _job(p) is not job:
        return
    host_p = p if p is not None else job.p
    job.hook.eps_prediction = _is_eps_sampler(host_p, params)
    job.hook.total_hint = getattr(getattr(getattr(host_p, "sampler", None), "model_wrap_cfg", None), "total_steps", None)
    job.hook.before(params)


def _on_cfg_denoiser_steering(params):
    """``on_cfg_denoiser``, registered before the guidance callback so that it sees the
    webui's own cond rows: ``params.text_cond`` holds the cond rows only (all images, ``AND``
    sub-prompts in order; uncond rows are ``params.text_uncond``), already picked for this
    step from the prompt schedule. The steered rows go into a new tensor assigned to
    ``params.text_cond``, which the webui reads back after the callback (A1111 and Forge)."""
    job = current_job()
    if not (job and job.steering) or job.failed:
        return
    p = getattr(getattr(params, "denoiser", None), "p", None)
    if p is not None and _job(p) is not job:
        return
    try:
        job.steering.apply(params)
        (p or job.p).extra_generation_params["SafeT2I steering report"] = job.steering.report(job.steering_texts)
    except Exception as exc:  # noqa: BLE001 - recorded: the images are blocked
        job.error = f"steering failed: {exc}"
        log.error("SafeT2I: %s; images of this job will be blocked", job.error)


def _on_cfg_denoised(params):
    job = current_job()
    if job and job.hook:
        job.hook.after(params)


def _on_before_image_saved(params):
    """Every image file the webui writes passes here (samples, intermediates, grids, Extras)."""
    try:
        img = params.image
        if img is None or was_checked(img):
            return
        job = current_job()
        enforce = enforcement()
        if job is None and not enforce:
            return
        cfg = job.cfg if job else default_config(enforce)
        if job and job.weights is not None and not job.failed:
            job.check_weights(None, "before saving an image")   # e.g. the image before hires fix
        if job and job.failed:
            params.image = blocked_image(img.size, "blocked")    # whatever a detector would say
            return
        if not cfg.filter_enabled:
            return
        params.image = filter_image(img, cfg.filter_policy, cfg.filter_action).image
    except Exception as exc:  # noqa: BLE001 - never let an unchecked image be written
        log.error("SafeT2I: save hook failed, writing a placeholder: %s", exc)
        params.image = blocked_image(getattr(params.image, "size", (64, 64)), "error")


#: ``POST /safet2i/filter``: request bodies over this many bytes are refused with 413 before
#: they are read; environment ``SAFET2I_API_MAX_BODY`` (bytes, read when the webui starts).
API_MAX_BODY = 64 * 1024 * 1024
ENV_API_MAX_BODY = "SAFET2I_API_MAX_BODY"
API_FIELDS = ("image", "policy", "action")


class _ApiError(Exception):
    """A request the route refuses: HTTP ``status`` and a JSON ``{"error", "field"?}`` body."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field

    def content(self) -> dict:
        return {"error": self.message, **({"field": self.field} if self.field else {})}


def api_served() -> bool:
    """Whether the webui serves its HTTP API: ``--api`` (next to the UI) or ``--nowebui``
    (the API alone). ``webui.py`` adds the API routes only then, but calls ``on_app_started``
    either way, so the route checks it itself."""
    opts = getattr(shared, "cmd_opts", None)
    return bool(getattr(opts, "api", False) or getattr(opts, "nowebui", False))


def api_max_body() -> int:
    """The request body limit in bytes (``SAFET2I_API_MAX_BODY``; ValueError naming it when malformed)."""
    import os  # noqa: PLC0415

    raw = os.environ.get(ENV_API_MAX_BODY, "").strip().replace("_", "")
    if not raw:
        return API_MAX_BODY
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{ENV_API_MAX_BODY}={raw!r} is not a whole number of bytes") from None
    if value < 1:
        raise ValueError(f"{ENV_API_MAX_BODY} must be at least 1 byte, got {value}")
    return value


async def _read_body(request, limit: int) -> bytes:
    """The request body, refused with 413 over ``limit`` bytes: by its ``Content-Length``
    before anything is read, and while streaming (chunked bodies declare no length)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise _ApiError(400, f"Content-Length {declared!r} is not a number") from None
        if size > limit:
            raise _ApiError(413, f"the request body is {size:,} bytes, more than the {limit:,}-byte limit "
                                 f"(set {ENV_API_MAX_BODY} to change it)")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise _ApiError(413, f"the request body is more than the {limit:,}-byte limit "
                                 f"(set {ENV_API_MAX_BODY} to change it)")
        chunks.append(chunk)
    return b"".join(chunks)


def _kind(value) -> str:
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def _parse_request(body: bytes) -> tuple[bytes, str, str]:
    """(image bytes, policy, action) from the JSON body, or :class:`_ApiError` 422 naming the field."""
    import binascii  # noqa: PLC0415
    import json  # noqa: PLC0415

    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:        # also UnicodeDecodeError
        raise _ApiError(422, f"the request body is not valid JSON ({type(exc).__name__})", "body") from None
    if not isinstance(payload, dict):
        raise _ApiError(422, f"the request body must be a JSON object, got {_kind(payload)}", "body")
    unknown = sorted(set(payload) - set(API_FIELDS))
    if unknown:
        raise _ApiError(422, f"unknown field(s) {unknown}; the fields are {list(API_FIELDS)}", unknown[0])
    enforce = enforcement()
    cfg = default_config(enforce)
    values = {"policy": cfg.filter_policy, "action": cfg.filter_action}
    for name, choices in (("policy", POLICIES), ("action", FILTER_ACTIONS)):
        if name in payload:
            value = payload[name]
            if not isinstance(value, str):
                raise _ApiError(422, f"{name} must be a string, one of {list(choices)}; got {_kind(value)}", name)
            if value not in choices:
                raise _ApiError(422, f"unknown {name} {value!r}; use one of {list(choices)}", name)
            values[name] = value
    policy, action = values["policy"], values["action"]
    if enforce:   # a weaker policy or "pass" is raised to the operator's (as for jobs)
        forced = JobConfig(filter_policy=policy, filter_action=action)
        forced = JobConfig.from_args([getattr(forced, n) for n in JobConfig.arg_names()], enforce)
        policy, action = forced.filter_policy, forced.filter_action

    if "image" not in payload:
        raise _ApiError(422, "image is required (a base64 image, optionally a data: URL)", "image")
    raw = payload["image"]
    if not isinstance(raw, str):
        raise _ApiError(422, f"image must be a string (base64 image data), got {_kind(raw)}", "image")
    if raw[:5].lower() == "data:":
        header, sep, raw = raw.partition(",")
        if not sep or not header.lower().endswith(";base64"):
            raise _ApiError(422, "image: a data: URL must be base64 (data:image/png;base64,...)", "image")
    raw = "".join(raw.split())                          # line breaks of wrapped base64
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _ApiError(422, f"image is not valid base64 ({exc})", "image") from None
    if not data:
        raise _ApiError(422, "image is empty", "image")
    return data, policy, action


def _encode_frames(images: list, durations: list[int], loop) -> bytes:
    """PNG for one frame; an animated PNG (lossless, frame timing and loop kept) for several.
    Frames of different sizes (multi-page TIFF, MPO) are each placed at the top left of a black
    canvas the size of the largest: an animated PNG would otherwise show a smaller frame over
    the previous one, a picture nobody checked."""
    buf = io.BytesIO()
    if len(images) == 1:
        images[0].save(buf, "PNG")
    else:
        if len({im.size for im in images}) > 1:
            size = (max(im.width for im in images), max(im.height for im in images))
            padded = []
            for im in images:
                canvas = Image.new("RGB", size, (0, 0, 0))
                canvas.paste(im.convert("RGB"), (0, 0))
                padded.append(canvas)
            images = padded
        images[0].save(buf, "PNG", save_all=True, append_images=images[1:],
                       duration=[max(int(d), 0) for d in durations], loop=loop if isinstance(loop, int) else 0)
    return buf.getvalue()


def _filter_request(body: bytes) -> tuple[int, dict]:
    """The route's work (in a worker thread): parse, decode every frame within the core's
    budget, filter each frame, re-encode only the checked pixels. (status, JSON body)."""
    from safet2i.errors import ImageBudgetError, ImageInputError  # noqa: PLC0415
    from safet2i.images import ENV_MAX_FILE_PIXELS, MAX_FILE_PIXELS, FrameDecoder, env_budget  # noqa: PLC0415

    try:
        data, policy, action = _parse_request(body)
    except _ApiError as exc:
        return exc.status, exc.content()
    try:
        budget = env_budget(ENV_MAX_FILE_PIXELS, MAX_FILE_PIXELS)
    except ImageInputError as exc:              # the server's setting, not the request
        log.error("SafeT2I: /safet2i/filter: %s", exc)
        return 500, {"error": f"the server's decoding budget is misconfigured: {exc}"}
    outputs, frames, durations = [], [], []
    try:
        # Frame by frame: each decoded frame is filtered and dropped before the next one is
        # decoded; the budget (pixels per frame, and over all frames) is checked before decoding.
        with FrameDecoder(data, "request", max_file_pixels=budget) as dec:
            loop = dec.loop
            for i, (arr, duration) in enumerate(dec.frames()):
                o = filter_image(Image.fromarray(arr), policy, action)
                del arr
                if o.verdict.startswith("error"):
                    return 500, {"error": f"the filter could not run on frame {i}: {o.verdict}"}
                outputs.append(o.image)
                durations.append(duration)
                frames.append({"verdict": o.verdict, "cost": None if o.cost is None else float(o.cost),
                               "labels": list(o.labels), "width": o.image.width, "height": o.image.height,
                               **({"escalated": o.escalated} if o.escalated else {})})
    except ImageBudgetError as exc:
        return 413, {"error": str(exc), "field": "image"}
    except ImageInputError as exc:
        return 422, {"error": str(exc), "field": "image"}
    verdicts = [f["verdict"] for f in frames]
    verdict = next((v for v in ("blocked", "censored", "flagged") if v in verdicts), "safe")
    costs = [f["cost"] for f in frames if f["cost"] is not None]
    image = _encode_frames(outputs, durations, loop)
    return 200, {"image": base64.b64encode(image).decode(), "verdict": verdict,
                 "cost": max(costs) if costs else None,
                 "labels": sorted({label for f in frames for label in f["labels"]}),
                 "policy": policy, "action": action, "frames": frames}


def _on_app_started(demo, app):
    """Adds ``POST /safet2i/filter`` when the webui serves its API (:func:`api_served`), with
    the API's ``--api-auth`` check. Not served (and logged) when its limit or its check cannot
    be set up: an unbounded or unprotected route is never added."""
    if not api_served():
        log.info("SafeT2I: /safet2i/filter is not served: the webui runs without --api / --nowebui")
        return
    try:
        limit = api_max_body()
        extra = _api_auth()
        from fastapi import Request  # noqa: PLC0415  (the webui's own server)
        from fastapi.concurrency import run_in_threadpool  # noqa: PLC0415
        from fastapi.responses import JSONResponse  # noqa: PLC0415
    except Exception as exc:  # noqa: BLE001
        log.error("SafeT2I: /safet2i/filter is not served: %s", exc)
        return

    async def filter_route(request):
        """POST /safet2i/filter {"image": base64 image, "policy"?, "action"?} → the checked
        image (PNG; animated PNG for several frames) + verdict; errors as JSON 4xx/5xx."""
        try:
            body = await _read_body(request, limit)
        except _ApiError as exc:
            return JSONResponse(exc.content(), status_code=exc.status)
        try:
            status, content = await run_in_threadpool(_filter_request, body)
        except Exception as exc:  # noqa: BLE001 - a bug: no image, a JSON error
            log.error("SafeT2I: /safet2i/filter failed: %s", exc, exc_info=True)
            status, content = 500, {"error": f"the filter failed: {type(exc).__name__}: {exc}"}
        return JSONResponse(content, status_code=status)

    # Real classes, not the strings of ``from __future__ import annotations``: FastAPI resolves
    # string annotations in the module's globals, where these local imports are not.
    filter_route.__annotations__ = {"request": Request}
    app.add_api_route("/safet2i/filter", filter_route, methods=["POST"], **extra)


def api_credentials() -> dict[str, str]:
    """``--api-auth user:password,user2:password2`` as the webui's own API reads it."""
    from modules import shared  # noqa: PLC0415

    raw = getattr(shared.cmd_opts, "api_auth", None) or ""
    out = {}
    for item in raw.split(","):
        user, sep, password = item.partition(":")
        if sep:
            out[user] = password
    return out


def _api_auth() -> dict:
    """The same HTTP basic check the webui puts on its own API routes when ``--api-auth`` is
    set (``modules/api/api.py``: ``Api.add_api_route`` adds ``Depends(self.auth)``); routes
    added straight on the app in ``on_app_started`` do not get it by themselves."""
    credentials = api_credentials()
    if not credentials:
        return {}
    from secrets import compare_digest  # noqa: PLC0415

    from fastapi import Depends, HTTPException  # noqa: PLC0415  (the webui's own server)
    from fastapi.security import HTTPBasic, HTTPBasicCredentials  # noqa: PLC0415

    def auth(given=Depends(HTTPBasic())):  # noqa: B008 - FastAPI's idiom
        expected = credentials.get(given.username)
        if expected is not None and compare_digest(given.password.encode(), expected.encode()):
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})

    auth.__annotations__ = {"given": HTTPBasicCredentials}   # a real class (see filter_route)
    return {"dependencies": [Depends(auth)]}


def _guard_callback(fn):
    """CFG callbacks: an error outside the hook's own handling still fails the job (the webui
    would log it and sample on unguided)."""
    @functools.wraps(fn)
    def callback(params):
        try:
            return fn(params)
        except Exception as exc:  # noqa: BLE001
            job = current_job()
            if job is not None and job.error is None:
                job.error = f"{fn.__name__.strip('_')} failed: {type(exc).__name__}: {exc}"
                log.error("SafeT2I: %s; images of this job will be blocked", job.error, exc_info=exc)
    return callback


_on_cfg_denoiser = _guard_callback(_on_cfg_denoiser)
_on_cfg_denoised = _guard_callback(_on_cfg_denoised)
_REGISTERED = []


def _registered(fn, category: str) -> bool:
    cmap = getattr(script_callbacks, "callback_map", None)
    if isinstance(cmap, dict) and f"callbacks_{category}" in cmap:
        return any(getattr(c, "callback", None) is fn for c in cmap[f"callbacks_{category}"])
    return bool(_REGISTERED)


def _enforce_extras() -> None:
    """With ``--safet2i-enforce``: every image the Extras tab produces is checked after its
    scripts ran, also when our Extras script is switched off in the settings
    (``postprocessing_disable_in_extras``) or an earlier script added copies it marked
    ``disable_processing`` (which the webui's runner never passes to later scripts)."""
    if not enforcement():
        return
    try:
        from modules import scripts_postprocessing  # noqa: PLC0415
    except Exception:  # noqa: BLE001 - no Extras tab
        return
    runner = scripts_postprocessing.ScriptPostprocessingRunner
    if getattr(runner.run, "_safet2i", False):
        return
    original = runner.run

    def run(self, pp, args):
        original(self, pp, args)
        cfg = default_config(enforcement())
        for item in [pp, *(getattr(pp, "extra_images", None) or [])]:
            image = getattr(item, "image", None)
            if image is not None and not was_checked(image):
                item.image = filter_image(image, cfg.filter_policy, cfg.filter_action).image

    run._safet2i = True
    runner.run = run


def register_callbacks() -> None:
    """Idempotent; also after the webui cleared every callback: "Reload UI" re-runs the root
    ``scripts/safet2i.py`` (which calls this) while this module stays imported."""
    if _registered(_on_before_image_saved, "before_image_saved"):
        return
    script_callbacks.on_ui_settings(on_ui_settings)
    script_callbacks.on_cfg_denoiser(_on_cfg_denoiser_steering)   # first: the webui's own cond rows
    script_callbacks.on_cfg_denoiser(_on_cfg_denoiser)
    if hasattr(script_callbacks, "on_cfg_denoised"):
        script_callbacks.on_cfg_denoised(_on_cfg_denoised)
    script_callbacks.on_before_image_saved(_on_before_image_saved)
    script_callbacks.on_app_started(_on_app_started)
    guard_options_api()
    _enforce_extras()
    _REGISTERED.append(True)


register_callbacks()


# --------------------------------------------------------------------------- the script

HAS_AFTER_COMPOSITE = hasattr(scripts.Script, "postprocess_image_after_composite")


class SafeT2IScript(scripts.Script):
    sorting_priority = 99  # Forge/reForge: place in the UI only (hook order is the script load order)

    def title(self):
        return TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        import gradio as gr  # noqa: PLC0415

        from modules.ui_components import InputAccordion  # noqa: PLC0415

        tab = "img2img" if is_img2img else "txt2img"
        with gr.Group(elem_id=f"safet2i_{tab}"):
            with gr.Accordion("SafeT2I safety", open=False):
                with InputAccordion(False, label="Safety LoRA (model weights)") as lora_enabled:
                    with gr.Row():
                        lora_file = gr.Dropdown(lora_layer.list_choices(), value=lora_layer.NONE,
                                                label="Safety LoRA (models/Lora, models/safety_models)")
                        _refresh_button(lora_file, lambda: {"choices": lora_layer.list_choices()}, tab)
                    lora_strength = gr.Slider(0.05, LORA_STRENGTH[1], value=1.0, step=0.05, label="Strength")
                    lora_partial = gr.Checkbox(False, label="Allow partial coverage (load the matching weights only)")
                with InputAccordion(False, label="Safety weights (full UNet / text encoder, for this job)") \
                        as weights_enabled:
                    with gr.Row():
                        weights_file = gr.Dropdown(weights_layer.list_choices(), value=weights_layer.NONE,
                                                   label="Safety weights (models/safety_models: ESD-u, SafeGen, "
                                                         "AdvUnlearn)")
                        _refresh_button(weights_file, lambda: {"choices": weights_layer.list_choices()},
                                        f"{tab}_weights")
                    weights_part = gr.Dropdown(list(weights_layer.PARTS), value="auto",
                                               label="Replaces (auto: from the file's keys)")
                with InputAccordion(False, label="Concept steering (prompt, SAFREE-style)") as steering_enabled:
                    steer_concepts = gr.Dropdown(list(steering_presets()), value="nudity", label="Concepts")
                    steer_custom = gr.Textbox("", label="Custom concepts (one per line or comma-separated)", lines=2)
                    with gr.Row():
                        steer_alpha = gr.Number(0.01, label="Trigger margin α (0-10)")
                        steer_order = gr.Dropdown(list(STEERING_ORDERS), value="code", label="Projection order")
                        steer_svf = gr.Checkbox(True, label="Self-validating window (steer the first t' of 50 steps)")
                with InputAccordion(False, label="Safety guidance (sampler)") as guidance_enabled:
                    method = gr.Dropdown(list(GUIDANCE_METHODS), value=_opt("safet2i_guidance_method", "SLD"),
                                         label="Method")
                    preset = gr.Dropdown(list(SLD_PRESET_NAMES), value=_opt("safet2i_guidance_preset", "MEDIUM"),
                                         label="SLD preset")
                    concept = gr.Textbox(DEFAULT_CONCEPT, label="Unsafe concept", lines=2)
                with InputAccordion(bool(_opt("safet2i_filter_default", True)), label="Output filter") as filter_enabled:
                    policy = gr.Dropdown(list(POLICIES), value=_opt("safet2i_filter_policy", "strict-5"), label="Policy")
                    action = gr.Dropdown(list(FILTER_ACTIONS), value=_opt("safet2i_filter_action", "blur"),
                                         label="Action")
                    if enforcement():
                        gr.Markdown("The operator enforces the output filter on this server.")
        components = [guidance_enabled, method, preset, concept, filter_enabled, policy, action,
                      steering_enabled, steer_concepts, steer_custom, steer_alpha, steer_order, steer_svf,
                      lora_enabled, lora_file, lora_strength, lora_partial,
                      weights_enabled, weights_file, weights_part]
        names = JobConfig.arg_names()
        assert len(components) == len(names)
        self.infotext_fields = [(c, (lambda key: (lambda params: parse_infotext(params).get(key, None)))(n))
                                for c, n in zip(components, names)]
        self.paste_field_names = ["SafeT2I guidance", "SafeT2I concept", "SafeT2I filter", "SafeT2I steering",
                                  "SafeT2I steering concepts", "SafeT2I LoRA", "SafeT2I LoRA strength",
                                  "SafeT2I LoRA partial", "SafeT2I weights", "SafeT2I weights part"]
        return components

    # -- lifecycle -------------------------------------------------------------
    def setup(self, p, *args):
        try:
            job = Job(JobConfig.from_args(args, enforcement()), p)
        except Exception as exc:  # noqa: BLE001 - bad arguments: fail closed
            job = Job(_fallback_config(), p, error=f"bad SafeT2I arguments: {exc}")
            log.error("SafeT2I: %s", job.error)
        p._safet2i_job = job
        self._activate(job)
        original_close = p.close

        def close(*a, **k):
            self._finish(p)
            return original_close(*a, **k)

        p.close = close

    def _activate(self, job: Job) -> None:
        """This job is the one being generated: callbacks and previews act for it. Called at
        ``setup`` and again at every ``before_process`` (scripts such as X/Y/Z plot run
        ``process_images`` on copies of ``p``, which share the job)."""
        for stale in [j for j in _ACTIVE if j is not job]:    # left behind by a job that raised
            self._finish_job(stale)
        if job not in _ACTIVE:
            _ACTIVE.append(job)
        if not job.restore:
            self._wrap_previews(job)

    def _wrap_previews(self, job: Job) -> None:
        state = getattr(shared, "state", None)
        assign = getattr(state, "assign_current_image", None)
        cfg = job.cfg
        layers = cfg.guidance_active or cfg.steering_enabled or cfg.lora_enabled or cfg.weights_enabled
        if not callable(assign) or not (cfg.filter_enabled or cfg.enforced or layers or job.failed):
            return

        own = "assign_current_image" in vars(state)
        done = []

        def safe_assign(image, *a, **k):
            try:
                if image is None or done:       # done: another wrapper kept us after the job
                    pass
                elif job.failed or _opt("safet2i_previews", "filter") != "filter":
                    image = blocked_image(image.size, "preview")
                elif cfg.filter_enabled:
                    image = filter_image(image, cfg.filter_policy, cfg.filter_action).image
            except Exception:  # noqa: BLE001 - no unchecked preview; the webui cannot show None
                image = blocked_image(getattr(image, "size", (64, 64)), "preview")
            return assign(image, *a, **k)

        def restore():
            done.append(True)
            if vars(state).get("assign_current_image") is safe_assign:
                if own:
                    state.assign_current_image = assign
                else:
                    del state.assign_current_image

        state.assign_current_image = safe_assign
        job.restore.append(restore)

    def _finish(self, p) -> None:
        job = _job(p)
        if job is not None:
            self._finish_job(job)

    def _finish_job(self, job: Job) -> None:
        for undo in reversed(job.restore):
            undo()
        job.restore.clear()
        if job in _ACTIVE:
            _ACTIVE.remove(job)

    def before_process(self, p, *args):
        job = _job(p)
        if job is not None:
            self._activate(job)

    def process(self, p, *args):
        job = _job(p)
        if job is None:
            return
        p.extra_generation_params.update(job.cfg.infotext())
        modified = weights_layer.modified(p.sd_model)
        if modified and not job.failed:
            job.error = modified
            log.error("SafeT2I: %s; images of this job will be blocked", job.error)
        if job.cfg.weights_enabled and not job.failed:
            self._apply_weights(p, job)
        if job.cfg.lora_enabled and not job.failed:
            try:
                refiner = _other_checkpoint(p, hires=False)
                if refiner:
                    raise lora_layer.LoraLayerError(f"the job uses {refiner}: the webui switches to it mid-sampling "
                                                    "and the safety LoRA is not applied to it (no refiner)")
                job.lora = lora_layer.prepare(job.cfg.lora_file, p.sd_model, job.cfg.lora_strength,
                                              job.cfg.lora_allow_partial)
                p.extra_generation_params["SafeT2I LoRA coverage"] = job.lora.infotext()
            except Exception as exc:  # noqa: BLE001
                job.error = f"safety LoRA: {exc}"
                log.error("SafeT2I: %s; images of this job will be blocked", job.error)

    def _apply_weights(self, p, job: Job) -> None:
        """Full safety weights into the loaded model for this job; the originals come back in
        ``job.restore`` (postprocess, or the clean-up of a failed / interrupted job). A copy of
        ``p`` (X/Y/Z plot) comes here after the previous copy's clean-up restored the model."""
        try:
            other = _other_checkpoint(p)
            if other:
                raise weights_layer.WeightsLayerError(
                    f"the job uses {other}; the safety weights go into the loaded checkpoint only and that pass would "
                    "run without them (choose 'Use same checkpoint' / no refiner)")
            if job.weights is not None:               # an earlier copy of p: its model back first
                job.weights.restore()
            sw = weights_layer.prepare(job.cfg.weights_file, p.sd_model, job.cfg.weights_part)
            job.weights = sw

            def undo(sw=sw):
                try:
                    sw.restore()
                except Exception as exc:  # noqa: BLE001 - recorded: later jobs on this model are blocked
                    log.error("SafeT2I: %s", exc)
                finally:
                    if sw.part == "text_encoder":     # conds of this job are the safety encoder's
                        weights_layer.clear_cond_caches(p)

            job.restore.append(undo)
            weights_layer.apply(sw)
            if sw.part == "text_encoder":             # conds cached before are the original encoder's
                weights_layer.clear_cond_caches(p)
            p.extra_generation_params["SafeT2I weights"] = sw.infotext()
        except Exception as exc:  # noqa: BLE001
            job.error = f"safety weights: {exc}"
            log.error("SafeT2I: %s; images of this job will be blocked", job.error)

    def before_process_batch(self, p, *args, **kwargs):
        """Before the webui parses the batch's extra-network tags (``kwargs['prompts']`` is
        ``p.prompts``; edits in place are what the webui then parses)."""
        job = _job(p)
        if job is None or job.lora is None or job.failed:
            return
        try:
            lora_layer.add_tag(kwargs.get("prompts", p.prompts), job.lora)
        except Exception as exc:  # noqa: BLE001
            job.error = f"safety LoRA: {exc}"
            log.error("SafeT2I: %s; images of this job will be blocked", job.error)

    def after_extra_networks_activate(self, p, *args, **kwargs):
        """A1111 ≥ 1.7 / Forge, after ``extra_networks.activate`` (first pass and hires pass):
        the networks are loaded now, so prove ours is, with every target weight."""
        job = _job(p)
        if job is None or job.lora is None or job.failed:
            return
        try:
            loaded = lora_layer.verify_loaded(p, job.lora)
            p.extra_generation_params["SafeT2I LoRA coverage"] = f"{job.lora.infotext()} loaded {loaded}"
        except Exception as exc:  # noqa: BLE001
            job.error = f"safety LoRA: {exc}"
            log.error("SafeT2I: %s; images of this job will be blocked", job.error)

    def _layers_batch(self, p, job: Job) -> None:
        """``process_batch`` part of the LoRA and steering layers (after extra networks are
        active, before ``p.setup_conds`` encodes the prompts)."""
        if job.lora is not None:
            try:
                if job.lora.pending:
                    raise lora_layer.LoraLayerError("the webui did not activate extra networks for this batch "
                                                    "(disabled?); the safety LoRA is not applied")
                lora_layer.add_hires(p, job.lora)
            except Exception as exc:  # noqa: BLE001
                job.error = f"safety LoRA: {exc}"
                log.error("SafeT2I: %s; images of this job will be blocked", job.error)
                return
        if not job.cfg.steering_enabled:
            return
        try:
            if job.steering is None:
                job.steering = SteeringHook.for_model(
                    p.sd_model, job.cfg.steering_concepts, job.cfg.steering_custom, alpha=job.cfg.steering_alpha,
                    order=job.cfg.steering_order, self_validating=job.cfg.steering_self_validating)
            hires = list(getattr(p, "hr_prompts", None) or []) if getattr(p, "enable_hr", False) else []
            steps = [p.steps, getattr(p, "hr_second_pass_steps", 0) or p.steps]
            job.steering_texts = candidate_texts(list(p.prompts) + hires, steps)
            job.steering.prepare(job.steering_texts)
            p.extra_generation_params["SafeT2I steering report"] = job.steering.report(job.steering_texts)
        except Exception as exc:  # noqa: BLE001
            job.error = f"steering: {exc}"
            log.error("SafeT2I: %s; images of this job will be blocked", job.error)

    def process_batch(self, p, *args, **kwargs):
        job = _job(p)
        if job is not None and not job.failed and (job.weights is not None or job.lora is not None):
            replaced = _unet_replaced()       # after sd_unet.apply_unet() (it runs after process)
            if replaced:
                job.error = f"model layer: {replaced}"
                log.error("SafeT2I: %s; images of this job will be blocked", job.error)
        if job is not None:
            job.check_weights(p, "before sampling", full=False)
        if job is not None and not job.failed and (job.lora is not None or job.cfg.steering_enabled):
            self._layers_batch(p, job)
        if job is None or not job.cfg.guidance_active or job.failed:
            return
        try:
            unsupported = _guidance_model_error(p.sd_model)
            if unsupported:
                raise RuntimeError(unsupported)
            concept = _encode_concept(p, job.cfg.guidance_concept)
            make_method(job.cfg.guidance_method, job.cfg.guidance_preset)   # refuses unavailable methods now
            job.guided_mark = job.guided_steps()
            if hasattr(p.sd_model, "forge_objects"):
                job.concept = concept       # Forge/reForge: patched in process_before_every_sampling
            else:
                job.hook = GuidanceHook(make_method(job.cfg.guidance_method, job.cfg.guidance_preset), concept,
                                        eps_prediction=_is_eps_sampler(p))
                job.runs.append(job.hook)
        except Exception as exc:  # noqa: BLE001
            job.error = f"guidance could not start: {exc}"
            log.error("SafeT2I: %s; images of this job will be blocked", job.error)

    def process_before_every_sampling(self, p, *args, **kwargs):
        """Forge / reForge (and called, unused, by A1111 1.10): right before each sampling pass,
        after the webui rebuilt ``forge_objects``; the guidance goes into a UNet clone."""
        job = _job(p)
        if job is not None:
            job.check_weights(p, "before the hires pass" if getattr(p, "is_hr_pass", False) else "before sampling",
                              full=False)
        if job is not None and job.lora is not None and not job.failed:
            self._lora_before_sampling(p, job)
        if job is None or not job.cfg.guidance_active or job.failed or job.concept is None:
            return
        if not hasattr(p.sd_model, "forge_objects"):
            return
        try:
            run = forge_guidance.patch_unet(p, make_method(job.cfg.guidance_method, job.cfg.guidance_preset),
                                            job.concept, job)
            if run is not None:
                job.runs.append(run)
        except Exception as exc:  # noqa: BLE001
            job.error = f"guidance could not start: {exc}"
            log.error("SafeT2I: %s; images of this job will be blocked", job.error)

    @staticmethod
    def _lora_before_sampling(p, job: Job) -> None:
        """Forge: the conds of the pass are encoded, so the CLIP patcher was loaded: our LoRA
        must be merged in it now; the UNet patcher is recorded and checked after its pass."""
        try:
            patchers = lora_layer.forge_patchers(p.sd_model)
            if "clip" in patchers:
                lora_layer.check_merged([patchers["clip"]], job.lora, "text encoder")
            if "unet" in patchers:
                job.lora.sampled.append(patchers["unet"])
        except Exception as exc:  # noqa: BLE001
            job.error = f"safety LoRA: {exc}"
            log.error("SafeT2I: %s; images of this job will be blocked", job.error)

    @staticmethod
    def _lora_after_sampling(job: Job, where: str) -> None:
        if job.lora is None or job.failed:
            return
        try:
            sampled, job.lora.sampled = job.lora.sampled, []
            lora_layer.check_merged(sampled, job.lora, f"UNet of the {where}")
        except Exception as exc:  # noqa: BLE001
            job.error = f"safety LoRA: {exc}"
            log.error("SafeT2I: %s; images of this job will be blocked", job.error)

    def before_hr(self, p, *args):
        job = _job(p)
        if job is not None and getattr(p, "firstpass_image", None) is None:
            job.check_layers("first pass", p)
            self._lora_after_sampling(job, "first pass")

    def postprocess_batch(self, p, *args, **kwargs):
        job = _job(p)
        if job is None:
            return
        where = "hires pass" if getattr(p, "enable_hr", False) else "sampling pass"
        job.check_layers(where, p)
        self._lora_after_sampling(job, where)
        if job.lora is not None and not job.failed:
            try:
                lora_layer.check_verified(job.lora, where)
            except Exception as exc:  # noqa: BLE001
                job.error = f"safety LoRA: {exc}"
                log.error("SafeT2I: %s; images of this job will be blocked", job.error)

    # -- the output filter -----------------------------------------------------
    def _filter(self, p, pp) -> None:
        job = _job(p)
        if job is None:
            return
        index = getattr(pp, "index", len(job.verdicts))
        try:
            if job.failed:
                # The job failed (guidance, steering, LoRA, a hook): the image is replaced whatever
                # a detector would say of it ("placeholder" would only replace unsafe images).
                pp.image = blocked_image(pp.image.size, "blocked")
                text = f"blocked ({job.failed})"
            elif job.cfg.filter_enabled:
                o = filter_image(pp.image, job.cfg.filter_policy, job.cfg.filter_action)
                pp.image = o.image
                text = verdict_text(o)
            else:
                return
        except Exception as exc:  # noqa: BLE001
            pp.image = blocked_image(getattr(pp.image, "size", (64, 64)), "error")
            text = f"blocked (error: {exc})"
        job.verdicts[index] = text
        p.extra_generation_params["SafeT2I verdict"] = text   # infotext of the image saved next

    def postprocess_image(self, p, pp, *args):
        if not HAS_AFTER_COMPOSITE:
            self._filter(p, pp)

    def postprocess_image_after_composite(self, p, pp, *args):
        self._filter(p, pp)

    def postprocess(self, p, processed, *args):
        """Last hook: every image the job returns (gallery, API) must have been checked. An image
        another extension replaced after our filter, a grid, or on A1111 1.7 the composite of
        "inpaint only masked" (the filter saw the crop) is checked here."""
        job = _job(p)
        try:
            images = getattr(processed, "images", None)
            if job is not None and images and (job.cfg.filter_enabled or job.failed):
                for i, image in enumerate(images):
                    if image is None or not hasattr(image, "size") or was_checked(image):
                        continue
                    if job.failed:
                        new = blocked_image(image.size, "blocked")
                    else:
                        new = filter_image(image, job.cfg.filter_policy, job.cfg.filter_action).image
                    if "parameters" in getattr(image, "info", {}):
                        new.info["parameters"] = image.info["parameters"]
                    images[i] = new
        except Exception as exc:  # noqa: BLE001
            log.error("SafeT2I: final check failed, images replaced by placeholders: %s", exc)
            if job is not None and job.error is None:
                job.error = f"final check failed: {type(exc).__name__}: {exc}"
            for i, image in enumerate(getattr(processed, "images", None) or []):
                processed.images[i] = blocked_image(getattr(image, "size", (64, 64)), "error")
        finally:
            self._finish(p)


# --------------------------------------------------------------------------- fail closed

#: Script hooks the webui calls and whose exceptions it only logs.
HOOKS = ("setup", "before_process", "process", "before_process_batch", "after_extra_networks_activate",
         "process_batch", "process_before_every_sampling", "before_hr", "postprocess_batch",
         "postprocess_batch_list", "postprocess_image", "postprocess_image_after_composite", "postprocess")


def _fallback_config() -> JobConfig:
    """Defaults (filter on) for a job whose own arguments could not be used; built without
    ``from_args`` in case that is what failed."""
    cfg = JobConfig()
    try:
        enforce = enforcement()
    except Exception:  # noqa: BLE001
        enforce = {"policy": "strict-5", "action": "placeholder"}
    if enforce:
        cfg.enforced, cfg.filter_enabled = True, True
        cfg.filter_policy, cfg.filter_action = enforce["policy"], enforce["action"]
    return cfg


def _hook_failed(script, name: str, p, args, exc: Exception) -> None:
    message = f"{name} failed: {type(exc).__name__}: {exc}"
    log.error("SafeT2I: %s; images of this job will be blocked", message, exc_info=exc)
    job = _job(p)
    if job is None:                       # setup itself failed: a failed job in its place
        job = Job(_fallback_config(), p)
        try:
            p._safet2i_job = job
        except Exception:  # noqa: BLE001
            pass
        _ACTIVE.append(job)
    if job.error is None:
        job.error = message
    if name in ("postprocess_image", "postprocess_image_after_composite") and args:
        pp = args[0]
        pp.image = blocked_image(getattr(pp.image, "size", (64, 64)), "error")
        p.extra_generation_params["SafeT2I verdict"] = f"blocked ({message})"
    elif name == "postprocess" and args:
        processed = args[0]
        for i, image in enumerate(getattr(processed, "images", None) or []):
            processed.images[i] = blocked_image(getattr(image, "size", (64, 64)), "error")
        script._finish(p)


def _fail_closed(name: str, fn):
    @functools.wraps(fn)
    def hook(self, p, *args, **kwargs):
        try:
            return fn(self, p, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the webui would log it and carry on unprotected
            _hook_failed(self, name, p, args, exc)
            return None
    return hook


for _name in HOOKS:
    if _name in SafeT2IScript.__dict__:
        setattr(SafeT2IScript, _name, _fail_closed(_name, SafeT2IScript.__dict__[_name]))
