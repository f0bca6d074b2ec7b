"""Configuration the nanoGPT way, through argparse: a script's defaults are plain assignments between a comment
line ending in ` defaults` and one ending in ` end of defaults`; config files (python assigning some of those names) are
executed over them in order; then `--key=value` overrides apply. The parser is generated from the
defaults: each value is parsed to its default's type, `--help` lists every key with its default and the
comment on its line, unknown keys are refused. A mistake is a UserError: one message, no traceback.

    cfg = parse_config(argv, DEFAULTS, __file__, choices={'model': ('a', 'b')}, at_least={'epochs': 1})
"""
import argparse
import ast
import difflib
import os
import re
from fractions import Fraction


class UserError(Exception):
    """A user mistake or a fault in the user's files: printed as one message, exit code 1, no traceback."""


class Parser(argparse.ArgumentParser):
    def error(self, message):                     # not argparse's usage dump and exit code 2
        raise UserError(f"{message} (`python {self.prog} --help` lists every key)")


def parse_value(key, default, text):
    """A command-line value, parsed against the type of the key's default."""
    if isinstance(default, bool):
        if text.lower() in ('true', '1', 'false', '0'):
            return text.lower() in ('true', '1')
        raise argparse.ArgumentTypeError(f"--{key}={text}: expected a boolean (True/False/1/0)")
    try:
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(Fraction(text))            # also '1/6'
    except (ValueError, ZeroDivisionError):
        kind = 'an integer' if isinstance(default, int) else 'a number (e.g. 0.25 or 1/4)'
        raise argparse.ArgumentTypeError(f"--{key}={text}: expected {kind}") from None
    if isinstance(default, str):
        return text
    try:                                            # None / tuple / dict defaults: a python literal ...
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text                                 # ... or a plain string (a path, '64x96')


def default_comments(source):
    """key -> the comment on its line of the defaults block of the file `source`."""
    with open(source) as f:
        block = re.search(r'^#[^\n]* defaults\n(.*?)^#[^\n]* end of defaults$', f.read(), re.S | re.M).group(1)
    return dict(re.findall(r'^(\w+) += .*?# (.*)$', block, re.M))


def build_parser(defaults, source, choices, description):
    parser = Parser(prog=os.path.basename(source), description=description, allow_abbrev=False,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('configs', nargs='*', metavar='CONFIG', help='config files, applied in order')
    comments = default_comments(source)
    for key, default in defaults.items():
        parser.add_argument(f'--{key}', default=argparse.SUPPRESS, choices=choices.get(key),
                            type=lambda text, k=key, d=default: parse_value(k, d, text),
                            metavar=None if key in choices else 'VALUE' if default is None else type(default).__name__.upper(),
                            help=f"{comments.get(key, '')} (default: {default!r})".replace('%', '%%'))
    return parser


def unknown_key(key, defaults):
    """The message for a key that is not a default's name, from a config file or the command line."""
    near = difflib.get_close_matches(key, defaults, 3)
    return (f"unknown key {key!r}" + (f" (did you mean {' or '.join(near)}?)" if near else '')
            + f". Valid keys: {', '.join(defaults)}")


def read_config_file(path, defaults):
    """The names a config file assigns."""
    if not os.path.isfile(path):
        raise UserError(f"config file {path!r} not found (configs are in configs/, e.g. "
                        f"configs/synthetic_ctal_ss.py)")
    namespace = {}
    try:
        with open(path) as f:
            exec(compile(f.read(), path, 'exec'), {}, namespace)
    except Exception as e:                          # the user's code: report where, do not trace
        tb = e.__traceback__.tb_next
        line = getattr(e, 'lineno', None) or (tb.tb_lineno if tb else '?')
        raise UserError(f"config file {path}, line {line}: {type(e).__name__}: {e} (a config holds plain "
                        f"assignments such as `model = 'mtl'`; strings need quotes)") from None
    namespace = {k: v for k, v in namespace.items() if not k.startswith('_')}
    unknown = [k for k in namespace if k not in defaults]
    if unknown:
        raise UserError(f"{path}: {unknown_key(unknown[0], defaults)}")
    return namespace


def check_value(key, value, default, choices, at_least):
    """A config file may assign any python value: it must have its default's type (an int passes as a
    float), be one of choices[key] and >= at_least[key] where those are given."""
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok, what = {bool: (isinstance(value, bool), 'True or False'), float: (numeric, 'a number'),
                int: (numeric and isinstance(value, int), 'an integer'),
                str: (isinstance(value, str), 'a string')}.get(type(default), (True, ''))
    if not ok:
        raise UserError(f"{key}={value!r}: expected {what}")
    if key in choices and value not in choices[key]:
        raise UserError(f"{key}={value!r}: expected one of {', '.join(map(str, choices[key]))}")
    if key in at_least and value < at_least[key]:
        raise UserError(f"{key}={value!r}: must be >= {at_least[key]}")
    return float(value) if isinstance(default, float) else value


def parse_config(argv, defaults, source, choices=None, at_least=None, description=None):
    """Command-line words -> {key: value}: defaults, then the config files in order, then the overrides."""
    choices, at_least = choices or {}, at_least or {}
    parser = build_parser(defaults, source, choices, description)
    args, unknown = parser.parse_known_intermixed_args(argv)
    if unknown:
        raise UserError(f"{unknown[0]}: {unknown_key(unknown[0].lstrip('-').split('=')[0], defaults)}")
    args = vars(args)
    cfg = dict(defaults)
    for path in args.pop('configs'):
        for key, value in read_config_file(path, defaults).items():
            try:
                cfg[key] = check_value(key, value, defaults[key], choices, at_least)
            except UserError as e:
                raise UserError(f"{path}: {e}") from None
    cfg.update({k: check_value(k, v, defaults[k], choices, at_least) for k, v in args.items()})
    return cfg
