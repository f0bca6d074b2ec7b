"""Configuration the nanoGPT way, through argparse: a script's defaults are plain annotated assignments
(`name: type = default  # help`) between a comment line ending in ` defaults` and one ending in ` end of
defaults`; config files (python assigning some of those names) are executed over them in order; then
`--key=value` overrides apply. Each key's type is declared once, on its line: int, float, bool, str, dict,
Size ('HxW'), JsonFile (a path, read at once), or `X | None`. The parser is generated from that block: every value, from a file or the command
line, is checked against its key's type (and the script's choices and lower bounds); `--help` lists every
key with its default and the comment on its line; unknown keys are refused. A mistake is a UserError: one
message, no traceback. The result is a Config: a dict whose keys read as attributes too (cfg.lr).

    cfg = parse_config(argv, DEFAULTS, TYPES, __file__, choices={'model': ('a', 'b')}, at_least={'epochs': 1})
"""
import argparse
import ast
import difflib
import json
import os
import re
import types
from fractions import Fraction


class UserError(Exception):
    """A user mistake or a fault in the user's files: printed as one message, exit code 1, no traceback."""


class BadValue(argparse.ArgumentTypeError, ValueError):
    """A value that does not parse: argparse prints its message; callers may catch it as a ValueError."""


class Config(dict):
    """The resolved configuration: a plain dict (JSON, checkpoints) whose keys also read as attributes."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


class JsonFile(dict):
    """The type of a JSON file's contents: a path on a command line or in a config file (read at once, so that
    config.json and checkpoints carry the contents), or the contents themselves in a config file."""


def read_json_file(text):
    try:
        with open(text) as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise BadValue(f"{text!r}: cannot read it as a JSON file ({e})") from None
    if not isinstance(value, dict):
        raise BadValue(f"{text!r}: expected a JSON object, got {type(value).__name__}")
    return value


class Size(list):
    """The type of an (H, W) pair of positive ints: 'HxW' on a command line (96x128), a tuple or list in a
    config file; the value is a plain [H, W] list (what JSON gives back)."""


def parse_size(text):
    """'96x128' (or '(96, 128)', '96,128') -> (96, 128): the one parser of sizes, for every command line."""
    words = str(text).lower().replace(',', 'x').strip('()[] ').split('x')
    try:
        h, w = (int(v) for v in words)
    except ValueError:
        raise BadValue(f"{text!r}: expected a size HxW, e.g. 96x128") from None
    if h < 1 or w < 1:
        raise BadValue(f"{text!r}: expected a size HxW of positive ints, e.g. 96x128")
    return [h, w]


def parse_fraction(text):
    """'1/4' or '0.25' -> Fraction(1, 4): the one parser of fractions (scales) for every command line."""
    try:
        return Fraction(str(text))
    except (ValueError, ZeroDivisionError):
        raise BadValue(f"{text!r}: expected a number, e.g. 0.25 or 1/4") from None


def _parse_bool(text):
    if text.lower() in ('true', '1', 'false', '0'):
        return text.lower() in ('true', '1')
    raise BadValue(f"{text!r}: expected a boolean (True/False/1/0)")


def _parse_dict(text):
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = None
    if not isinstance(value, dict):
        raise BadValue(f"{text!r}: expected a python dict, e.g. {{'semseg': 1.0}}")
    return value


def _parse_list(text):
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = None
    if not isinstance(value, (list, tuple)):
        raise BadValue(f"{text!r}: expected a python list")
    return list(value)


def _parse_int(text):
    try:
        return int(text)
    except ValueError:
        raise BadValue(f"{text!r}: expected an integer") from None


def _parse_float(text):
    try:
        return float(parse_fraction(text))
    except OverflowError:
        raise BadValue(f"{text!r}: out of the range of a float") from None


TEXT_PARSERS = {bool: _parse_bool, int: _parse_int, float: _parse_float, str: str, dict: _parse_dict,
                list: _parse_list, Size: parse_size, JsonFile: read_json_file}
NAMES = {bool: 'a boolean (True/False/1/0)', int: 'an integer', float: 'a number (e.g. 0.25 or 1/4)', str: 'a string',
         dict: 'a dict', list: 'a list', Size: 'a size HxW (e.g. 96x128)', JsonFile: 'a JSON file'}


def kinds(annotation):
    """The types a key may hold, from its annotation: (int,), (str, NoneType), ..."""
    return annotation.__args__ if isinstance(annotation, types.UnionType) else (annotation,)


def describe(annotation):
    return ' or '.join('None' if k is type(None) else NAMES[k] for k in kinds(annotation))


def from_text(key, annotation, text):
    """A command-line value -> a value of the key's type (argparse calls it)."""
    allowed = kinds(annotation)
    if text == 'None' and type(None) in allowed:
        return None
    for kind in allowed:
        if kind is not type(None):
            try:
                return TEXT_PARSERS[kind](text)
            except BadValue as e:
                if kind is JsonFile:                                  # say why the file does not read
                    raise argparse.ArgumentTypeError(f"--{key}={e}") from None
    raise argparse.ArgumentTypeError(f"--{key}={text}: expected {describe(annotation)}")


def from_python(key, annotation, value):
    """A config file's value -> the key's type (an int passes as a float, a pair as a Size), or a UserError."""
    for kind in kinds(annotation):
        if kind is type(None) and value is None:
            return None
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is Size and isinstance(value, (tuple, list)):
            return parse_size('x'.join(map(str, value)))
        if kind is Size and isinstance(value, str):
            return parse_size(value)
        if kind is JsonFile and isinstance(value, (str, dict)):
            return read_json_file(value) if isinstance(value, str) else value
        if kind is list and isinstance(value, (list, tuple)):
            return list(value)
        if kind in (bool, int, str, dict) and isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
            return value
    raise UserError(f"{key}={value!r}: expected {describe(annotation)}")


def default_comments(source):
    """key -> the comment on its line of the defaults block of the file `source`."""
    with open(source) as f:
        block = re.search(r'^#[^\n]* defaults\n(.*?)^#[^\n]* end of defaults$', f.read(), re.S | re.M).group(1)
    return dict(re.findall(r'^(\w+)\s*:[^=\n]*= .*?# (.*)$', block, re.M))


def metavar(annotation):
    return '|'.join('None' if k is type(None) else 'HxW' if k is Size else 'JSON' if k is JsonFile else k.__name__.upper()
                    for k in kinds(annotation))


def build_parser(defaults, annotations, source, choices, description):
    parser = Parser(prog=os.path.basename(source), description=description, allow_abbrev=False,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('configs', nargs='*', metavar='CONFIG', help='config files, applied in order')
    comments = default_comments(source)
    for key, default in defaults.items():
        parser.add_argument(f'--{key}', default=argparse.SUPPRESS, choices=choices.get(key),
                            type=lambda text, k=key: from_text(k, annotations[k], text),
                            metavar=None if key in choices else metavar(annotations[key]),
                            help=f"{comments.get(key, '')} (default: {default!r})".replace('%', '%%'))
    return parser


class Parser(argparse.ArgumentParser):
    def error(self, message):                     # not argparse's usage dump and exit code 2
        raise UserError(f"{message} (`python {self.prog} --help` lists every key)")


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


def check_value(key, value, choices, at_least):
    """A value of the right type must also be one of choices[key] and >= at_least[key] where those are given."""
    if key in choices and value not in choices[key]:
        raise UserError(f"{key}={value!r}: expected one of {', '.join(map(str, choices[key]))}")
    if key in at_least and isinstance(value, list) and min(value) < at_least[key]:             # a Size
        raise UserError(f"{key}={value!r}: expected (H, W), each >= {at_least[key]}")
    if key in at_least and isinstance(value, (int, float)) and value < at_least[key]:
        raise UserError(f"{key}={value!r}: must be >= {at_least[key]}")
    return value


def parse_config(argv, defaults, annotations, source, choices=None, at_least=None, description=None):
    """Command-line words -> Config: the defaults, then the config files in order, then the overrides."""
    choices, at_least = choices or {}, at_least or {}
    parser = build_parser(defaults, annotations, source, choices, description)
    args, unknown = parser.parse_known_intermixed_args(argv)
    if unknown:
        raise UserError(f"{unknown[0]}: {unknown_key(unknown[0].lstrip('-').split('=')[0], defaults)}")
    args = vars(args)
    cfg = Config(defaults)
    for path in args.pop('configs'):
        for key, value in read_config_file(path, defaults).items():
            try:
                cfg[key] = check_value(key, from_python(key, annotations[key], value), choices, at_least)
            except (UserError, ValueError) as e:
                raise UserError(f"{path}: {e}") from None
    cfg.update({k: check_value(k, v, choices, at_least) for k, v in args.items()})
    return cfg
