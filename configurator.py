"""
Settings for every script: a dataclass of typed fields, filled from config files and
command-line overrides, checked before any work starts.

    python train.py config/train_facts.py --batch_size=32 --dropout=0 --knn=[0,0,5]

A config file is plain Python (`n_layer = 6`) run in a namespace of its own; its public names
become settings. `--key=value` is parsed by the field's declared type. An unknown key stops
the script with the closest valid names; a value of the wrong type names the field and type;
a setting of another program (`load_program`) names the program that owns it; a renamed one (the
class's RENAMED table) names its new name. After the values are in, the class's validate() method
refuses values out of range, naming the setting and the allowed range (at_least, above, within,
one_of, need); it runs before any work.

    python train.py config/train_dnc_copy.py     # task='copy': train.py picks the class from `task`
"""

import ast
import dataclasses
import difflib
import os
import runpy
import sys
import types
import typing


class ConfigError(ValueError):
    pass


def _suggest(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _coerce(name: str, value, tp):
    """Check `value` against the type annotation `tp`, converting where it is lossless
    (int -> float, list -> tuple). Strings coming from the command line are parsed first."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # Optional[X], X | None, X | Y
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(name, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{name}: {value!r} is not a valid {_type_name(tp)}")
    if tp is typing.Any:
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a {_type_name(tp)}, got {value!r}")
        inner = args[0] if args else typing.Any
        items = [_coerce(f"{name}[{i}]", v, inner) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be True or False, got {value!r}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str) and isinstance(value, tp) and not isinstance(value, bool):
        return value
    raise ConfigError(f"{name} must be a {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _parse_cli_value(raw: str, tp):
    """Command-line text -> Python value: literals (numbers, lists, None, True) are parsed,
    anything else stays a string (`--dataset=facts` needs no quotes). Booleans also accept
    true/false/yes/no/1/0, since that is what people type."""
    wants_bool = tp is bool or bool in typing.get_args(tp)
    if wants_bool and raw.lower() in ("true", "yes", "1", "false", "no", "0"):
        return raw.lower() in ("true", "yes", "1")
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        if raw.lower() == "none":
            return None
        return raw


def read_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} not found")
    try:
        namespace = runpy.run_path(path)
    except SyntaxError as e:
        raise ConfigError(f"config file {path} has a syntax error at line {e.lineno}: {e.msg}; fix it") from None
    except Exception as e:
        raise ConfigError(f"config file {path} failed while running ({type(e).__name__}: {e}); fix it") from None
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and not isinstance(v, (types.ModuleType, types.FunctionType, type))}


def _settings(argv: list[str]):
    """(key, raw value, where, from the command line) for every setting argv gives, in order."""
    for arg in argv:
        if arg.startswith("--"):
            key, eq, raw = arg[2:].partition("=")
            if not eq:
                raise ConfigError(f"override '{arg}' needs a value: --{key}=VALUE")
            yield key, raw, "on the command line", True
        else:
            for key, value in read_config_file(arg).items():
                yield key, value, f"in {arg}", False


def peek(argv: list[str] | None, key: str, default=None):
    """The value argv gives `key` (its last config file or --key=value), without building any settings:
    what picks the settings class (train.py peeks `task`)."""
    value = default
    for k, raw, _, cli in _settings(sys.argv[1:] if argv is None else argv):
        if k == key:
            value = _parse_cli_value(raw, str) if cli else raw
    return value


def _unknown(cls, key: str, where: str, owners: dict) -> ConfigError:
    """The error for a key `cls` has no field for: renamed, owned by another program, or a typo."""
    renamed = getattr(cls, "RENAMED", {})
    if key in renamed:
        return ConfigError(f"setting '{key}' {where} was renamed to '{renamed[key]}': use {renamed[key]}")
    if key in owners:
        this = getattr(cls, "PROGRAM", cls.__name__)
        return ConfigError(f"setting '{key}' {where} belongs to {owners[key]}, not to {this} ({cls.__name__}): "
                           "drop it, or choose the program it belongs to")
    return ConfigError(f"unknown setting '{key}' {where}{_suggest(key, [f.name for f in dataclasses.fields(cls)])}")


def load_config(cls, argv: list[str] | None = None, owners: dict | None = None, ignore=(), **overrides):
    """Build a `cls` settings dataclass from argv (config files, then --key=value overrides,
    applied in order), then check it (cfg.validate(), if it has one). Keyword arguments act as overrides
    too (what tests use). owners: {key: the program that owns it} for keys of other programs (see
    load_program); ignore: keys this program reads past (bench.py reading a training config)."""
    argv = sys.argv[1:] if argv is None else argv
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values, ignored = {}, []
    given = [(k, v, where, cli) for k, v, where, cli in _settings(argv)]
    given += [(k, v, "in the keyword arguments", False) for k, v in overrides.items()]
    for key, value, where, cli in given:
        if key not in fields and key in ignore:
            ignored.append(key)
        elif key not in fields:
            raise _unknown(cls, key, where, owners or {})
        else:
            values[key] = _coerce(key, _parse_cli_value(value, hints[key]) if cli else value, hints[key])
    if ignored:
        print(f"note: {cls.__name__} does not use {', '.join(dict.fromkeys(ignored))}: ignored")
    cfg = cls(**values)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def load_program(programs: dict, argv: list[str] | None = None, key: str = "task", default: str = "", **overrides):
    """Settings for one of several programs, {value of key: settings class}: the class is the one
    the config files and overrides choose with `key`; a setting of another program's class is refused
    naming that program. Each class names itself in PROGRAM (e.g. "task='lm'")."""
    choice = overrides[key] if key in overrides else peek(argv, key, default)
    if choice not in programs:
        raise ConfigError(f"unknown {key} {choice!r}; choose one of {', '.join(map(repr, programs))}")
    cls, owners = programs[choice], {}
    for other in dict.fromkeys(programs.values()):
        for f in dataclasses.fields(other):
            owners.setdefault(f.name, []).append(f"{other.PROGRAM} ({other.__name__})")
    owners = {k: " and ".join(v) for k, v in owners.items()}
    return load_config(cls, argv, owners=owners, **overrides)


def format_config(cfg) -> str:
    return "\n".join(f"  {k} = {v!r}" for k, v in dataclasses.asdict(cfg).items())


# -----------------------------------------------------------------------------
# range checks, for the validate() method of a settings class: each names the setting, its value and
# what it must be

def need(ok: bool, message: str):
    if not ok:
        raise ConfigError(message)


def _values(cfg, name):
    """(label, value) of a setting, one per item for a list; None (an optional setting left out) skipped."""
    value = getattr(cfg, name)
    items = [(f"{name}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, (list, tuple)) else [(name, value)]
    return [(label, v) for label, v in items if v is not None]


def at_least(cfg, lo, *names):
    for name in names:
        for label, v in _values(cfg, name):
            need(v >= lo, f"{label}={v!r} is out of range: {name} must be >= {lo}")


def above(cfg, lo, *names):
    for name in names:
        for label, v in _values(cfg, name):
            need(v > lo, f"{label}={v!r} is out of range: {name} must be > {lo}")


def within(cfg, lo, hi, *names):
    """lo <= value < hi."""
    for name in names:
        for label, v in _values(cfg, name):
            need(lo <= v < hi, f"{label}={v!r} is out of range: {name} must be in [{lo}, {hi})")


def one_of(cfg, name, choices):
    allowed = " or ".join(", ".join(map(repr, choices)).rsplit(", ", 1))  # 'a', 'b' or 'c'
    for label, v in _values(cfg, name):
        need(v in choices, f"{label}={v!r} is not allowed: {name} must be {allowed}")
