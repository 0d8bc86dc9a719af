"""Operator enforcement in ComfyUI (issue 19): every image the server emits is filtered.

Switched on by the operator with the environment variable ``SAFET2I_ENFORCE`` (a policy
preset name or a TOML file; see ``safet2i.enforce``), read once when the pack loads. When the
variable is unset nothing here is installed: ComfyUI runs exactly as without enforcement.

When it is set, :func:`install_from_env` installs three hooks, each at a single choke point
of ComfyUI's server (no list of known nodes):

1. **Execution** -- ``execution.get_input_data`` is wrapped. ``execution.execute`` calls it for
   every node, just before the node runs, with the node's resolved inputs. For every *output*
   node (``OUTPUT_NODE`` true: V1 classes and V3 ``io.ComfyNode`` schemas with
   ``is_output_node`` alike), every IMAGE value (a ``[B,H,W,C]`` tensor) is replaced by
   ``Enforcer.enforce(...)``'s result and every VIDEO value by a video rebuilt from its
   filtered frames (frame rate, audio and metadata kept; an unchanged clip is passed on as it
   is). ``EnforcementBlocked`` / ``EnforcementError`` raised there fail that node before it
   runs, so nothing is written to output/ or temp/, and ComfyUI records the error, with its
   message, in ``/history`` and sends it to the UI. Nodes on the operator's deny-list and, when
   the enforcing filter failed to load, *every* node are refused here too (defence in depth).
2. **Queue time** -- ``execution.validate_prompt`` (what ``POST /prompt`` calls before queueing)
   is wrapped: a prompt naming a deny-listed node, or any prompt while the enforcing filter
   could not load, is refused with HTTP 400 and a clear message. (``add_on_prompt_handler``
   cannot refuse a prompt: ComfyUI logs and swallows a handler's exception.)
3. **Live previews** -- ``PromptServer.send_bytes``, through which every binary websocket
   message goes (latent previews from the samplers' callbacks, ``ProgressBar`` previews and any
   pack's ``send_image``), is wrapped on the server instance. ``previews="off"`` (the default)
   drops every preview image and also sets ComfyUI's ``--preview-method`` to ``none`` so no
   preview is even decoded; ``previews="blur"`` sends each preview as a 8x8-pixel mosaic scaled
   back up (colour layout only). Any other value fails closed (treated as ``off``).

Our own filter nodes (``filter_nodes``) ask :func:`active` for the enforcer: they run with the
operator's policy and action when the workflow asks for weaker ones, and mark the pixels they
output as checked, so the enforcement at the output node reuses the verdict.
"""

from __future__ import annotations

import io as _bytesio
import json
import logging
import os
import struct

log = logging.getLogger("safet2i")

ENV = "SAFET2I_ENFORCE"

# Binary websocket event types (ComfyUI's protocol.BinaryEventTypes).
_PREVIEW_IMAGE, _PREVIEW_IMAGE_WITH_METADATA = 1, 4


class _State:
    def __init__(self, enforcer=None, config=None, error: str | None = None):
        self.enforcer = enforcer
        self.config = config
        self.error = error                       # set: enforcement on but broken -> refuse everything
        self.deny = set(getattr(config, "deny_nodes", ()) or ())
        self.previews = str(getattr(config, "previews", "off") or "off").lower()
        self.installed = []                      # (object, attribute, original) for uninstall()


_STATE: _State | None = None


def active():
    """The operator's :class:`~safet2i.enforce.Enforcer` when enforcement is on and loaded, else None."""
    st = _STATE
    return st.enforcer if st is not None and st.error is None else None


# -- installation ---------------------------------------------------------------------------

def install_from_env(environ=None) -> bool:
    """Read ``SAFET2I_ENFORCE`` and install the hooks. With the variable set, a configuration or
    model failure leaves enforcement *on* and refusing every prompt; only hooks that cannot be
    installed stop the server (``SystemExit``). Returns True when on."""
    global _STATE
    env = os.environ if environ is None else environ
    if not str(env.get(ENV, "") or "").strip():
        return False                             # off: nothing is patched at all
    if _STATE is not None:
        return True                              # already installed (pack imported twice)
    config, enforcer, error = None, None, None
    try:
        import functools  # noqa: PLC0415

        from ..safet2i.enforce import Enforcer, config_from_env, default_filter  # noqa: PLC0415
        from .paths import comfy_cpu_only  # noqa: PLC0415

        config = config_from_env(env)
        if config is None:
            raise ValueError(f"{ENV}={env.get(ENV)!r} did not give an enforcement config")
        # the providers the loader node uses too, so a workflow's model is the enforcer's (one load)
        enforcer = Enforcer(config, filter_factory=functools.partial(default_filter, cpu_only=comfy_cpu_only()))
        enforcer.load()
    except Exception as exc:  # noqa: BLE001 - fail closed, whatever went wrong
        error = (f"SafeT2I enforcement is on ({ENV}={env.get(ENV)!r}) but its filter could not be loaded: "
                 f"{type(exc).__name__}: {exc}. Every prompt is refused until the operator fixes the "
                 f"configuration and restarts ComfyUI.")
        enforcer = None
    _STATE = _State(enforcer, config, error)
    try:
        _install_hooks(_STATE)
    except Exception as exc:  # noqa: BLE001
        # The execution hook is the first thing installed; if even that failed there is no safe
        # way to run: stop the server rather than emit unfiltered images.
        log.critical("SafeT2I enforcement could not hook into ComfyUI (%s); refusing to run.", exc)
        raise SystemExit(f"SafeT2I enforcement could not be installed: {exc}") from exc
    if error:
        log.error("SafeT2I enforcement FAILED to load; every prompt is refused. %s", error)
    else:
        try:
            what = enforcer.describe()
        except Exception as exc:  # noqa: BLE001
            what = f"SafeT2I enforcement ON (describe failed: {exc})"
        log.warning("%s", what)
    return True


def _patch(st: _State, obj, name: str, new) -> None:
    st.installed.append((obj, name, getattr(obj, name)))
    setattr(obj, name, new)


def _install_hooks(st: _State) -> None:
    import execution  # noqa: PLC0415 - ComfyUI's module

    orig_get_input_data = execution.get_input_data
    orig_validate = execution.validate_prompt

    def get_input_data(inputs, class_def, unique_id, outputs=None, dynprompt=None, extra_data={}):  # noqa: B006 - same signature
        result = orig_get_input_data(inputs, class_def, unique_id, outputs, dynprompt, extra_data)
        if outputs is None:
            return result      # validation / IS_CHANGED: links are not resolved, nothing runs on this data
        _enforce_node(st, result[0], class_def, unique_id, dynprompt, extra_data)
        return result

    async def validate_prompt(prompt_id, prompt, partial_execution_list, *args, **kwargs):
        refused = _refuse_prompt(st, prompt)
        if refused is not None:
            return refused
        return await orig_validate(prompt_id, prompt, partial_execution_list, *args, **kwargs)

    get_input_data.__wrapped__ = orig_get_input_data
    validate_prompt.__wrapped__ = orig_validate
    _patch(st, execution, "get_input_data", get_input_data)
    _patch(st, execution, "validate_prompt", validate_prompt)
    _install_preview_hook(st)


def uninstall() -> None:
    """Undo every patch (tests only)."""
    global _STATE
    st, _STATE = _STATE, None
    for obj, name, orig in reversed(st.installed if st else []):
        setattr(obj, name, orig)


# -- queue time -----------------------------------------------------------------------------

def _refuse_prompt(st: _State, prompt) -> tuple | None:
    if st.error:
        log.error("SafeT2I enforcement: prompt refused: %s", st.error)
        return (False, {"type": "safet2i_enforcement", "message": st.error, "details": st.error,
                        "extra_info": {}}, [], {})
    if not st.deny or not isinstance(prompt, dict):
        return None
    denied = {nid: n.get("class_type") for nid, n in prompt.items()
              if isinstance(n, dict) and n.get("class_type") in st.deny}
    if not denied:
        return None
    msg = ("SafeT2I enforcement: the operator does not allow these nodes on this server (their output "
           "cannot be filtered): " + ", ".join(f"#{k} {v}" for k, v in sorted(denied.items())))
    log.warning("%s; prompt refused", msg)
    node_errors = {nid: {"errors": [{"type": "safet2i_denied_node", "message": msg, "details": ct,
                                     "extra_info": {}}],
                         "dependent_outputs": [], "class_type": ct} for nid, ct in denied.items()}
    return (False, {"type": "safet2i_enforcement", "message": msg, "details": ", ".join(sorted(set(denied.values()))),
                    "extra_info": {}}, [], node_errors)


# -- execution ------------------------------------------------------------------------------

def _is_output_node(class_def) -> bool:
    try:
        return getattr(class_def, "OUTPUT_NODE", False) is True
    except Exception:  # noqa: BLE001 - a V3 schema that cannot be built: treat as output (check it)
        return True


def _class_type(class_def, unique_id, dynprompt) -> str:
    try:
        return dynprompt.get_node(unique_id)["class_type"]
    except Exception:  # noqa: BLE001
        import nodes  # noqa: PLC0415

        for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
            if cls is class_def:
                return name
        return getattr(class_def, "__name__", "?")


def _declared_types(class_def) -> dict:
    try:
        spec = class_def.INPUT_TYPES()
    except Exception:  # noqa: BLE001
        return {}
    out = {}
    for group in ("required", "optional"):
        for name, info in (spec.get(group) or {}).items():
            t = info[0] if isinstance(info, (tuple, list)) and info else info
            out[name] = t if isinstance(t, str) else ""
    return out


def _enforce_node(st: _State, input_data_all: dict, class_def, unique_id, dynprompt, extra_data) -> None:
    from ..safet2i.enforce import EnforcementError  # noqa: PLC0415

    class_type = _class_type(class_def, unique_id, dynprompt)
    if st.error:
        raise EnforcementError(st.error)
    if class_type in st.deny:
        raise EnforcementError(f"SafeT2I enforcement: node {class_type} (#{unique_id}) is not allowed on this "
                               "server by the operator (its output cannot be filtered).")
    if not _is_output_node(class_def):
        return
    prompt_id = None
    try:
        from server import PromptServer  # noqa: PLC0415 - the prompt worker records the running prompt here

        prompt_id = getattr(PromptServer.instance, "last_prompt_id", None)
    except Exception:  # noqa: BLE001
        pass
    declared = _declared_types(class_def)
    for name, values in list(input_data_all.items()):
        if not isinstance(values, list):
            continue
        typ = declared.get(name, "")
        new = [_enforce_value(st, v, typ, class_type, unique_id, prompt_id, name) for v in values]
        if any(a is not b for a, b in zip(new, values)):
            input_data_all[name] = new   # a new list: the upstream node's cached output is untouched


def _is_video(value) -> bool:
    try:
        from comfy_api.latest import Input  # noqa: PLC0415

        return isinstance(value, Input.Video)
    except Exception:  # noqa: BLE001
        return False


def _enforce_value(st: _State, value, declared: str, class_type: str, unique_id, prompt_id, name: str):
    import torch  # noqa: PLC0415

    from ..safet2i.enforce import EnforcementError  # noqa: PLC0415

    types = str(declared).upper().split(",")
    wants_image, wants_mask = "IMAGE" in types, "MASK" in types
    if isinstance(value, torch.Tensor):
        if value.ndim == 4 and value.shape[-1] in (1, 3, 4):
            return st.enforcer.enforce(value, node=class_type, node_id=str(unique_id), prompt_id=prompt_id)
        if value.is_floating_point() and (value.ndim == 3 or (wants_mask and value.ndim == 2)):
            # A MASK ([B, H, W], or [H, W]) reaching an output node (MaskPreview saves it as a
            # picture): checked as a grey image, censored as one.
            grey = value.reshape(-1, *value.shape[-2:]).unsqueeze(-1)
            out = st.enforcer.enforce(grey, node=class_type, node_id=str(unique_id), prompt_id=prompt_id)
            return value if out is grey else out.squeeze(-1).reshape(value.shape)
        if wants_image or wants_mask:
            raise EnforcementError(f"SafeT2I enforcement: input '{name}' of {class_type} (#{unique_id}) is an "
                                   f"{'IMAGE' if wants_image else 'MASK'} of shape {tuple(value.shape)}, which "
                                   "cannot be checked; refused.")
        return value
    if _is_video(value):
        return _enforce_video(st, value, class_type, unique_id, prompt_id)
    return value


def _enforce_video(st: _State, video, class_type: str, unique_id, prompt_id):
    from comfy_api.latest import InputImpl, Types  # noqa: PLC0415

    comps = video.get_components()
    frames = st.enforcer.enforce(comps.images, node=class_type, node_id=str(unique_id), prompt_id=prompt_id)
    if frames is comps.images and isinstance(video, InputImpl.VideoFromComponents):
        return video            # every frame passed unchanged: keep the clip (no re-encode)
    # A file-backed clip is rebuilt from its checked frames even when none changed: saving the
    # file as it is would also copy any stream get_components() did not decode (a second video
    # stream, subtitles).
    kwargs = {"images": frames, "audio": comps.audio, "frame_rate": comps.frame_rate}
    if getattr(comps, "metadata", None) is not None:
        kwargs["metadata"] = comps.metadata
    return InputImpl.VideoFromComponents(Types.VideoComponents(**kwargs))


# -- live previews --------------------------------------------------------------------------

def _install_preview_hook(st: _State) -> None:
    from server import PromptServer  # noqa: PLC0415

    server = getattr(PromptServer, "instance", None)
    if st.previews != "blur":
        try:
            from comfy.cli_args import LatentPreviewMethod, args  # noqa: PLC0415

            _patch(st, args, "preview_method", LatentPreviewMethod.NoPreviews)
        except Exception as exc:  # noqa: BLE001 - the send hook below still drops them
            log.warning("SafeT2I enforcement: could not switch ComfyUI's preview method off: %s", exc)
    if server is None:
        # No server (ComfyUI imported as a library): nothing is sent over a websocket.
        return
    orig = server.send_bytes

    async def send_bytes(event, data, sid=None):
        if event in (_PREVIEW_IMAGE, _PREVIEW_IMAGE_WITH_METADATA):
            data = _censor_preview(st, event, data)
            if data is None:
                return
        return await orig(event, data, sid)

    send_bytes.__wrapped__ = orig
    _patch(st, server, "send_bytes", send_bytes)


def _censor_preview(st: _State, event: int, data):
    """``None`` (drop) or the message with its image replaced by a coarse mosaic."""
    if st.previews != "blur":
        return None
    try:
        data = bytes(data)
        if event == _PREVIEW_IMAGE:
            head, body, meta = data[:4], data[4:], None
        else:
            (n,) = struct.unpack(">I", data[:4])
            meta = json.loads(data[4:4 + n])
            head, body = None, data[4 + n:]
        mosaic = _mosaic_jpeg(body)
        if meta is None:
            return struct.pack(">I", 1) + mosaic if head is not None else None
        meta["image_type"] = "image/jpeg"
        mj = json.dumps(meta).encode()
        return struct.pack(">I", len(mj)) + mj + mosaic
    except Exception:  # noqa: BLE001 - cannot censor it: drop it
        return None


def _mosaic_jpeg(body: bytes) -> bytes:
    """The preview image ``body`` as the core's mosaic (:func:`safet2i.enforce.censor_preview`), JPEG."""
    from PIL import Image  # noqa: PLC0415

    from ..safet2i.enforce import censor_preview  # noqa: PLC0415

    out = _bytesio.BytesIO()
    censor_preview(Image.open(_bytesio.BytesIO(body)).convert("RGB")).save(out, format="JPEG", quality=80)
    return out.getvalue()
