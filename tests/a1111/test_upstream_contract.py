"""Contract: every name the webui stand-in (``fakewebui/``) provides exists upstream, and
every webui name the extension itself uses exists in the checkouts given.

Set ``WEBUI_PATH`` to a checkout of AUTOMATIC1111/stable-diffusion-webui (1.7 or ≥ 1.8),
lllyasviel/stable-diffusion-webui-forge or Panchovix/stable-diffusion-webui-reForge; the
variant is inferred from the tree (``backend/`` → Forge, ``ldm_patched/`` +
``modules_forge/`` → reForge, else A1111, 1.10-style when ``modules/scripts.py`` has
``postprocess_image_after_composite``). Several checkouts may be given, separated by
``os.pathsep`` (``WEBUI_PATH=~/forge:~/reforge``): each is checked. Upstream files are only
parsed with ``ast``; nothing upstream is imported or executed.

Checked, for each stand-in module that exists in that variant: the module exists upstream;
every public module-level name (functions, classes, constants, aliases) exists there;
functions and methods take no parameter upstream lacks, positional ones in the same order;
classes have every public method, class attribute, property and ``self.x`` attribute the
stand-in gives them (also looked up in upstream base classes); the settings the stand-in
defines are upstream settings; the callback categories are upstream's. Names starting with
``_`` are the stand-in's own machinery and are not checked.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import inspect
import os
import sys
import types
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kit import FAKE, STANDIN, purge  # noqa: E402

WEBUI = os.environ.get("WEBUI_PATH")
needs_webui = pytest.mark.skipif(
    not WEBUI, reason="set WEBUI_PATH to a checkout of A1111 / Forge / reForge to check the stand-in against it")

def _checkouts() -> list[Path]:
    """WEBUI_PATH: one checkout, or several separated by os.pathsep (each is checked)."""
    return [Path(p) for p in (WEBUI or "").split(os.pathsep) if p]


PACKAGES = {"a1111-1.10": ("modules",), "a1111-1.7": ("modules",), "forge": ("modules", "backend"),
            "reforge": ("modules", "modules_forge", "ldm_patched")}


def infer_variant(root: Path) -> str:
    if (root / "backend").is_dir() and (root / "modules_forge").is_dir():
        return "forge"
    if (root / "ldm_patched").is_dir() and (root / "modules_forge").is_dir():
        return "reforge"
    text = (root / "modules" / "scripts.py").read_text(encoding="utf8")
    return "a1111-1.10" if "postprocess_image_after_composite" in text else "a1111-1.7"


# ---------------------------------------------------------------------- upstream, by ast

class UpstreamModule:
    @classmethod
    def empty(cls, path: Path) -> UpstreamModule:
        m = cls.__new__(cls)
        m.path, m.tree, m.names, m.functions, m.classes, m.assigned_attrs, m.strings = \
            path, ast.Module(body=[], type_ignores=[]), set(), {}, {}, set(), set()
        return m

    def __init__(self, path: Path):
        self.path = path
        with warnings.catch_warnings():      # upstream's own invalid escapes
            warnings.simplefilter("ignore")
            self.tree = ast.parse(path.read_text(encoding="utf8"))
        self.names: set[str] = set()
        self.functions: dict[str, ast.FunctionDef] = {}
        self.classes: dict[str, ast.ClassDef] = {}
        self.assigned_attrs: set[str] = set()       # any `x.attr = ...` in the module
        self.strings: set[str] = set()
        self._top(self.tree.body)
        for node in ast.walk(self.tree):
            if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    for sub in ast.walk(t):
                        if isinstance(sub, ast.Attribute):
                            self.assigned_attrs.add(sub.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                self.strings.add(node.value)
            elif isinstance(node, ast.keyword) and node.arg:     # dict(callbacks_x=[], ...)
                self.strings.add(node.arg)

    def _top(self, body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.names.add(node.name)
                self.functions.setdefault(node.name, node)
            elif isinstance(node, ast.ClassDef):
                self.names.add(node.name)
                self.classes.setdefault(node.name, node)
            elif isinstance(node, ast.Assign):
                for t in node.targets:
                    for sub in ast.walk(t):
                        if isinstance(sub, ast.Name):
                            self.names.add(sub.id)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                self.names.add(node.target.id)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                for a in node.names:
                    self.names.add((a.asname or a.name).split(".")[0])
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                self._top(node.body)
                self._top(getattr(node, "orelse", []))
                for h in getattr(node, "handlers", []):
                    self._top(h.body)
                self._top(getattr(node, "finalbody", []))


def class_members(cls: ast.ClassDef) -> tuple[dict[str, ast.FunctionDef], set[str]]:
    methods: dict[str, ast.FunctionDef] = {}
    attrs: set[str] = set()
    for node in ast.walk(cls):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node in cls.body:
            methods.setdefault(node.name, node)
        if isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    attrs.add(t.id)
                elif isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                    attrs.add(t.attr)
        elif isinstance(node, ast.AnnAssign):
            if isinstance(node.target, ast.Name):
                attrs.add(node.target.id)
            elif isinstance(node.target, ast.Attribute) and isinstance(node.target.value, ast.Name) \
                    and node.target.value.id == "self":
                attrs.add(node.target.attr)
    return methods, attrs


class Upstream:
    def __init__(self, root: Path):
        self.root = root
        self._modules: dict[str, UpstreamModule | None] = {}

    def module(self, dotted: str) -> UpstreamModule | None:
        if dotted not in self._modules:
            base = self.root.joinpath(*dotted.split("."))
            path = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
            if path.is_file():
                self._modules[dotted] = UpstreamModule(path)
            elif base.is_dir():      # a namespace package (A1111's modules/ has no __init__.py)
                self._modules[dotted] = UpstreamModule.empty(base)
            else:
                self._modules[dotted] = None
        return self._modules[dotted]

    def find_class(self, name: str, near: UpstreamModule):
        """A class by name: in ``near``, else anywhere among the parsed modules."""
        if name in near.classes:
            return near.classes[name]
        for m in self._modules.values():
            if m is not None and name in m.classes:
                return m.classes[name]
        return None

    def members_with_bases(self, cls: ast.ClassDef, near: UpstreamModule, depth=0):
        methods, attrs = class_members(cls)
        if depth < 5:
            for b in cls.bases:
                bname = b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", None)
                base = self.find_class(bname, near) if bname else None
                if base is not None and base is not cls:
                    m2, a2 = self.members_with_bases(base, near, depth + 1)
                    methods = {**m2, **methods}
                    attrs |= a2
        return methods, attrs


# ---------------------------------------------------------------------- signatures

def upstream_params(fn: ast.FunctionDef) -> tuple[list[str], set[str], bool]:
    a = fn.args
    positional = [x.arg for x in a.posonlyargs + a.args]
    return positional, {x.arg for x in a.kwonlyargs}, a.kwarg is not None


def check_signature(obj, up: ast.FunctionDef, where: str, problems: list[str], method=False) -> None:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return
    positional, kwonly, has_kwargs = upstream_params(up)
    if method and positional[:1] in (["self"], ["cls"]):
        positional = positional[1:]
    ours_pos = [p.name for p in sig.parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if method and ours_pos[:1] in (["self"], ["cls"]):
        ours_pos = ours_pos[1:]
    ours_kw = [p.name for p in sig.parameters.values() if p.kind == p.KEYWORD_ONLY]
    for i, name in enumerate(ours_pos):
        if i >= len(positional) or positional[i] != name:
            if not (name in kwonly or has_kwargs) or i < len(positional):
                problems.append(f"{where}: parameter {i} is {name!r} here, upstream {positional[i:i + 1] or 'none'}")
                return
    for name in ours_kw:
        if name not in positional and name not in kwonly and not has_kwargs:
            problems.append(f"{where}: keyword parameter {name!r} does not exist upstream")


def standin_class_node(cls) -> tuple[ast.ClassDef | None, dict]:
    """The stand-in's ClassDef for ``cls`` (the right one when a class is defined per variant in
    if/else branches: the one containing its methods' code) and the module globals."""
    module = sys.modules.get(cls.__module__)
    try:
        tree = ast.parse(inspect.getsource(module))
    except (OSError, TypeError):
        return None, {}
    lines = {f.__code__.co_firstlineno for f in vars(cls).values() if inspect.isfunction(f)}
    candidates = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls.__name__]
    for node in candidates:
        if not lines or any(node.lineno <= ln <= node.end_lineno for ln in lines):
            return node, vars(module)
    return (candidates[0] if candidates else None), vars(module)


def _active(nodes, env):
    """Statements of the variant that is running: ``if`` tests on the stand-in's variant flags
    are evaluated (both branches when a test cannot be evaluated statically)."""
    for node in nodes:
        if isinstance(node, ast.If):
            try:
                taken = bool(eval(compile(ast.Expression(node.test), "<if>", "eval"), dict(env)))  # noqa: S307
                yield from _active(node.body if taken else node.orelse, env)
            except Exception:  # noqa: BLE001 - depends on runtime values: look at both
                yield from _active(node.body, env)
                yield from _active(node.orelse, env)
        else:
            yield node
            for field in ("body", "orelse", "finalbody"):
                if isinstance(getattr(node, field, None), list) and not isinstance(node, ast.ClassDef):
                    yield from _active(getattr(node, field), env)
            for h in getattr(node, "handlers", []) or []:
                yield from _active(h.body, env)


def standin_self_attrs(cls) -> set[str]:
    node, env = standin_class_node(cls)
    if node is None:
        return set()
    out = set()
    for stmt in _active(node.body, env):
        if isinstance(stmt, (ast.Assign, ast.AnnAssign)):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            for t in targets:
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                    out.add(t.attr)
    return out


def is_standin(obj) -> bool:
    mod = getattr(obj, "__module__", None) or ""
    return mod.split(".")[0] in STANDIN


# ---------------------------------------------------------------------- the test

def standin_modules(variant: str) -> list[str]:
    names = []
    for pkg in PACKAGES[variant]:
        for path in sorted((FAKE / pkg).rglob("*.py")):
            rel = path.relative_to(FAKE).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if any(p.startswith("_") for p in parts):
                continue
            names.append(".".join(parts))
    return names


@contextlib.contextmanager
def standin_for(root: Path, variant: str):
    saved_path, saved_env = list(sys.path), os.environ.get("FAKEWEBUI_VARIANT")
    purge()
    os.environ["FAKEWEBUI_VARIANT"] = variant
    sys.path.insert(0, str(FAKE))
    try:
        yield variant, Upstream(root)
    finally:
        purge()
        sys.path[:] = saved_path
        if saved_env is None:
            os.environ.pop("FAKEWEBUI_VARIANT", None)
        else:
            os.environ["FAKEWEBUI_VARIANT"] = saved_env


@pytest.fixture(scope="module", params=[str(p) for p in _checkouts()] or [None])
def standin(request):
    root = Path(request.param).expanduser().resolve()
    with standin_for(root, infer_variant(root)) as pair:
        yield pair


def check_module(dotted: str, variant: str, upstream: Upstream) -> list[str]:
    problems: list[str] = []
    try:
        mod = importlib.import_module(dotted)
    except ImportError as exc:
        if dotted.split(".")[0] != "modules" or "does not exist" in str(exc) or "only exists" in str(exc):
            return []     # the stand-in says this module is absent in this variant
        raise
    up = upstream.module(dotted)
    if up is None:
        return [f"{dotted}: no such module upstream ({variant})"]
    for name, obj in vars(mod).items():
        if name.startswith("_") or isinstance(obj, types.ModuleType) and not is_standin(obj):
            continue
        if isinstance(obj, types.ModuleType):
            if name not in up.names:
                problems.append(f"{dotted}.{name}: module alias missing upstream")
            continue
        if callable(obj) and not is_standin(obj):
            continue        # imported from the standard library / torch / PIL
        if not callable(obj) and not isinstance(obj, (str, int, float, bool, dict, list, tuple, set, type(None))) \
                and not is_standin(type(obj)):
            continue
        if name not in up.names:
            problems.append(f"{dotted}.{name}: missing upstream")
            continue
        if inspect.isclass(obj) and getattr(obj, "__module__", "") == dotted and name in up.classes:
            check_class(obj, up.classes[name], up, upstream, f"{dotted}.{name}", problems)
        elif inspect.isfunction(obj) and name in up.functions:
            check_signature(obj, up.functions[name], f"{dotted}.{name}()", problems)
    return problems


def check_class(cls, up_cls: ast.ClassDef, up_mod: UpstreamModule, upstream: Upstream, where: str,
                problems: list[str]) -> None:
    methods, attrs = upstream.members_with_bases(up_cls, up_mod)
    for name, member in vars(cls).items():
        if name.startswith("_") and name != "__init__":
            continue
        if name == "__init__":
            if "__init__" in methods and inspect.isfunction(member):
                check_signature(member, methods["__init__"], f"{where}.__init__()", problems, method=True)
            continue
        if name in methods:
            if inspect.isfunction(member):
                check_signature(member, methods[name], f"{where}.{name}()", problems, method=True)
            continue
        if name in attrs or name in up_mod.assigned_attrs:
            continue
        if name in getattr(cls, "__dataclass_fields__", {}) and name in attrs:
            continue
        problems.append(f"{where}.{name}: no such method or attribute upstream")
    for attr in sorted(standin_self_attrs(cls)):
        if attr.startswith("_"):
            continue
        if attr not in attrs and attr not in methods and attr not in up_mod.assigned_attrs:
            problems.append(f"{where}: instance attribute {attr!r} not set upstream")


@needs_webui
def test_every_standin_name_exists_upstream(standin):
    variant, upstream = standin
    problems = []
    for dotted in standin_modules(variant):
        problems += check_module(dotted, variant, upstream)
    assert not problems, f"stand-in ({variant}) differs from {upstream.root}:\n" + "\n".join(problems)


#: The built-in Lora extension's modules in the stand-in, and its folder upstream per variant.
LORA_STANDIN = FAKE / "extensions-builtin" / "Lora"
LORA_UPSTREAM = {"a1111-1.10": "Lora", "a1111-1.7": "Lora", "forge": "sd_forge_lora", "reforge": "Lora"}


@needs_webui
def test_the_builtin_lora_standin_matches_upstream(standin):
    """The stand-in's ``extensions-builtin/Lora`` modules against the variant's own built-in
    LoRA extension (A1111/reForge ``Lora``, Forge ``sd_forge_lora``), by the same rules."""
    variant, upstream = standin
    up_root = upstream.root / "extensions-builtin" / LORA_UPSTREAM[variant]
    assert up_root.is_dir(), f"{up_root} missing"
    names = sorted(p.stem for p in LORA_STANDIN.glob("*.py") if not p.stem.startswith("_") and p.stem != "preload")
    assert names, "no stand-in Lora modules"
    sys.path.insert(0, str(LORA_STANDIN))
    try:
        # As the webui does first: the extension's preload adds its options (--lora-dir, ...).
        from modules import shared, shared_cmd_options
        spec = importlib.util.spec_from_file_location("_lora_preload", LORA_STANDIN / "preload.py")
        preload = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(preload)
        preload.preload(shared_cmd_options.parser)
        vars(shared.cmd_opts).update({k: v for k, v in vars(shared_cmd_options.parser.parse_args([])).items()
                                      if not hasattr(shared.cmd_opts, k)})
        lora_up = Upstream(up_root)
        problems = []
        for name in names:
            if lora_up.module(name) is None:
                problems.append(f"{name}: no such module in {up_root}")
                continue
            mod = importlib.import_module(name)
            for attr, obj in vars(mod).items():
                if attr.startswith("_") or isinstance(obj, types.ModuleType):
                    continue
                if getattr(obj, "__module__", name) not in (name, None) and callable(obj):
                    continue          # imported from elsewhere
                if not callable(obj) and not isinstance(obj, (str, int, float, bool, dict, list, tuple, set,
                                                               type(None))):
                    continue
                up_mod = lora_up.module(name)
                if attr not in up_mod.names:
                    problems.append(f"{name}.{attr}: missing in {up_root.name}")
                elif inspect.isfunction(obj) and attr in up_mod.functions:
                    check_signature(obj, up_mod.functions[attr], f"{name}.{attr}()", problems)
                elif inspect.isclass(obj) and attr in up_mod.classes:
                    check_class(obj, up_mod.classes[attr], up_mod, lora_up, f"{name}.{attr}", problems)
    finally:
        sys.path.remove(str(LORA_STANDIN))
        for name in names:
            sys.modules.pop(name, None)
    assert not problems, f"stand-in Lora ({variant}) differs from {up_root}:\n" + "\n".join(problems)


@needs_webui
def test_settings_and_callback_categories_are_upstreams(standin):
    variant, upstream = standin
    from modules import script_callbacks, shared_options
    opts_mod = upstream.module("modules.shared_options")
    missing = sorted(k for k in shared_options.options_templates if k not in opts_mod.strings)
    assert not missing, f"settings not defined upstream ({variant}): {missing}"
    cb_mod = upstream.module("modules.script_callbacks")
    cats = sorted(k for k in script_callbacks.callback_map if k not in cb_mod.strings)
    assert not cats, f"callback categories not upstream ({variant}): {cats}"


def check_dit_standin(variant: str, upstream: Upstream, modules, members: dict, functions=()) -> list[str]:
    """A Forge DiT-family stand-in: each of ``modules`` is a stand-in module whose names exist
    upstream (:func:`check_module`); each method of ``members`` ({(module, class): names}) is
    implemented by the stand-in and exists upstream with the same positional parameters; so does
    each ``(module, function)`` of ``functions``. Returns the problems found."""
    names = standin_modules(variant)
    problems = []
    for dotted in modules:
        assert dotted in names, dotted
        assert upstream.module(dotted) is not None, f"{dotted}: not in {upstream.root}"
        problems += check_module(dotted, variant, upstream)
    for (dotted, cls_name), wanted in members.items():
        cls = getattr(importlib.import_module(dotted), cls_name)
        up_mod = upstream.module(dotted)
        methods, _ = upstream.members_with_bases(up_mod.classes[cls_name], up_mod)
        for name in wanted:
            assert name in vars(cls), f"{dotted}.{cls_name}.{name}: not implemented by the stand-in"
            if name not in methods:
                problems.append(f"{dotted}.{cls_name}.{name}: not upstream")
                continue
            check_signature(vars(cls)[name], methods[name], f"{dotted}.{cls_name}.{name}()", problems, method=True)
    for dotted, fn in functions:
        up_mod = upstream.module(dotted)
        if fn not in up_mod.functions:
            problems.append(f"{dotted}.{fn}: not upstream")
            continue
        check_signature(getattr(importlib.import_module(dotted), fn), up_mod.functions[fn], f"{dotted}.{fn}()",
                        problems)
    return problems


#: Forge's Flux in the stand-in (``start("forge", kind="flux")``): the modules it adds or uses, and
#: the upstream functions/methods it implements (compared one by one, ``__call__`` included).
FLUX_STANDIN = ("backend.text_processing.t5_engine", "backend.text_processing.parsing",
                "backend.text_processing.emphasis", "backend.diffusion_engine.flux", "backend.diffusion_engine.base",
                "backend.sampling.condition", "backend.memory_management", "backend.patcher.base",
                "backend.patcher.lora")
FLUX_MEMBERS = {("backend.text_processing.t5_engine", "T5TextProcessingEngine"):
                ("__init__", "tokenize", "encode_with_transformers", "tokenize_line", "__call__", "process_tokens"),
                ("backend.text_processing.t5_engine", "PromptChunk"): ("__init__",),
                ("backend.diffusion_engine.flux", "Flux"): ("get_learned_conditioning", "set_clip_skip"),
                ("backend.text_processing.emphasis", "EmphasisOriginal"): ("after_transformers",)}
FLUX_FUNCTIONS = (("backend.text_processing.parsing", "parse_prompt_attention"),
                  ("backend.text_processing.emphasis", "get_current_option"),
                  ("backend.sampling.condition", "compile_conditions"),
                  ("backend.memory_management", "text_encoder_device"))


@needs_webui
def test_the_forge_flux_standin_is_forges(standin):
    """The Flux stand-in's modules are checked like every other (each name exists upstream, no
    parameter upstream lacks), and each function/method it implements exists in Forge with the
    same positional parameters; the setting its T5 engine reads (``emphasis``) is Forge's."""
    variant, upstream = standin
    if variant != "forge":
        pytest.skip("Forge's Flux stand-in: needs a Forge checkout")
    problems = check_dit_standin(variant, upstream, FLUX_STANDIN, FLUX_MEMBERS, FLUX_FUNCTIONS)
    from modules import shared_options
    assert "emphasis" in shared_options.options_templates
    assert not problems, f"Flux stand-in differs from {upstream.root}:\n" + "\n".join(problems)


#: Forge's SD3.5 in the stand-in (``start("forge", kind="sd35")``): its engine module (the T5
#: engine, parsing and emphasis are the Flux stand-in's, checked above) and the methods it implements.
SD35_STANDIN = ("backend.diffusion_engine.sd35", "backend.text_processing.t5_engine", "backend.patcher.lora")
SD35_MEMBERS = {("backend.diffusion_engine.sd35", "StableDiffusion3"): ("get_learned_conditioning", "set_clip_skip")}


@needs_webui
def test_the_forge_sd35_standin_is_forges(standin):
    """The SD3.5 stand-in's module is checked like every other (each name exists upstream), each
    method it implements exists in Forge's ``StableDiffusion3`` with the same positional
    parameters, upstream's conditioning reads the engines and setting the stand-in models
    (``text_processing_engine_l/_g/_t5``, ``sd3_enable_t5``, ``is_negative_prompt``), and the
    setting is Forge's."""
    variant, upstream = standin
    if variant != "forge":
        pytest.skip("Forge's SD3.5 stand-in: needs a Forge checkout")
    problems = check_dit_standin(variant, upstream, SD35_STANDIN, SD35_MEMBERS)
    source = (upstream.root / "backend" / "diffusion_engine" / "sd35.py").read_text()
    for needle in ("text_processing_engine_l(prompt)", "text_processing_engine_g(prompt)",
                   "text_processing_engine_t5(prompt)", "opts.sd3_enable_t5", "is_negative_prompt",
                   "torch.cat([cond_l, cond_g], dim=-1)", "torch.cat([cond_lg, cond_t5], dim=-2)",
                   "torch.cat([l_pooled, g_pooled], dim=-1)", "ClassicTextProcessingEngine",
                   "T5TextProcessingEngine", "PredictionDiscreteFlow"):
        if needle not in source:
            problems.append(f"backend/diffusion_engine/sd35.py: no longer has {needle!r}")
    options = (upstream.root / "modules" / "shared_options.py").read_text()
    assert '"sd3_enable_t5": OptionInfo(False' in options
    from modules import shared_options
    assert shared_options.options_templates["sd3_enable_t5"].default is False
    assert not problems, f"SD3.5 stand-in differs from {upstream.root}:\n" + "\n".join(problems)


@needs_webui
def test_variant_inference_matches_the_checkout(standin):
    variant, upstream = standin
    assert variant in PACKAGES
    if variant.startswith("a1111"):
        assert upstream.module("modules.scripts") is not None


def test_the_checker_reports_what_upstream_lacks(tmp_path):
    """Runs without a checkout: an "upstream" tree written here lacks names the stand-in has."""
    mods = tmp_path / "modules"
    mods.mkdir()
    (mods / "scripts.py").write_text("postprocess_image_after_composite = 1\n")
    (mods / "errors.py").write_text("def report(message):\n    pass\n")
    (mods / "script_callbacks.py").write_text(
        "class CFGDenoiserParams:\n    def __init__(self, x, sigma, image_cond):\n        self.x = x\n")
    with standin_for(tmp_path, infer_variant(tmp_path)) as (variant, upstream):
        assert variant == "a1111-1.10"
        errors = check_module("modules.errors", variant, upstream)
        assert "modules.errors.record_exception: missing upstream" in errors
        assert any("report()" in e and "exc_info" in e for e in errors)
        cb = check_module("modules.script_callbacks", variant, upstream)
        assert any("CFGDenoiserParams.__init__()" in e and "'image_cond'" in e for e in cb)
        assert any("instance attribute 'text_cond'" in e for e in cb)
        assert "modules.shared: no such module upstream (a1111-1.10)" in check_module("modules.shared", variant,
                                                                                      upstream)


# ---------------------------------------------------------------------- what the extension itself uses

#: Top-level packages and modules that come from the webui (not from pip).
WEBUI_TOP = {"modules", "backend", "ldm_patched", "modules_forge", "launch",
             "networks", "network", "lora", "lora_patches", "extra_networks_lora"}   # built-in Lora extension
EXTENSION_FILES = ("extension", "scripts", "preload.py", "install.py")


def extension_uses(root: Path) -> list[tuple[str, str | None, str, bool]]:
    """(module, name or None, where, guarded) for every webui import in the extension, plus
    every ``alias.attr`` read on an imported webui module. ``guarded``: inside a ``try`` that
    catches ImportError (or Exception), i.e. a variant-specific import the code falls back from."""
    out = []
    files = []
    for part in EXTENSION_FILES:
        p = root / part
        files += sorted(p.rglob("*.py")) if p.is_dir() else [p] if p.is_file() else []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf8"))
        guarded_nodes = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Try) and any(
                    h.type is None or any(isinstance(n, ast.Name) and n.id in ("ImportError", "Exception",
                                                                               "ModuleNotFoundError")
                                          for n in ast.walk(h.type)) for h in node.handlers):
                for sub in node.body:
                    guarded_nodes.update(id(n) for n in ast.walk(sub))
        aliases: dict[str, list[tuple[str, bool]]] = {}   # name -> [(module, bound by a guarded import)]
        for node in ast.walk(tree):
            where = f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)}"
            guarded = id(node) in guarded_nodes
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                    and node.module.split(".")[0] in WEBUI_TOP:
                for a in node.names:
                    out.append((node.module, a.name, where, guarded))
                    aliases.setdefault(a.asname or a.name, []).append((f"{node.module}.{a.name}", guarded))
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] in WEBUI_TOP:
                        out.append((a.name, None, where, guarded))
                        bound = a.name if a.asname else a.name.split(".")[0]
                        aliases.setdefault(a.asname or a.name.split(".")[0], []).append((bound, guarded))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                    and isinstance(node.ctx, ast.Load):
                for module, bound_guarded in aliases[node.value.id]:
                    # An attribute of a module bound by a fallback import is as variant-specific as it.
                    out.append((module, node.attr, f"{path.relative_to(root)}:{node.lineno}",
                                bound_guarded or id(node) in guarded_nodes))
    return out


def _upstream_has(upstream: Upstream, module: str, name: str | None) -> bool:
    roots = [upstream]
    top = module.split(".")[0]
    if top in ("networks", "network", "lora", "lora_patches", "extra_networks_lora"):
        # The built-in Lora extension's own directory is on sys.path in the webui.
        roots = [Upstream(d) for d in sorted((upstream.root / "extensions-builtin").glob("*"))
                 if (d / f"{top}.py").is_file()]
    for up in roots:
        mod = up.module(module)
        if mod is None:
            continue
        if name is None or name in mod.names or up.module(f"{module}.{name}") is not None:
            return True
        if mod.path.name == "__init__.py" or mod.path.is_dir():
            continue
    return False


@pytest.mark.skipif(not WEBUI, reason="set WEBUI_PATH to one or more checkouts (os.pathsep-separated) of A1111 / "
                                      "Forge / reForge to check the extension's own webui names against them")
def test_every_webui_name_the_extension_uses_exists_upstream():
    """The stand-in test above only checks names the stand-in provides; this one checks the
    names the extension reads (imports and ``module.attr``) against the checkouts given: a
    name that exists in none of them is a bug waiting for a user (how a Forge-only import on
    reForge's path was missed)."""
    uses = extension_uses(Path(__file__).resolve().parents[2])
    assert len(uses) > 20     # the walk found the extension's webui imports
    ups = [Upstream(p) for p in _checkouts()]
    # Only names of packages some given checkout has (ldm_patched is reForge's, backend Forge's):
    # the others belong to a variant not given.
    def given(m):
        top = m.split(".")[0]
        return any((u.root / top).exists() or (top not in PACKAGE_DIRS) for u in ups)

    missing = sorted({f"{m}{'.' + n if n else ''} ({w})" for m, n, w, g in uses
                      if given(m) and not any(_upstream_has(u, m, n) for u in ups)})
    # A name outside a fallback ``try`` must exist in every variant given, unless it is behind a
    # webui check the code makes itself (those are in a ``try`` or named in the allow-list).
    unguarded = sorted({f"{m}{'.' + n if n else ''} ({w}; missing in {u.root})" for m, n, w, g in uses if not g
                        for u in ups if not _upstream_has(u, m, n) and (m, n) not in VARIANT_ONLY})
    assert not missing, "names the extension uses that no checkout has:\n" + "\n".join(missing)
    assert not unguarded, "unguarded names missing in a variant:\n" + "\n".join(unguarded)


#: Top-level webui packages that exist only in some variants.
PACKAGE_DIRS = {"backend", "ldm_patched", "modules_forge"}

#: Names the extension reaches only on the variant that has them (after its own check of the
#: webui kind, not a try/except): (module, name).
VARIANT_ONLY: set[tuple[str, str | None]] = set()


def test_the_extension_walk_finds_guarded_and_attribute_uses(tmp_path):
    """Runs without a checkout: the walk sees imports, guarded fallbacks and module attributes."""
    (tmp_path / "extension").mkdir()
    (tmp_path / "extension" / "x.py").write_text(
        "from modules import shared\n"
        "try:\n    from backend import memory_management\nexcept ImportError:\n    memory_management = None\n"
        "def f():\n    return shared.opts, memory_management.load_model_gpu\n")
    uses = {(m, n, g) for m, n, _, g in extension_uses(tmp_path)}
    assert ("modules", "shared", False) in uses and ("backend", "memory_management", True) in uses
    assert ("modules.shared", "opts", False) in uses
    assert ("backend.memory_management", "load_model_gpu", True) in uses      # bound by the guarded import
