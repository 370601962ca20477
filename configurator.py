"""
nanoGPT's configuration, kept strict: a dataclass's defaults, then python config files (assignments) in order, then
--key=value. Each key is declared once in its dataclass (`option`: default, help, allowed values, heading of its
group), and --help is printed from there. An unknown key is an error that names the closest known one; a value
must have its default's type.
"""

import ast
import difflib
import os
import sys
from dataclasses import field, fields

from common import UserError


def option(default, help="", choices=None, group=None):
    """A config key's default, with what --help says about it, the values it may take (None: any of its type) and,
    on a group's first key, the group's heading."""
    return field(default=default, metadata={"help": help, "choices": choices, "group": group})


def parse_config(config_class, argv, defaults=None, description=""):
    """config_class(**defaults) changed by argv: config files and --key=value overrides, in order. -h/--help prints
    `description` and every key, then exits."""
    cfg = config_class(**(defaults or {}))
    for arg in argv:
        if arg in ("-h", "--help"):
            print(config_help(cfg, description))
            sys.exit(0)
        if arg.startswith("-") and not arg.startswith("--"):
            raise UserError(f"{arg}: expected a config file or --key=value (--help lists the keys)")
        if arg.startswith("--"):
            key, eq, raw = arg[2:].partition("=")
            if not eq:
                raise UserError(f"{arg}: expected --key=value")
            f = known_field(cfg, key, arg)
            text = f.type is str and all(type(c) is str for c in f.metadata.get("choices") or ())  # not compile's True
            assign(cfg, key, raw if text else literal(raw), arg)
        else:
            for key, value in read_config_file(arg).items():
                assign(cfg, key, value, arg)
    return cfg


def known_field(cfg, key, where):
    """The dataclass field of a key; an unknown key is an error that names the closest known one."""
    known = {f.name: f for f in fields(cfg)}
    if key not in known:
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"{where}: unknown config key {key!r}{hint}")
    return known[key]


def literal(raw):
    """A --key=value value as python reads it (1e3, True, 'x'); true/false in any case, and otherwise the string."""
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return {"true": True, "false": False}.get(raw.lower(), raw)


def assign(cfg, key, value, where):
    """cfg.key = value, checked against the key's type (an int passes as a float, 1e3 as an int) and choices."""
    f = known_field(cfg, key, where)
    want, choices = f.type, f.metadata.get("choices")
    if choices:  # of any type (compile: 'auto', True, False)
        if not any(type(value) is type(c) and value == c for c in choices):
            raise UserError(f"{where}: {key}={value!r}, expected one of {', '.join(map(str, choices))}")
        setattr(cfg, key, value)
        return
    if want is float and type(value) is int:
        value = float(value)
    if want is int and type(value) is float and value.is_integer():  # --max_iters=1e3
        value = int(value)
    if type(value) is not want:
        article = "an" if want.__name__[0] in "aeiou" else "a"
        raise UserError(f"{where}: {key}={value!r} is a {type(value).__name__}, expected {article} {want.__name__}")
    setattr(cfg, key, value)


def config_help(cfg, description=""):
    """Every key with its value in `cfg` (the defaults), its allowed values and its help, under its group's heading."""
    lines = [description.strip(), "",
             "Keys (--key=value, or key = value in a config file), their defaults and meaning:"]
    for f in fields(cfg):
        if f.metadata.get("group"):
            lines += ["", f"# {f.metadata['group']}"]
        choices, text = f.metadata.get("choices"), f.metadata.get("help", "")
        if choices:
            text = " | ".join(map(str, choices)) + (f" ({text})" if text else "")
        lines.append(f"  --{f.name}={getattr(cfg, f.name)!r}" + (f"  # {text}" if text else ""))
    return "\n".join(lines)


def read_config_file(path):
    """The assignments of a python config file (checked by the caller): it runs with __file__ set to its path, so
    it finds its base config from any working directory; modules, functions and names starting with '_' in it are
    helpers, not config keys."""
    if not os.path.isfile(path):
        what = "is a directory, not a config file" if os.path.isdir(path) else "config file not found"
        raise UserError(f"{path}: {what}")
    namespace = {}
    try:
        exec(compile(open(path, encoding="utf-8").read(), path, "exec"), {"__file__": os.path.abspath(path)},
             namespace)
    except SyntaxError as e:
        raise UserError(f"{path}, line {e.lineno}: syntax error ({e.msg})") from None
    except Exception as e:
        raise UserError(f"{path}: the config file raised {type(e).__name__}: {e}") from None
    return {key: value for key, value in namespace.items()
            if not key.startswith("_") and not callable(value) and type(value).__name__ != "module"}
