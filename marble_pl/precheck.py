"""Mistakes in a ``marble`` command found before torch is imported: one line, in about a second.

Importing torch, Lightning and diffusers takes 10 s or more; a typo should not. This module reads
the command line and the ``--config`` files with PyYAML only and checks what can be checked
without the heavy stack: config files that do not exist or do not parse (named with file and
line), keys that ``model``, ``data`` or ``trainer`` do not take, choices that are not offered,
balancers that do not exist, and an optional extra a balancer needs. Each is a
:class:`UsageError` with a did-you-mean where one is close.

The accepted keys and choices are read from the source of :class:`marble_pl.module.MarbleModule`,
:class:`marble_pl.data.PromptDataModule` and Lightning's ``Trainer`` with :mod:`ast` (never
imported here), so they cannot drift from the real signatures. Anything this cannot decide is
left to jsonargparse, whose own errors :mod:`marble_pl.cli` also prints as one line.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import inspect
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from marble_pl.errors import MarbleUserError

__all__ = ["UsageError", "did_you_mean", "precheck", "signature_schema"]

PACKAGE = Path(__file__).resolve().parent
SUBCOMMANDS = ("fit", "validate", "test", "predict")
TOP_LEVEL = (
    "seed_everything",
    "trainer",
    "model",
    "data",
    "optimizer",
    "lr_scheduler",
    "ckpt_path",
    "weights_only",
    "verbose",
    "config",
)
"""Top-level keys of a subcommand's config (``marble fit --print_config``)."""

BALANCER_CLASS_PATH = "marble_pl.balancers.GramianWeighting"


class UsageError(MarbleUserError, ValueError):
    """A mistake on the command line or in a config file, found before anything is loaded."""


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest option (case-insensitive), else ``""``."""
    options = list(options)
    lowered = {o.lower(): o for o in options}
    if word.lower() in lowered:
        return f" (did you mean {lowered[word.lower()]!r}?)"
    close = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    return f" (did you mean {lowered[close[0]]!r}?)" if close else ""


# ------------------------------------------------------------------ signatures from source


@dataclass
class Option:
    """One ``__init__`` parameter: its name and, when its type is only strings, their choices."""

    name: str
    choices: tuple[str, ...] | None = None  # None: not a closed set of strings
    literal: tuple[str, ...] = ()  # the string choices of a Literal inside a wider union
    scalar: str | None = None  # "int", "float" or "bool" when that (or None) is the whole type
    default: Any = None  # the default as a Python literal (UNKNOWN when not a literal)


@dataclass
class Schema:
    """The keys a section takes (``model``, ``data``, ``trainer``) and their string choices."""

    section: str
    options: dict[str, Option] = field(default_factory=dict)


@cache
def _module_tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


@cache
def _assignments() -> tuple[tuple[str, ast.expr], ...]:
    """Every module-level ``name = <expr>`` (or ``name: T = <expr>``) of the package, in order."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in _module_tree(path).body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target, value = node.targets[0], node.value
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                target, value = node.target, node.value
            else:
                continue
            if isinstance(target, ast.Name):
                found.append((target.id, value))
    return tuple(found)


@cache
def _literal_aliases() -> dict[str, ast.expr]:
    """``Name = Literal[...]`` (or ``Name: TypeAlias = ...``) of every module of the package."""
    aliases: dict[str, ast.expr] = {}
    for name, value in _assignments():
        if "Literal" in ast.unparse(value):
            aliases.setdefault(name, value)
    return aliases


UNKNOWN = object()
"""A default or value this module cannot know without importing (an expression, a ``${...}``)."""


@cache
def _constants() -> dict[str, ast.expr]:
    """Module-level ``NAME = <expr>`` of the package (defaults such as ``DEFAULT_LORA_TARGETS``)."""
    found: dict[str, ast.expr] = {}
    for name, value in _assignments():
        if name.isupper():
            found.setdefault(name, value)
    return found


def _literal(node: ast.expr | None) -> Any:
    """A default's value when it is a literal (or names a literal constant), else UNKNOWN."""
    if node is None:
        return UNKNOWN
    if isinstance(node, ast.Name) and node.id in _constants():
        node = _constants()[node.id]
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return UNKNOWN


def _literal_strings(node: ast.expr, depth: int = 0) -> tuple[list[str], bool]:
    """The string choices in an annotation, and whether it also admits other types."""
    if depth > 5:
        return [], True
    if isinstance(node, ast.Constant) and node.value is None:
        return [], False  # Optional: None is always accepted (as null)
    if isinstance(node, ast.Constant) and isinstance(node.value, str):  # a string annotation
        try:
            return _literal_strings(ast.parse(node.value, mode="eval").body, depth + 1)
        except SyntaxError:
            return [], True
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        left, lo = _literal_strings(node.left, depth + 1)
        right, ro = _literal_strings(node.right, depth + 1)
        return left + right, lo or ro
    if isinstance(node, ast.Subscript):
        head = ast.unparse(node.value).split(".")[-1]
        items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if head == "Literal":
            strings = [i.value for i in items if isinstance(i, ast.Constant)]
            return [s for s in strings if isinstance(s, str)], any(
                not isinstance(s, str) for s in strings
            )
        if head in ("Optional", "Union"):
            found, other = [], False
            for item in items:
                got, more = _literal_strings(item, depth + 1)
                found, other = found + got, other or more
            return found, other
        return [], True
    if isinstance(node, ast.Name) and node.id in _literal_aliases():
        return _literal_strings(_literal_aliases()[node.id], depth + 1)
    if isinstance(node, ast.Name) and node.id == "None":
        return [], False
    return [], True


def _scalar(node: ast.expr) -> str | None:
    """``int``, ``float`` or ``bool`` when the annotation is exactly that, or it or None."""
    text = ast.unparse(node).strip("'\"").replace(" ", "")
    for name in ("int", "float", "bool"):
        if text in (name, f"{name}|None", f"None|{name}", f"Optional[{name}]"):
            return name
    return None


_BOOLS = {"true", "false", "yes", "no", "on", "off", "1", "0"}


def _is_scalar(value: str, kind: str) -> bool:
    """Whether ``value`` (as written) parses as ``kind``; null and interpolations pass."""
    if value in ("null", "None", "~", "") or "${" in value:
        return True
    try:
        if kind == "int":
            int(value)
        elif kind == "float":
            float(value)
        else:
            return value.lower() in _BOOLS
    except ValueError:
        return False
    return True


def _init_function(path: Path, class_name: str) -> ast.FunctionDef:
    """``class_name.__init__`` in the source file ``path``."""
    for node in ast.walk(_module_tree(path)):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    return item
    raise LookupError(f"{class_name}.__init__ not found in {path}")


def _init_options(path: Path, class_name: str) -> dict[str, Option]:
    """The keyword parameters of ``class_name.__init__`` in ``path``, with their string choices."""
    args = _init_function(path, class_name).args
    positional = [*args.posonlyargs, *args.args]
    defaults: dict[str, ast.expr | None] = {a.arg: None for a in [*positional, *args.kwonlyargs]}
    with_default = positional[len(positional) - len(args.defaults) :]
    for arg, default in zip(with_default, args.defaults, strict=True):
        defaults[arg.arg] = default
    for arg, default in zip(args.kwonlyargs, args.kw_defaults, strict=True):
        defaults[arg.arg] = default
    options = {}
    for arg in [*positional, *args.kwonlyargs][1:]:  # self
        strings, other = _literal_strings(arg.annotation) if arg.annotation else ([], True)
        choices = tuple(strings) if strings and not other else None
        scalar = _scalar(arg.annotation) if arg.annotation else None
        default = _literal(defaults[arg.arg])
        options[arg.arg] = Option(arg.arg, choices, tuple(strings), scalar, default)
    return options


def _lightning_trainer_source() -> Path | None:
    """Lightning's ``trainer.py``, located without importing Lightning."""
    spec = importlib.util.find_spec("lightning")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "pytorch" / "trainer" / "trainer.py"
    return path if path.is_file() else None


@cache
def signature_schema(section: str) -> Schema | None:
    """The schema of ``model``, ``data`` or ``trainer`` read from source; None if unavailable."""
    try:
        if section == "model":
            return Schema(section, _init_options(PACKAGE / "module.py", "MarbleModule"))
        if section == "data":
            return Schema(section, _init_options(PACKAGE / "data.py", "PromptDataModule"))
        if section == "trainer":
            source = _lightning_trainer_source()
            return None if source is None else Schema(section, _init_options(source, "Trainer"))
    except (OSError, SyntaxError, LookupError):
        return None  # leave it to jsonargparse
    return None


# ------------------------------------------------------------------ the command line


@dataclass
class Setting:
    """A value given for ``section.key``, and where: ``file:line`` or ``the command line``."""

    key: str  # dotted, e.g. "model.lora_rank"
    value: Any
    where: str


def _command_line(argv: list[str]) -> tuple[list[str], list[Setting]]:
    """The ``--config`` files and the ``--a.b value`` overrides of a subcommand's arguments."""
    configs: list[str] = []
    settings: list[Setting] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in ("--config", "-c"):
            if eq:
                configs.append(value)
            elif i + 1 < len(argv):
                configs.append(argv[i + 1])
                i += 1
        elif name.startswith("--") and "." in name and name[2:].split(".")[0] in TOP_LEVEL:
            key = name[2:]
            if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value = argv[i + 1]
                i += 1
            settings.append(Setting(key, value if (eq or value) else None, "the command line"))
        i += 1
    return configs, settings


def _mark(node: yaml.Node | None, path: str) -> str:
    return path if node is None else f"{path}:{node.start_mark.line + 1}"


def _yaml_settings(path: str, text: str) -> Iterator[Setting]:
    """``model.*``, ``data.*`` and ``trainer.*`` keys of a config file with their lines."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        context = getattr(err, "context", None)
        detail = f"{problem} ({context})" if context else problem
        raise UsageError(f"{where}: invalid YAML: {detail}") from None
    if root is None:
        raise UsageError(f"{path}: the config file is empty")
    if not isinstance(root, yaml.MappingNode):
        raise UsageError(f"{_mark(root, path)}: a config file must be a mapping of settings")
    for key_node, value_node in root.value:
        top = key_node.value
        if top in SUBCOMMANDS:
            raise UsageError(
                f"{_mark(key_node, path)}: {top!r} at the top of a config given to a subcommand: "
                f"drop the {top}: level (settings start at trainer:, model:, data:)"
            )
        if top not in TOP_LEVEL:
            raise UsageError(
                f"{_mark(key_node, path)}: unknown top-level key {top!r}"
                f"{did_you_mean(top, TOP_LEVEL)}; a config holds "
                + ", ".join(k for k in TOP_LEVEL if k != "config")
            )
        if top in ("model", "data", "trainer") and isinstance(value_node, yaml.MappingNode):
            for sub_key, sub_value in value_node.value:
                value: Any = None
                if isinstance(sub_value, yaml.ScalarNode):
                    value = sub_value.value
                yield Setting(f"{top}.{sub_key.value}", value, _mark(sub_key, path))


def _read_config(path: str) -> str:
    file = Path(path)
    if not file.is_file():
        near = ""
        parent = file.parent if str(file.parent) else Path(".")
        if parent.is_dir():
            names = [p.name for p in parent.iterdir() if p.suffix in (".yaml", ".yml", ".json")]
            hint = did_you_mean(file.name, names)
            near = hint.replace("'", f"'{parent}/", 1) if hint and str(parent) != "." else hint
        what = "is a folder, not a file" if file.is_dir() else "does not exist"
        raise UsageError(
            f"config file {path} {what} (working folder {os.getcwd()}){near}: give the path "
            "of a YAML file, e.g. --config configs/tiny.yaml"
        )
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"config file {path} cannot be read: {err}") from None


# ------------------------------------------------------------------ the checks


def _check_setting(setting: Setting) -> None:
    section, _, rest = setting.key.partition(".")
    key = rest.split(".")[0]
    schema = signature_schema(section)
    if schema is None or not key:
        return
    on_cli = setting.where == "the command line"
    if key not in schema.options:
        hint = did_you_mean(key, schema.options)
        if on_cli:
            hint = hint.replace("'", f"--{section}.", 1).replace("'?", "?")
            raise UsageError(
                f"unknown option --{section}.{key}{hint}; `marble fit --help` lists them"
            )
        raise UsageError(
            f"{setting.where}: {section} has no setting {key!r}{hint}; `marble fit --help` "
            "lists them"
        )
    option = schema.options[key]
    if rest != key or not isinstance(setting.value, str):
        return
    value = setting.value.strip()
    name = f"--{section}.{key}" if on_cli else f"{setting.where}: {section}.{key}"
    if option.choices is not None and value not in option.choices and value not in ("null", ""):
        raise UsageError(
            f"{name} is {value!r}, not one of {', '.join(option.choices)}"
            f"{did_you_mean(value, option.choices)}"
        )
    if option.scalar is not None and not _is_scalar(value, option.scalar):
        article = "an" if option.scalar == "int" else "a"
        raise UsageError(f"{name} is {value!r}, not {article} {option.scalar}")
    if section == "model" and key == "balancer":
        _check_balancer(value, option.literal, name)


def _torchjd_weightings() -> list[str]:
    """torchjd's weighting class names (``UPGrad``, ``MGDA``, ...), read from its source."""
    spec = importlib.util.find_spec("torchjd")
    if spec is None or not spec.submodule_search_locations:
        return ["UPGrad", "MGDA", "DualProj", "PCGrad", "IMTLG", "AlignedMTL", "Mean", "Random"]
    init = Path(next(iter(spec.submodule_search_locations))) / "aggregation" / "__init__.py"
    try:
        text = init.read_text(encoding="utf-8")
    except OSError:
        return []
    names = {
        alias.name.removesuffix("Weighting")
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
        if alias.name.endswith("Weighting") and alias.name != "Weighting"
    }
    return sorted(names)


def _balancer_classes() -> list[str]:
    """The :class:`~marble_pl.balancers.Balancer` subclasses defined in ``balancers.py``."""
    tree = _module_tree(PACKAGE / "balancers.py")
    found = {"Balancer"}
    changed = True
    while changed:
        changed = False
        for node in tree.body:
            if (
                isinstance(node, ast.ClassDef)
                and node.name not in found
                and any(ast.unparse(b).split(".")[-1] in found for b in node.bases)
            ):
                found.add(node.name)
                changed = True
    return sorted(found - {"Balancer"})


def _check_balancer(value: str, shortcuts: tuple[str, ...], where: str) -> None:
    """A balancer is a shortcut, a ``class_path`` or a mapping; torchjd must be installed."""
    if value.startswith("{") or value.startswith("[") or not value:
        if "GramianWeighting" in value:
            _require_torchjd(where)
        return
    if value in shortcuts:
        return
    if "." in value:  # a class path
        if value.endswith("GramianWeighting"):
            _require_torchjd(where)
        return
    classes = _balancer_classes()
    if value in classes:
        if value == "GramianWeighting":
            _require_torchjd(where)
        return
    weightings = _torchjd_weightings()
    match = did_you_mean(value, weightings)
    if match:
        name = match.split("'")[1]
        raise UsageError(
            f"{where} {value!r} is not a balancer; torchjd's {name} is "
            f"--model.balancer '{{class_path: {BALANCER_CLASS_PATH}, init_args: "
            f"{{weighting: {name}}}}}'"
        )
    raise UsageError(
        f"{where} {value!r} is not a balancer{did_you_mean(value, shortcuts)}: "
        f"use {', '.join(shortcuts)} or a class of marble_pl.balancers ({', '.join(classes)}) "
        "by class_path"
    )


def _installed(name: str) -> bool:
    """Whether ``name`` can be imported, found without importing it (a broken install: no)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _require_torchjd(where: str) -> None:
    if not _installed("torchjd"):
        raise UsageError(
            f"{where}: GramianWeighting needs torchjd, which is not installed: "
            'run pip install "marble-pl[balancers]"'
        )


def precheck(argv: list[str]) -> None:
    """Raise :class:`UsageError` for the first mistake found in ``argv`` without heavy imports.

    ``argv`` is the command without the program name (``["fit", "--config", ...]``). Commands
    other than the LightningCLI subcommands, and ``--help``, pass untouched.
    """
    if not argv or argv[0] not in SUBCOMMANDS or any(a in ("-h", "--help") for a in argv):
        return
    configs, overrides = _command_line(argv[1:])
    settings: list[Setting] = []
    for path in configs:
        settings.extend(_yaml_settings(path, _read_config(path)))
    for setting in [*settings, *overrides]:
        _check_setting(setting)
    _check_model_ranges([*settings, *overrides])
    if not any(a.startswith("--print_config") for a in argv):
        _check_prompt_files(argv[0], [*settings, *overrides])


def _value(raw: Any) -> Any:
    """A setting's value as YAML reads it (``8`` -> 8, ``[a, b]`` -> list), or UNKNOWN."""
    if not isinstance(raw, str) or "${" in raw:
        return UNKNOWN
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return UNKNOWN


def _check_model_ranges(settings: list[Setting]) -> None:
    """The numeric ``model.*`` rules of :mod:`marble_pl.ranges` on the final values (defaults from
    the signature), when every value they need is known here; else the module checks them."""
    from marble_pl import ranges

    schema = signature_schema("model")
    if schema is None:
        return
    values = {name: option.default for name, option in schema.options.items()}
    for setting in settings:
        section, _, key = setting.key.partition(".")
        if section == "model" and key in values:
            values[key] = _value(setting.value)
    wanted = inspect.signature(ranges.check_ranges).parameters
    checks = [
        (ranges.check_beta, ["beta"]),
        (ranges.check_guidance, ["guidance_scale"]),
        (ranges.check_ranges, list(wanted)),
    ]
    for check, names in checks:
        args = {n: values.get(n, UNKNOWN) for n in names}
        if any(v is UNKNOWN for v in args.values()):
            continue
        try:
            if check is ranges.check_ranges:
                check(**args)
            else:
                check(*args.values())
        except TypeError:  # a value of another type: jsonargparse will name it
            continue


PROMPT_FILES = {"fit": ("train_file", "val_file"), "validate": ("val_file",)}


def _check_prompt_files(subcommand: str, settings: list[Setting]) -> None:
    """Every prompt file the subcommand reads exists: all missing ones named in one line."""
    final = {s.key: s.value for s in settings}  # the last value given wins, as when parsing
    missing = []
    for key in PROMPT_FILES.get(subcommand, ()):
        value = final.get(f"data.{key}")
        if not isinstance(value, str) or value in ("null", "None", "~", "") or "${" in value:
            continue
        if not Path(value).expanduser().is_file():
            missing.append(f"data.{key} {value!r}")
    if missing:
        files = " and ".join(missing)
        raise UsageError(
            f"prompt file{'s' if len(missing) > 1 else ''} not found: {files} (relative paths "
            f"are resolved from {os.getcwd()}): create {'them' if len(missing) > 1 else 'it'} "
            "(one prompt per line, or .jsonl with a 'prompt' key) or point the setting at yours"
        )
