"""Security invariants, asserted on the source tree (ast) and on behaviour.

- no pickle: no module imports pickle-like serialisers; every ``torch.load`` passes ``weights_only=True``;
- remote code stays off unless asked: no call passes ``trust_remote_code=True`` literally, every loader
  and CLI option defaults to off;
- YAML is read with the safe loader only (a ``!!python/object`` tag is refused, nothing runs);
- no shell: no ``shell=True``, ``os.system``, ``os.popen``, ``os.exec*``, builtin ``eval``/``exec``.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import ctxaware

SRC = Path(ctxaware.__file__).parent
FILES = sorted(p for p in SRC.rglob("*.py"))
PICKLERS = {"pickle", "cPickle", "dill", "cloudpickle", "shelve", "marshal", "joblib", "_pickle"}


def _trees():
    for p in FILES:
        yield p, ast.parse(p.read_text(encoding="utf-8"), filename=str(p))


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _calls():
    for path, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                yield path, node


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_the_scan_sees_the_whole_package():
    assert len(FILES) > 40 and any(p.name == "models.py" for p in FILES)
    assert sum(1 for _ in _calls()) > 1000


def test_no_pickle_imports():
    bad = []
    for path, tree in _trees():
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            bad += [f"{path.relative_to(SRC)}:{node.lineno} {n}" for n in names if n in PICKLERS]
    assert not bad, bad


def test_torch_load_only_with_weights_only():
    bad = []
    for path, call in _calls():
        if _dotted(call.func) == "torch.load" or _dotted(call.func).endswith(".torch.load"):
            value = _kw(call, "weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                bad.append(f"{path.relative_to(SRC)}:{call.lineno}")
    assert not bad, bad


def test_no_literal_trust_remote_code_true():
    bad = []
    for path, call in _calls():
        value = _kw(call, "trust_remote_code")
        if isinstance(value, ast.Constant) and value.value is True:
            bad.append(f"{path.relative_to(SRC)}:{call.lineno}")
    assert not bad, bad


def test_loaders_default_to_no_remote_code():
    from ctxaware.harness.model import CtxawareLM
    from ctxaware.models import load_model, load_tokenizer

    for fn in (load_model, load_tokenizer, CtxawareLM.__init__):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False, fn


def test_cli_remote_code_is_opt_in():
    from ctxaware.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, sp in sub.choices.items():
        for action in sp._actions:
            if action.dest == "trust_remote_code":
                assert action.default in (False, None), (name, action.default)
                assert "--trust-remote-code" in action.option_strings, name
    # commands without the option never enable remote code (no literal True anywhere, above)


def test_yaml_only_safe_loading():
    bad = []
    for path, call in _calls():
        name = _dotted(call.func)
        if name in ("yaml.load", "yaml.load_all"):
            loader = _kw(call, "Loader") or (call.args[1] if len(call.args) > 1 else None)
            if not (loader is not None and "Safe" in _dotted(loader)):
                bad.append(f"{path.relative_to(SRC)}:{call.lineno} {name}")
        elif name in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"):
            bad.append(f"{path.relative_to(SRC)}:{call.lineno} {name}")
    assert not bad, bad


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_yaml_python_tags_are_refused_and_never_run(tmp_path, suffix):
    from ctxaware.config import read_config_file
    from ctxaware.errors import ConfigError
    from ctxaware.steering.file import load_steering_file

    marker = tmp_path / "pwned"
    evil = tmp_path / f"evil{suffix}"
    evil.write_text(f"alpha: !!python/object/apply:os.system ['touch {marker}']\n", encoding="utf-8")
    for reader in (read_config_file, load_steering_file):
        with pytest.raises(ConfigError):
            reader(evil)
    assert not marker.exists()


def test_no_shell_and_no_dynamic_code():
    bad = []
    for path, call in _calls():
        name = _dotted(call.func)
        shell = _kw(call, "shell")
        if isinstance(shell, ast.Constant) and shell.value:
            bad.append(f"{path.relative_to(SRC)}:{call.lineno} shell=True")
        if name in ("os.system", "os.popen", "commands.getoutput", "subprocess.getoutput",
                    "subprocess.getstatusoutput") or name.startswith("os.exec") or name.startswith("os.spawn"):
            bad.append(f"{path.relative_to(SRC)}:{call.lineno} {name}")
        if isinstance(call.func, ast.Name) and call.func.id in ("eval", "exec"):
            bad.append(f"{path.relative_to(SRC)}:{call.lineno} {call.func.id}")
    assert not bad, bad


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The scanners flag the patterns they forbid (so a clean run means something)."""
    code = ("import pickle\nimport torch, yaml, os, subprocess\ntorch.load('x')\nf(trust_remote_code=True)\n"
            "yaml.load(s)\nsubprocess.run('ls', shell=True)\nos.system('ls')\neval('1')\n")
    tree = ast.parse(code)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    assert any(isinstance(n, ast.Import) and n.names[0].name in PICKLERS for n in ast.walk(tree))
    assert any(_dotted(c.func) == "torch.load" and _kw(c, "weights_only") is None for c in calls)
    assert any(isinstance(_kw(c, "trust_remote_code"), ast.Constant) for c in calls)
    assert any(_dotted(c.func) == "yaml.load" and _kw(c, "Loader") is None for c in calls)
    assert any(isinstance(_kw(c, "shell"), ast.Constant) for c in calls)
    assert any(_dotted(c.func) == "os.system" for c in calls)
    assert any(isinstance(c.func, ast.Name) and c.func.id == "eval" for c in calls)
