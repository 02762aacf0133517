"""Every key of the config tree is read by the code it configures: a key nothing reads is a knob that does
nothing, so the tree may hold none. Found statically over the package (outside config.py's own checks):
`<x>.<section>.<key>`, or `<name>.<key>` where <name> is bound to `<x>.<section>` or annotated with the
section's class, or `self.<attr>.<key>` where `self.<attr>` was set from such a name."""

import ast
import dataclasses
import typing
from pathlib import Path

from sfpp_ray import config

PACKAGE = Path(config.__file__).parent


# sections of another section's class, read through it: the teacher is built from a config whose `model` is
# `teacher_model` (components.teacher_config)
READ_AS = {"teacher_model": "model"}


def sections() -> dict[str, type]:
    hints = typing.get_type_hints(config.Config)
    unwrap = lambda tp: next((a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)), tp)  # noqa: E731
    return {f.name: unwrap(hints[f.name]) for f in dataclasses.fields(config.Config)}


def reads(tree: ast.AST, by_class: dict[str, str], names: set[str]) -> set[tuple[str, str]]:
    """(section, key) pairs read in one module."""
    found, on_self = set(), {}  # on_self: self.<attr> -> section, for the module's classes
    for scope in [tree, *[n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]]:
        alias: dict[str, str] = {}
        if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for arg in scope.args.args + scope.args.kwonlyargs:
                ann = arg.annotation
                label = ann.id if isinstance(ann, ast.Name) else ann.value if isinstance(ann, ast.Constant) else None
                if label in by_class:
                    alias[arg.arg] = by_class[label]
        for node in ast.walk(scope):
            if isinstance(node, ast.Assign):
                targets = node.targets[0].elts if isinstance(node.targets[0], ast.Tuple) else node.targets
                values = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
                for target, value in zip(targets, values):
                    if isinstance(target, ast.Name) and isinstance(value, ast.Attribute) and value.attr in names:
                        alias[target.id] = value.attr
                    elif (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                          and target.value.id == "self" and isinstance(value, ast.Name) and value.id in alias):
                        on_self[target.attr] = alias[value.id]
        for node in ast.walk(scope):
            if not isinstance(node, ast.Attribute):
                continue
            owner = node.value
            if isinstance(owner, ast.Attribute) and owner.attr in names:
                found.add((owner.attr, node.attr))
            elif isinstance(owner, ast.Name) and owner.id in alias:
                found.add((alias[owner.id], node.attr))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr in on_self
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"):
            found.add((on_self[node.value.attr], node.attr))
    return found


def test_every_config_key_is_read_by_the_package():
    secs = sections()
    by_class = {cls.__name__: name for name, cls in secs.items() if name not in READ_AS}
    found = set()
    for path in PACKAGE.rglob("*.py"):
        if path.name != "config.py":
            found |= reads(ast.parse(path.read_text()), by_class, set(secs))
    found |= {(name, key) for name, via in READ_AS.items() for section, key in found if section == via}
    keys = {(name, f.name) for name, cls in secs.items() for f in dataclasses.fields(cls)}
    unread = sorted(f"{s}.{k}" for s, k in keys - found)
    assert not unread, f"config keys nothing reads: {unread}"
    assert len(keys) > 100  # the walk saw the whole tree


def test_the_walk_finds_a_key_that_nothing_reads():
    """The check itself: a section's key read only through an unrelated name is reported unread."""
    secs = sections()
    by_class = {cls.__name__: name for name, cls in secs.items()}
    code = ("def f(cfg, t: TrainerConfig):\n    g = cfg.grpo\n    return cfg.dmd.steps, g.lr, t.bf16, other.group_size\n"
            "class B:\n    def __init__(self, c: BufferConfig):\n        self.c = c\n"
            "    def full(self):\n        return self.c.max_items, self.other.max_bytes\n")
    assert reads(ast.parse(code), by_class, set(secs)) == {("dmd", "steps"), ("grpo", "lr"), ("trainer", "bf16"),
                                                          ("buffer", "max_items")}
