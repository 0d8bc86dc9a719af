"""nodes/paths.register_folders against ComfyUI's real folder_paths module (in a subprocess with
ComfyUI's interpreter): the pack's own folders are registered with our own extension sets, also
when extra_model_paths.yaml registered the folder names first, and no set of ComfyUI's or of
another folder changes."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pytest

from .conftest import REPO, _comfy_env

pytestmark = pytest.mark.integration

SCRIPT = textwrap.dedent('''
    import json, os, sys
    comfy, pk_root, mode, extra = sys.argv[1:5]
    sys.path.insert(0, comfy)
    sys.path.insert(0, pk_root)
    os.chdir(comfy)
    import folder_paths
    def snap():
        return {k: [sorted(v[1]), id(v[1]), list(v[0])] for k, v in folder_paths.folder_names_and_paths.items()}
    pt = folder_paths.supported_pt_extensions
    pt_before = (sorted(pt), id(pt))
    if mode == "yaml":
        from utils.extra_config import load_extra_path_config
        load_extra_path_config(extra)
    elif mode == "other_pack":   # another pack registered the name with ComfyUI's shared set
        folder_paths.folder_names_and_paths["safety_models"] = ([extra], folder_paths.supported_pt_extensions)
    before = snap()
    from pk.nodes import paths
    paths.register_folders()
    paths.register_folders()     # idempotent
    after = snap()
    print(json.dumps({"before": before, "after": after, "pt_before": pt_before, "pt_after": (sorted(pt), id(pt)),
                      "pt_is_same": pt is folder_paths.supported_pt_extensions,
                      "pack_safety": str(paths.PACK_SAFETY), "pack_filters": str(paths.PACK_MODELS),
                      "models_dir": folder_paths.models_dir, "ours": sorted(paths.SAFETY_EXTENSIONS),
                      "listed": folder_paths.get_filename_list("safety_models"),
                      "filters_listed": folder_paths.get_filename_list("safet2i_filters")}))
''')


def _run(tmp_path, mode):
    comfy, python = _comfy_env()
    pk = tmp_path / "pkroot" / "pk"
    pk.mkdir(parents=True)
    (pk / "__init__.py").write_text("")
    for name in ("nodes", "safet2i", "models"):
        (pk / name).symlink_to(REPO / name, target_is_directory=True)
    extra = tmp_path / "user_models"
    for d in ("safety_models", "filters"):
        (extra / d).mkdir(parents=True)
    for n in ("mine.safetensors", "old.ckpt", "notes.txt", "x.json"):
        (extra / "safety_models" / n).write_bytes(b"0")
    for n in ("f.json", "f.onnx"):
        (extra / "filters" / n).write_bytes(b"0")
    yaml = tmp_path / "extra_model_paths.yaml"
    yaml.write_text(f"mine:\n  safety_models: {extra / 'safety_models'}\n  safet2i_filters: {extra / 'filters'}\n"
                    f"  loras: {extra / 'loras'}\n")
    arg = str(yaml) if mode == "yaml" else str(extra / "safety_models")
    out = subprocess.run([python, "-c", SCRIPT, comfy, str(tmp_path / "pkroot"), mode, arg], capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, SAFET2I_SKIP_INSTALL="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), extra


def _others_unchanged(r):
    for name, (exts, ident, folders) in r["before"].items():
        if name in ("safety_models", "safet2i_filters"):
            continue
        assert r["after"][name] == [exts, ident, folders], name       # same set object, same contents, same paths
    assert r["pt_before"] == r["pt_after"] and r["pt_is_same"]
    assert ".json" not in r["pt_after"][0]


@pytest.mark.parametrize("mode", ["fresh", "yaml", "other_pack"])
def test_register_folders_with_real_folder_paths(tmp_path, mode):
    r, extra = _run(tmp_path, mode)
    _others_unchanged(r)
    assert r["pack_safety"] == str(REPO / "models" / "safety_models")
    safety = r["after"]["safety_models"]
    filters = r["after"]["safet2i_filters"]
    default = os.path.join(r["models_dir"], "safety_models")
    if mode == "fresh":
        assert "safety_models" not in r["before"]
        assert safety[2] == [default, r["pack_safety"]]
        assert filters[2] == [os.path.join(r["models_dir"], "safet2i_filters"), r["pack_filters"]]
        assert safety[0] == r["ours"] and filters[0] == [".json"]
    else:
        # the user's folder first, then ComfyUI's default and the pack's own folder, each once
        user = str(extra / "safety_models")
        assert safety[2] == [user, default, r["pack_safety"]]
        assert r["listed"] == ["mine.safetensors", "old.ckpt"]     # our extensions, not every file
        if mode == "yaml":
            assert r["before"]["safety_models"][0] == []           # ComfyUI registered it with an empty set
            assert filters[2] == [str(extra / "filters"), os.path.join(r["models_dir"], "safet2i_filters"),
                                  r["pack_filters"]]
            assert "f.json" in r["filters_listed"] and "f.onnx" not in r["filters_listed"]
        else:
            assert r["before"]["safety_models"][1] == r["pt_before"][1]  # shared with supported_pt_extensions
            assert safety[1] != r["pt_after"][1] and set(r["ours"]) <= set(safety[0])
