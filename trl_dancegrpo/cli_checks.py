"""Checks of a command line that run before torch, transformers or diffusers are imported (those take 10 s or more).

The options of `trl-dancegrpo` are the fields of `ScriptArguments`, `ModelArguments` (plain dataclasses),
`DanceGRPOConfig` and `transformers.TrainingArguments`. The last two cannot be imported without torch, so their
fields are read from their source files with `ast`: names, simple types (bool, int, float, lists), literal defaults
and choices. That is enough to refuse an unknown or abbreviated option, a value of the wrong type and a value out of
range (`config_checks.check_values`) at once; the full parser then runs as before and has the last word.
"""

import argparse
import ast
import contextlib
import dataclasses
import difflib
import importlib.util
import os
import typing


UNKNOWN = object()  # a default that is not a literal (computed): checks depending on it are skipped


@dataclasses.dataclass
class OptionSpec:
    name: str
    annotation: str
    default: object = UNKNOWN
    choices: tuple | None = None
    help: str | None = None


def _literal(node):
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return UNKNOWN


def _constant_of_config_checks(node):
    """The tuple `list(NAME)` or `NAME` means when NAME is a constant of `config_checks`, else `UNKNOWN`."""
    from . import config_checks

    if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("list", "tuple") and len(node.args) == 1:
        node = node.args[0]
    value = getattr(config_checks, getattr(node, "id", ""), None)
    return tuple(value) if isinstance(value, (tuple, list)) else UNKNOWN


def fields_from_source(path: str, class_name: str) -> dict[str, OptionSpec]:
    """The annotated fields of the dataclass `class_name` in the Python file `path`, without importing it."""
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read(), filename=path)
    cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == class_name)
    specs = {}
    for node in cls.body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        spec = OptionSpec(node.target.id, ast.unparse(node.annotation))
        value = node.value
        if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "field":
            for keyword in value.keywords:
                if keyword.arg == "default":
                    spec.default = _literal(keyword.value)
                elif keyword.arg == "default_factory" and isinstance(keyword.value, ast.Lambda):
                    spec.default = _literal(keyword.value.body)
                elif keyword.arg == "metadata" and isinstance(keyword.value, ast.Dict):
                    for key, item in zip(keyword.value.keys, keyword.value.values):
                        if isinstance(key, ast.Constant) and key.value == "choices":
                            choices = _literal(item)
                            if choices is UNKNOWN:  # `list(SDE_TYPES)`: a constant of config_checks (light)
                                choices = _constant_of_config_checks(item)
                            spec.choices = tuple(choices) if choices is not UNKNOWN else None
                        elif isinstance(key, ast.Constant) and key.value == "help":
                            text = _literal(item)
                            spec.help = text if isinstance(text, str) else None
        elif value is not None:
            spec.default = _literal(value)
        specs[spec.name] = spec
    return specs


def fields_from_dataclass(cls) -> dict[str, OptionSpec]:
    hints = typing.get_type_hints(cls)
    specs = {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else UNKNOWN
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        annotation = str(hints[f.name]).replace("typing.", "").replace("NoneType", "None")
        annotation = {"<class 'bool'>": "bool", "<class 'str'>": "str", "<class 'int'>": "int"}.get(
            annotation, annotation
        )
        choices = tuple(f.metadata.get("choices", ())) or None
        specs[f.name] = OptionSpec(f.name, annotation, default, choices, f.metadata.get("help"))
    return specs


def _config_path() -> str:
    return os.path.join(os.path.dirname(__file__), "config.py")


def _training_args_path() -> str:
    spec = importlib.util.find_spec("transformers")  # finds the package without importing it
    return os.path.join(os.path.dirname(spec.origin), "training_args.py")


def all_option_specs(*dataclasses_) -> dict[str, OptionSpec]:
    """Options of `TrainingArguments`, then `DanceGRPOConfig` (overriding), then the given dataclasses."""
    specs = fields_from_source(_training_args_path(), "TrainingArguments")
    specs.update(fields_from_source(_config_path(), "DanceGRPOConfig"))
    for cls in dataclasses_:
        specs.update(fields_from_dataclass(cls))
    return specs


def _to_bool(value):
    if isinstance(value, bool):
        return value
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"Truthy value expected: got {value} but expected one of yes/no, true/false...")


_SCALARS = {"int": int, "float": float, "str": str}


def _add_option(parser, spec: OptionSpec, help: str | None = None) -> None:
    names = [f"--{spec.name}"] + ([f"--{spec.name.replace('_', '-')}"] if "_" in spec.name else [])
    annotation = spec.annotation.replace(" ", "")
    alternatives = [a for a in annotation.replace("Optional[", "").rstrip("]").split("|") if a != "None"]
    kwargs = {"dest": spec.name, "default": None if spec.default is UNKNOWN else spec.default}
    if help is not None:
        kwargs["help"] = help
    if alternatives == ["bool"]:
        kwargs.update(type=_to_bool, nargs="?", const=True)
    elif any(a.startswith("list[") for a in alternatives):
        element = annotation.split("list[", 1)[1].split("]", 1)[0]
        kwargs.update(type=_SCALARS.get(element, str) if len(alternatives) == 1 else str, nargs="+")
    elif len(alternatives) == 1 and alternatives[0] in _SCALARS:
        kwargs["type"] = _SCALARS[alternatives[0]]
    if spec.choices:
        kwargs["choices"] = spec.choices
    parser.add_argument(*names, **kwargs)
    if alternatives == ["bool"] and spec.default is True:
        no_names = [f"--no_{spec.name}"] + ([f"--no-{spec.name.replace('_', '-')}"] if "_" in spec.name else [])
        parser.add_argument(*no_names, dest=spec.name, action="store_false", help=help)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ValueError(message)


def did_you_mean(name: str, known) -> str:
    matches = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    return f" Did you mean {' or '.join(matches)}?" if matches else ""


def config_sections(docstring: str) -> dict[str, str]:
    """Field name -> the heading of `DanceGRPOConfig`'s docstring it is listed under ("sampling (the rollout)", ...)."""
    import re

    sections, current = {}, None
    for line in (docstring or "").splitlines():
        heading = re.match(r"\s*> Parameters that control (.+)", line)
        if heading:
            current = heading.group(1).strip()
            continue
        entry = re.match(r"\s{8}(\w+) \(`", line)
        if entry and current:
            sections[entry.group(1)] = current
    return sections


def config_docstring() -> str:
    """`DanceGRPOConfig`'s docstring, read from its source file (without importing torch)."""
    with open(_config_path(), encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "DanceGRPOConfig")
    return ast.get_docstring(cls, clean=False) or ""


def help_parser(model_arguments, script_arguments, option_group, leading: tuple, trailing: tuple):
    """The parser `--help` prints: every option of the full parser, built from the sources (no torch import), under
    the headings `option_group(name, origin, sections, own, inherited)` gives (the full parser's own rule), in the same
    order: the `leading` headings, the config's sections, then the `trailing` ones."""
    own = fields_from_source(_config_path(), "DanceGRPOConfig")
    inherited = fields_from_source(_training_args_path(), "TrainingArguments")
    sections = config_sections(config_docstring())
    parser = argparse.ArgumentParser(prog="trl-dancegrpo", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    titles = [*leading, *dict.fromkeys(sections.values()), *trailing]
    by_title = {title: parser.add_argument_group(title) for title in titles}
    placed = [(spec, "model") for spec in fields_from_dataclass(model_arguments).values()]
    placed += [(spec, "script") for spec in fields_from_dataclass(script_arguments).values()]
    placed += [(spec, "config") for spec in {**inherited, **own}.values()]
    for spec, origin in placed:
        title = option_group(spec.name, origin, sections, spec.name in own, spec.name in inherited)
        _add_option(by_title[title], spec, help=spec.help or "")
    for group in by_title.values():
        if not group._group_actions:
            parser._action_groups.remove(group)
    return parser


def load_recipe(path: str):
    """The YAML recipe at `path`; malformed YAML is one line naming the file, the line and the column."""
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            return yaml.safe_load(handle)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"--config {path}{where}: not valid YAML ({problem}).") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"--config {path}: cannot read the recipe ({error}).") from None


def precheck(argv: list[str], dataclasses_, defaults: dict | None = None, check_dataset: bool = True) -> None:
    """Raise a `ValueError` for an unknown option, a wrong value or a missing file in `argv`; imports nothing heavy.

    `check_dataset=False` leaves the prompt file alone (estimate-memory reads none: a recipe's data file need not be
    on the machine that estimates it)."""
    specs = all_option_specs(*dataclasses_)
    parser = _Parser(prog="trl-dancegrpo", add_help=False, allow_abbrev=False)
    for spec in specs.values():
        _add_option(parser, spec)
    parser.add_argument("--config")
    if defaults:
        parser.set_defaults(**defaults)
    argv = list(argv)
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise ValueError("--config needs the path of a YAML recipe.")
        path = argv[index + 1]
        if not os.path.isfile(path):
            raise ValueError(f"--config {path}: file not found.")
        recipe = load_recipe(path)
        if not isinstance(recipe, dict):
            raise ValueError(f"The recipe {path} must hold a YAML mapping of option names to values.")
        recipe.pop("env", None)
        for key in recipe:
            if key not in specs:
                raise ValueError(f"Unknown option {key!r} in the recipe {path}.{did_you_mean(key, specs)}")
        parser.set_defaults(**recipe)
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        option = next((item for item in unknown if item.startswith("-")), unknown[0])
        name = option.split("=", 1)[0].lstrip("-").replace("-", "_")
        prefixed = sorted(n for n in specs if n.startswith(name)) if option.startswith("--") else []
        hint = did_you_mean(name, specs)
        if prefixed and not hint:
            hint = f" Did you mean {' or '.join(prefixed[:3])}? (abbreviations are not accepted)"
        raise ValueError(f"unrecognized argument {option!r}.{hint}")
    for name, value in vars(namespace).items():  # YAML values are not converted by argparse: check them too
        spec = specs.get(name)
        if spec is not None and isinstance(value, str) and spec.annotation.replace(" | None", "") in ("int", "float"):
            try:
                setattr(namespace, name, _SCALARS[spec.annotation.replace(" | None", "")](value))
            except ValueError:
                raise ValueError(f"{name}: invalid {spec.annotation} value {value!r}.") from None
    from .config_checks import check_reward_weights_count, check_sde_window, check_values, parse_reward_kwargs
    from .rewards.registry import check_reward_kwargs_names, check_reward_name

    # a computed default, or a value only the full parser converts: left to the full check
    with contextlib.suppress(TypeError, AttributeError):
        check_values(namespace)
        check_sde_window(namespace)
    if check_dataset:
        check_dataset_name(namespace.dataset_name)
    reward_funcs = namespace.reward_funcs if isinstance(namespace.reward_funcs, list) else [namespace.reward_funcs]
    for name in reward_funcs:
        check_reward_name(name)
    check_reward_weights_count(namespace.reward_weights, len(reward_funcs))
    check_reward_kwargs_names(reward_funcs, parse_reward_kwargs(namespace.reward_kwargs))


DATA_FILE_EXTENSIONS = ("json", "jsonl", "csv", "parquet", "txt")


def looks_like_a_file(name: str) -> bool:
    """A dataset name meant as a local file: a known file extension, or a path (not a Hub id `org/name`)."""
    extension = os.path.splitext(name)[1].lower().lstrip(".")
    if extension in DATA_FILE_EXTENSIONS:
        return True
    return name.startswith((".", "~", os.sep)) or name.count("/") > 1 or "\\" in name


def check_dataset_name(name: str | None) -> None:
    if name is None or os.path.exists(os.path.expanduser(name)):
        return
    if looks_like_a_file(name):
        raise ValueError(
            f"--dataset_name {name}: file not found (a local .txt/.json/.jsonl/.csv/.parquet file, or a Hub dataset "
            "id such as 'org/name')."
        )
