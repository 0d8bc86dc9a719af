"""A real ComfyUI server (CPU) with this pack installed, for end-to-end tests.

Runs only when ``COMFYUI_PATH`` (a ComfyUI checkout) and ``COMFYUI_PYTHON`` (an
interpreter with ComfyUI's and this pack's dependencies) are set; skipped otherwise.
Everything the server writes goes to a temporary folder; it listens on loopback only.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACK_NAME = "safet2i"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, base: Path, port: int, proc: subprocess.Popen, log: Path):
        self.base, self.port, self.proc, self.log = base, port, proc, log
        self.url = f"http://127.0.0.1:{port}"
        self.input_dir = base / "input"
        self.output_dir = base / "output"

    # -- HTTP ---------------------------------------------------------------
    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post_prompt(self, prompt: dict) -> tuple[int, dict]:
        body = json.dumps({"prompt": prompt, "client_id": uuid.uuid4().hex}).encode()
        req = urllib.request.Request(self.url + "/prompt", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def run(self, prompt: dict, timeout: float = 180.0) -> dict:
        """Queue ``prompt`` and return its /history entry once finished (success or error)."""
        code, resp = self.post_prompt(prompt)
        assert code == 200, f"prompt rejected ({code}): {json.dumps(resp)[:2000]}"
        pid = resp["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{pid}")
            if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
                entry = hist[pid]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(0.2)
        raise TimeoutError(f"prompt {pid} did not finish in {timeout}s; log tail:\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _comfy_env() -> tuple[str, str]:
    path, python = os.environ.get("COMFYUI_PATH"), os.environ.get("COMFYUI_PYTHON")
    if not path or not python:
        pytest.skip("real-ComfyUI tests need COMFYUI_PATH (a ComfyUI checkout) and COMFYUI_PYTHON (its interpreter)")
    if not (Path(path) / "main.py").is_file():
        pytest.skip(f"COMFYUI_PATH={path} has no main.py")
    return path, python


@contextlib.contextmanager
def start_server(base: Path, extra_env: dict | None = None, extra_args: list[str] | tuple[str, ...] | None = None):
    """Start ComfyUI on a free loopback port with this pack in a fresh folder tree.

    ``extra_env`` is added to the server's environment, ``extra_args`` to its command line
    (e.g. ``["--preview-method", "latent2rgb"]``)."""
    path, python = _comfy_env()
    for d in ("custom_nodes", "checkpoints", "loras", "input", "output", "user", "frontend", "models", "safety_models",
              "diffusion_models", "vae", "text_encoders"):
        (base / d).mkdir(parents=True)
    (base / "custom_nodes" / PACK_NAME).symlink_to(REPO, target_is_directory=True)
    (base / "custom_nodes" / "safet2i_test_counter.py").write_text(COUNTER_PACK)
    for pack in Path(__file__).parent.glob("comfy_pack_*.py"):   # test-only node packs
        (base / "custom_nodes" / f"safet2i_test_{pack.name}").write_text(pack.read_text())
    (base / "extra_model_paths.yaml").write_text(
        "safet2i_test:\n"
        f"  base_path: {base}\n"
        f"  custom_nodes: {base / 'custom_nodes'}\n"
        f"  checkpoints: {base / 'checkpoints'}\n"
        f"  loras: {base / 'loras'}\n"
        f"  safet2i_filters: {base / 'models'}\n"
        f"  safety_models: {base / 'safety_models'}\n"
        f"  diffusion_models: {base / 'diffusion_models'}\n"
        f"  vae: {base / 'vae'}\n"
        f"  text_encoders: {base / 'text_encoders'}\n"
    )
    port = _free_port()
    log = base / "server.log"
    env = dict(os.environ, SAFET2I_SKIP_INSTALL="1", PYTHONUNBUFFERED="1", **(extra_env or {}))
    cmd = [
        python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
        "--extra-model-paths-config", str(base / "extra_model_paths.yaml"),
        "--front-end-root", str(base / "frontend"),
        "--output-directory", str(base / "output"), "--input-directory", str(base / "input"),
        "--user-directory", str(base / "user"), "--database-url", f"sqlite:///{base / 'db.sqlite'}",
        "--disable-auto-launch",
        *(extra_args or ()),
    ]
    fh = open(log, "w")
    proc = subprocess.Popen(cmd, cwd=path, stdout=fh, stderr=subprocess.STDOUT, env=env)
    server = ComfyServer(base, port, proc, log)
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited with {proc.returncode}:\n{server.log_tail()}")
            try:
                server.get("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.time() > deadline:
                    pytest.fail(f"ComfyUI did not start in 120 s:\n{server.log_tail()}")
                time.sleep(0.5)
        broken = [ln for ln in server.log_tail(5000).splitlines()
                  if (("IMPORT FAILED" in ln or "Cannot import" in ln) and PACK_NAME in ln)
                  or ("SafeT2I: " in ln and "SafeT2I: loaded " not in ln)]   # a model's load line is no failure
        if broken:
            pytest.fail("SafeT2I did not load cleanly in ComfyUI:\n" + "\n".join(broken) + "\n" + server.log_tail())
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        fh.close()


@pytest.fixture(scope="session")
def comfy(tmp_path_factory) -> ComfyServer:
    with start_server(tmp_path_factory.mktemp("comfy")) as server:
        yield server


@pytest.fixture(scope="session")
def astronaut_input(comfy) -> str:
    """Benign picture with a face (FACE_FEMALE ~0.81) placed in ComfyUI's input folder."""
    import skimage.data
    from PIL import Image

    Image.fromarray(skimage.data.astronaut()).save(comfy.input_dir / "astronaut.png")
    Image.fromarray(skimage.data.chelsea()).save(comfy.input_dir / "chelsea.png")
    return "astronaut.png"


def pytest_report_header(config):
    return f"ComfyUI integration: COMFYUI_PATH={os.environ.get('COMFYUI_PATH')!r} python={sys.executable}"



COUNTER_PACK = '''
"""Test-only ComfyUI nodes (written by the SafeT2I test fixture): count UNet calls."""
CALLS = []

class SafeT2ITestCountUNet:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "run"
    CATEGORY = "_for_testing"

    def run(self, model):
        m = model.clone()
        def wrapper(apply_model, args):
            CALLS.append({"batch": int(args["input"].shape[0]), "cond_or_uncond": list(args["cond_or_uncond"])})
            return apply_model(args["input"], args["timestep"], **args["c"])
        CALLS.clear()
        m.set_model_unet_function_wrapper(wrapper)
        return (m,)

class SafeT2ITestCalls:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}}
    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "_for_testing"

    @classmethod
    def IS_CHANGED(cls, samples):
        return float("nan")

    def run(self, samples):
        import json
        return {"ui": {"text": [json.dumps(CALLS)]}}

class SafeT2ITestDumpPatches:
    """Writes output/<name>.safetensors: for every patched weight of MODEL and CLIP, the base
    weight and the weight ComfyUI computes from its patches (comfy.lora.calculate_weight)."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "clip": ("CLIP",), "name": ("STRING", {"default": "patches"})}}
    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "_for_testing"

    @classmethod
    def IS_CHANGED(cls, **kw):
        return float("nan")

    def run(self, model, clip, name):
        import json, os
        import comfy.lora, folder_paths
        from safetensors.torch import save_file
        out = {}
        for tag, patcher in (("unet", model), ("clip", clip.patcher)):
            sd = patcher.model.state_dict()
            for key, patches in patcher.patches.items():
                base = sd[key].detach().float().clone()
                out[f"{tag}/base/{key}"] = base.clone().contiguous()
                out[f"{tag}/patched/{key}"] = comfy.lora.calculate_weight(patches, base, key).contiguous()
        if out:
            save_file(out, os.path.join(folder_paths.get_output_directory(), name + ".safetensors"))
        keys = {"unet": sorted(model.patches), "clip": sorted(clip.patcher.patches)}
        return {"ui": {"text": [json.dumps(keys)]}}

class SafeT2ITestSteerPaths:
    """Steers one prompt twice with the pack's steer_text: with the short (cut after EOS)
    leave-one-out encodes and with ComfyUI's full-length encodes; reports both."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip": ("CLIP",), "text": ("STRING", {"default": ""}),
                             "last_layer": ("INT", {"default": -1, "min": -24, "max": -1})}}
    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "_for_testing"

    @classmethod
    def IS_CHANGED(cls, **kw):
        return float("nan")

    def run(self, clip, text, last_layer):
        import json, sys
        mod = next(m for n, m in list(sys.modules.items())
                   if n.endswith("nodes.steering_nodes") and hasattr(m, "_truncated_encoder"))
        c = clip.clone()
        if last_layer != -1:
            c.clip_layer(last_layer)
        items, _ = mod.load_concepts("nudity", "")
        real, lengths = mod._truncated_encoder, []

        def spy(*a):
            got = real(*a)
            if got is None:
                return None
            sub, enc = got
            def counted(original, variants):
                lengths.append(len(original))
                return enc(original, variants)
            return sub, counted
        try:
            mod._truncated_encoder = spy
            short, rep_short = mod.steer_text(c, text, items, "nudity", 0.01, "code", False)
            mod._truncated_encoder = lambda *a: None
            full, rep_full = mod.steer_text(c, text, items, "nudity", 0.01, "code", False)
        finally:
            mod._truncated_encoder = real
        diff = max(float((a[0] - b[0]).abs().max()) for a, b in zip(short, full))
        scale = max(float(b[0].abs().max()) for b in full)
        return {"ui": {"text": [json.dumps({"short_lengths": lengths, "max_diff": diff, "scale": scale,
                                            "report_short": rep_short, "report_full": rep_full})]}}

class SafeT2ITestReplaceAttn2:
    """Replaces cross-attention in every transformer block with plain attention (as other
    attention-patching node packs do)."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "run"
    CATEGORY = "_for_testing"

    def run(self, model):
        import comfy.ldm.modules.attention as attention
        m = model.clone()
        dm = m.model.diffusion_model
        def plain(q, k, v, extra_options):
            return attention.optimized_attention(q, k, v, extra_options["n_heads"])
        for name, blocks in (("input", dm.input_blocks), ("middle", [dm.middle_block]), ("output", dm.output_blocks)):
            for number, block in enumerate(blocks):
                for layer in block:
                    for t_idx, _ in enumerate(getattr(layer, "transformer_blocks", [])):
                        m.set_model_attn2_replace(plain, name, number, t_idx)
        return (m,)

def _steering_module():
    import sys
    return next(m for n, m in list(sys.modules.items())
                if n.endswith("nodes.steering_nodes") and hasattr(m, "steer_text"))

class SafeT2ITestDumpCond:
    """Writes output/<name>.safetensors (entry i's tensor as "e<i>") and reports each entry's
    start_percent / end_percent."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",), "name": ("STRING", {"default": "cond"})}}
    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "_for_testing"

    @classmethod
    def IS_CHANGED(cls, **kw):
        return float("nan")

    def run(self, conditioning, name):
        import json, os
        import folder_paths
        from safetensors.torch import save_file
        save_file({f"e{i}": c[0].float().contiguous() for i, c in enumerate(conditioning)},
                  os.path.join(folder_paths.get_output_directory(), name + ".safetensors"))
        info = [{k: c[1][k] for k in ("start_percent", "end_percent") if k in c[1]} for c in conditioning]
        return {"ui": {"text": [json.dumps(info)]}}

class SafeT2ITestSubspace:
    """Steers one prompt with clip_a, then clip_b (a patched clone), spying on the concept
    subspace cache; reports for each whether the cache missed, and the largest differences
    between the two subspaces and between clip_b's and one computed fresh from clip_b."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_a": ("CLIP",), "clip_b": ("CLIP",), "text": ("STRING", {"default": ""})}}
    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "_for_testing"

    @classmethod
    def IS_CHANGED(cls, **kw):
        return float("nan")

    def run(self, clip_a, clip_b, text):
        import json
        import torch
        mod = _steering_module()
        real, seen = mod.concept_projector, []

        def spy(key, concepts, encode_pooled, owner=None):
            missed = []
            def counted(c):
                missed.append(True)
                return encode_pooled(c)
            out = real(key, concepts, counted, owner=owner)
            seen.append((out, bool(missed)))
            return out
        mod.concept_projector = spy
        try:
            mod.steer_text(clip_a, text, ["nude"], "nudity", 0.01, "code", True)
            mod.steer_text(clip_a, text, ["nude"], "nudity", 0.01, "code", True)
            mod.steer_text(clip_b, text, ["nude"], "nudity", 0.01, "code", True)
        finally:
            mod.concept_projector = real
        tk = clip_b.tokenize("nude")
        rows = clip_b.encode_from_tokens(tk)[0]
        eos = [int(t[0]) for t in tk["l"][0]].index(49407)
        a = rows[eos].double()[:, None]
        fresh = a @ torch.linalg.pinv(a.T @ a) @ a.T
        return {"ui": {"text": [json.dumps({
            "missed": [m for _, m in seen], "same_a": seen[1][0] is seen[0][0],
            "diff_ab": float((seen[2][0] - seen[0][0]).abs().max()),
            "diff_b_fresh": float((seen[2][0] - fresh.to(seen[2][0])).abs().max())})]}}

class SafeT2ITestBoundary:
    """For every built-in scheduler at 1..150 steps and every t', evaluates with ComfyUI's own
    calculate_start_end_timesteps and get_area_and_mult's comparisons which of the node's two
    entries (steered, original) is active at each sampled sigma."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "eps": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 1.0, "step": 1e-9})}}
    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "_for_testing"

    @classmethod
    def IS_CHANGED(cls, **kw):
        return float("nan")

    def run(self, model, eps):
        import json, types
        import torch
        import comfy.samplers as S
        mod = _steering_module()
        eps = mod.BOUNDARY_EPS if eps < 0 else eps
        ms = model.get_model_object("model_sampling")
        stub = types.SimpleNamespace(model_sampling=ms)
        both, none, exact_steered, checked = [], [], [], 0
        bounds = []
        for tp in range(49):
            f = (tp + 1) / 50
            conds = [{"start_percent": 0.0, "end_percent": f - eps}, {"start_percent": f - eps, "end_percent": 1.0}]
            S.calculate_start_end_timesteps(stub, conds)
            bounds.append((tp, conds, ms.percent_to_sigma(f)))
        x = torch.zeros(1, 4, 8, 8)
        for name in S.SCHEDULER_NAMES:
            for steps in range(1, 151):
                sigmas = S.calculate_sigmas(ms, name, steps)[:-1].float()
                sigmas = sigmas[~torch.isnan(sigmas)]
                for tp, conds, exact in bounds:
                    act = []
                    for c in conds:
                        a = torch.ones_like(sigmas, dtype=torch.bool)
                        if "timestep_start" in c:
                            a &= ~(sigmas > c["timestep_start"])
                        if "timestep_end" in c:
                            a &= ~(sigmas < c["timestep_end"])
                        act.append(a)
                    checked += len(sigmas)
                    if (act[0] & act[1]).any():
                        both.append((name, steps, tp))
                    if (~act[0] & ~act[1]).any():
                        none.append((name, steps, tp))
                    if (act[0] & (sigmas == exact)).any():
                        exact_steered.append((name, steps, tp))
        # The same answer from get_area_and_mult itself, at sgm_uniform / 50 steps.
        direct = []
        for tp, conds, _ in bounds:
            for sigma in S.calculate_sigmas(ms, "sgm_uniform", 50)[:-1].float():
                got = [S.get_area_and_mult(dict(c, model_conds={}, uuid=i), x, sigma[None]) is not None for i, c in enumerate(conds)]
                direct.append(sum(got))
        return {"ui": {"text": [json.dumps({"checked": checked, "both": both[:20], "n_both": len(both),
                                            "none": none[:20], "exact_steered": exact_steered[:20],
                                            "direct_active_counts": sorted(set(direct))})]}}

NODE_CLASS_MAPPINGS = {"SafeT2ITestReplaceAttn2": SafeT2ITestReplaceAttn2, "SafeT2ITestCountUNet": SafeT2ITestCountUNet, "SafeT2ITestCalls": SafeT2ITestCalls,
                       "SafeT2ITestDumpPatches": SafeT2ITestDumpPatches, "SafeT2ITestSteerPaths": SafeT2ITestSteerPaths,
                       "SafeT2ITestDumpCond": SafeT2ITestDumpCond, "SafeT2ITestSubspace": SafeT2ITestSubspace,
                       "SafeT2ITestBoundary": SafeT2ITestBoundary}
'''


@pytest.fixture(scope="session")
def tiny_checkpoint(comfy) -> str:
    """A tiny random SD1.x-layout checkpoint in the server's checkpoints folder."""
    path, python = _comfy_env()
    out = comfy.base / "checkpoints" / "tiny_sd15.safetensors"
    if not out.exists():
        subprocess.run([python, str(Path(__file__).with_name("make_tiny_sd15.py")), str(out)],
                       cwd=path, check=True, capture_output=True, timeout=300)
    return out.name
