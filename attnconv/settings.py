"""One settings dataclass per command: its CLI options, checks, recipe keys and provenance all come from it.

A command's settings are a frozen dataclass whose fields are declared with `option(...)`: the default, the help
text, the command-line flag and the limits of the value. Constructing the dataclass validates every field with
the same wording everywhere (`--lr must be a number > 0, not -1.0`) and then the class's own `check()` for rules
between fields, so a value is checked in one place whether it came from the command line, a recipe or Python.
`command(SettingsClass, run)` builds the typer command, so a new option is written once. Torch-free.
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import inspect
import math
import os
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass
from typing import Any, ClassVar

from attnconv.errors import AttnconvError

MAX_DIGITS = 30
_INTEGER = re.compile(rf"[+-]?[0-9]{{1,{MAX_DIGITS}}}")
_LABELS: contextvars.ContextVar[str] = contextvars.ContextVar("attnconv_setting_labels", default="flag")


@dataclass(frozen=True)
class Spec:
    """How one setting is offered and checked."""

    help: str
    flag: str | None = None  # default: --field-name
    short: str | None = None
    argument: bool = False  # a positional command-line argument
    choices: tuple[str, ...] | None = None
    aliases: Mapping[str, str] | None = None  # other names accepted for a choice ("bf16" -> "bfloat16")
    minimum: float | None = None  # inclusive
    above: float | None = None  # exclusive
    maximum: float | None = None  # inclusive
    envvar: str | None = None
    secret: bool = False  # never recorded (hub tokens)
    run: bool = True  # changes what the command computes: recorded, and compared when a run resumes
    cli: bool = True  # offered on the command line
    recorded: bool = True  # False: only changes what is shown (--quiet), not worth recording
    metavar: str | None = None
    # What the value names on disk, for recipes (attnconv/recipes): 'model' (a model folder or hub id), 'folder' (a
    # local model folder), 'data' (a --data SPEC), 'path' (a local file or folder) read by the command; 'out' written.
    io: str | None = None


def option(default: Any = MISSING, *, help: str, **spec: Any) -> Any:
    """A settings field. `default` omitted: required. Lists and tuples are stored as tuples (frozen)."""
    if isinstance(default, list):
        default = tuple(default)
    return dataclasses.field(default=default, metadata={"spec": Spec(help=help, **spec)})


# The options several commands share, declared once so that they read the same everywhere.
def overwrite_option(what: str = "OUT") -> Any:
    return option(False, help=f"Replace {what} if it exists (in one step, once the new one is complete).", run=False)


def allow_pickle_option() -> Any:
    return option(False, help="Accept pickle weights (pytorch_model*.bin), read with torch.load(weights_only=True).")


def quiet_option() -> Any:
    return option(False, help="No progress bars; print only the result.", run=False, recorded=False)


def _unwrap_optional(tp) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _item_type(tp) -> Any | None:
    """int for tuple[int, ...]; None for scalars."""
    if typing.get_origin(tp) in (tuple, list):
        return typing.get_args(tp)[0]
    return None


class Settings:
    """Base of every command's settings dataclass (declare subclasses with `@dataclass(frozen=True)`)."""

    command_name: ClassVar[str] = ""  # 'convert', 'uptrain', ...: names the recipe stage in messages

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            spec = f.metadata.get("spec")
            if spec is None:
                continue
            value = self._normalise(f.name, hints[f.name], spec, getattr(self, f.name))
            object.__setattr__(self, f.name, value)
        self.check()

    def check(self) -> None:
        """Rules between fields; raise self.error(...)."""

    @classmethod
    def label(cls, name: str) -> str:
        """How a setting is named to the user: its flag on the command line, `stage.key` in a recipe."""
        if _LABELS.get() == "key":
            return f"{cls.command_name}.{name}" if cls.command_name else name
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        spec = f.metadata["spec"]
        if spec.argument:
            return name.upper()
        return spec.flag or "--" + name.replace("_", "-")

    def error(self, name: str, expected: str, value: Any) -> AttnconvError:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**MAX_DIGITS:
            shown = f"an integer of {len(hex(value)) - 2} hex digits"  # str() of a huge int raises
        else:
            shown = repr(value)
            shown = shown if len(shown) <= 60 else shown[:40] + f"... ({len(shown)} characters)"
        return AttnconvError(f"{self.label(name)} must be {expected}, not {shown}")

    def _normalise(self, name: str, tp, spec: Spec, value: Any) -> Any:
        base, optional = _unwrap_optional(tp)
        if value is None:
            if optional:
                return None
            raise AttnconvError(f"{self.label(name)} is required")
        item = _item_type(base)
        if item is not None:
            if isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()]
            elif isinstance(value, int | float) and not isinstance(value, bool):
                value = [value]  # one value where a list is allowed
            if not isinstance(value, list | tuple) or not value:
                raise self.error(name, f"a non-empty list of {item.__name__} values", value)
            return tuple(self._scalar(name, item, spec, v) for v in value)
        return self._scalar(name, base, spec, value)

    def _scalar(self, name: str, tp, spec: Spec, value: Any) -> Any:
        if tp is bool:
            if not isinstance(value, bool):
                raise self.error(name, "true or false", value)
            return value
        if tp is int:
            # ASCII digits only ('²' is a digit to str.isdigit but not to int()), one sign, and few enough digits
            # that int() accepts them (it refuses over 4,300) and no count or size could need more.
            if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int) or abs(value) >= 10**MAX_DIGITS:
                raise self.error(name, "an integer" + self._range_text(spec), value)
        elif tp is float:
            if isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    raise self.error(name, "a number" + self._range_text(spec), value) from None
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise self.error(name, "a finite number" + self._range_text(spec), value)
            value = float(value)
        elif tp is str:
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
            elif isinstance(value, int | float) and not isinstance(value, bool):
                value = str(value)  # a recipe's `limit: 0.1` is the text "0.1"
            if not isinstance(value, str):
                raise self.error(name, "a string", value)
            if spec.aliases:
                value = spec.aliases.get(value, value)
            if spec.choices is not None and value not in spec.choices:
                raise self.error(name, f"one of {', '.join(spec.choices)}", value)
            return value
        if (spec.minimum is not None and value < spec.minimum or spec.above is not None and value <= spec.above
                or spec.maximum is not None and value > spec.maximum):
            kind = "an integer" if tp is int else "a number"
            raise self.error(name, kind + self._range_text(spec), value)
        return value

    @staticmethod
    def _range_text(spec: Spec) -> str:
        parts = []
        if spec.minimum is not None:
            parts.append(f">= {spec.minimum:g}")
        if spec.above is not None:
            parts.append(f"> {spec.above:g}")
        if spec.maximum is not None:
            parts.append(f"<= {spec.maximum:g}")
        return (" " + " and ".join(parts)) if parts else ""

    def record(self) -> dict[str, Any]:
        """The settings as JSON-able values for provenance (secrets and display-only options left out)."""
        out = {}
        for f in dataclasses.fields(self):
            spec = f.metadata.get("spec")
            if spec is None or spec.secret or not spec.recorded:
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Each setting's default, in the form `record()` writes (for records made before a setting existed)."""
        out = {}
        for f in dataclasses.fields(cls):
            if f.default is dataclasses.MISSING:
                continue
            out[f.name] = list(f.default) if isinstance(f.default, tuple) else f.default
        return out

    @classmethod
    def io_fields(cls) -> dict[str, str]:
        """{setting: what it names on disk} (Spec.io) for the settings that name one."""
        return {f.name: f.metadata["spec"].io for f in dataclasses.fields(cls)
                if "spec" in f.metadata and f.metadata["spec"].io}

    def run_values(self) -> dict[str, Any]:
        """The settings that change what the command computes (compared when a run resumes)."""
        fields = {f.name: f.metadata["spec"] for f in dataclasses.fields(self) if "spec" in f.metadata}
        return {k: v for k, v in self.record().items() if fields[k].run}

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], **fixed: Any):
        """Settings from a recipe's mapping: unknown keys, wrong types and impossible values are refused with
        the key's name (`uptrain.lr must be ...`); the first problem is raised (`mapping_problems` lists all)."""
        settings, problems = cls._from_mapping(values, fixed)
        if problems:
            raise AttnconvError(problems[0][1])
        return settings

    @classmethod
    def mapping_problems(cls, values: Mapping[str, Any], **fixed: Any) -> list[tuple[str | None, str]]:
        """Every problem of a recipe's mapping, as (key or None, message): each unknown key (with the closest
        known one), each missing, mistyped or impossible value; the rules between fields once every value is good."""
        return cls._from_mapping(values, fixed)[1]

    @classmethod
    def _from_mapping(cls, values: Mapping[str, Any], fixed: Mapping[str, Any]):
        fields = {f.name: f for f in dataclasses.fields(cls) if "spec" in f.metadata}
        hints = typing.get_type_hints(cls)
        problems: list[tuple[str | None, str]] = []
        token = _LABELS.set("key")
        try:
            for key in values:
                if key not in fields:
                    close = difflib.get_close_matches(str(key), sorted(fields), n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(fields))}"
                    problems.append((str(key), f"{cls.label(str(key))} is not a setting of "
                                                f"{cls.command_name or 'this'}{hint}"))
            merged = {k: v for k, v in {**values, **fixed}.items() if k in fields}
            probe = object.__new__(cls)  # checks one field at a time, so every bad value is reported
            for name, f in fields.items():
                if name not in merged:
                    if f.default is MISSING:
                        problems.append((name, f"{cls.label(name)} is required"))
                    continue
                try:
                    probe._normalise(name, hints[name], f.metadata["spec"], merged[name])
                except AttnconvError as e:
                    problems.append((name, str(e)))
            if problems:
                return None, problems
            try:
                return cls(**merged), problems
            except AttnconvError as e:
                return None, [(None, str(e))]
        finally:
            _LABELS.reset(token)

def _cli_parameter(cls: type[Settings], f: dataclasses.Field, tp) -> inspect.Parameter:
    import typer

    spec: Spec = f.metadata["spec"]
    base, optional = _unwrap_optional(tp)
    help_text = spec.help
    if spec.choices and "one of" not in help_text:
        help_text += f" One of: {', '.join(spec.choices)}."
    required = f.default is MISSING
    default = None if required and optional else f.default
    if isinstance(default, tuple):
        default = ",".join(map(str, default))
    if spec.argument:
        if typing.get_origin(base) in (tuple, list):  # a variadic argument: MODEL [MODEL ...]
            annotation = list[str]
        else:
            annotation = str if base is not int else int
        info = typer.Argument(... if required and not optional else default, help=help_text, show_default=False,
                              metavar=spec.metavar or f.name.upper())
    else:
        names = [spec.flag or "--" + f.name.replace("_", "-")]
        if base is bool:
            annotation = bool
            if default is True:
                names = [f"{names[0]}/--no-{names[0][2:]}"]
        else:
            # Every value reaches the settings as text: one set of checks and messages for all commands.
            annotation = str | None if optional or default is None else str
            if default is not None and not isinstance(default, str):
                default = str(default)
        if spec.short:
            names.append(spec.short)
        item = _item_type(base)
        metavar = spec.metavar or (None if base is bool else "[" + "|".join(spec.choices) + "]" if spec.choices
                                   else "N,N,..." if item is not None else {int: "INTEGER", float: "NUMBER"}.get(
                                       base, "TEXT"))
        info = typer.Option(default, *names, help=help_text, envvar=spec.envvar, metavar=metavar,
                            show_default=not spec.secret and default not in (None, False))
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation)


def _help_text(doc: str | None) -> str | None:
    """A docstring as click shows it: prose paragraphs rewrapped to the terminal, indented ones (examples) kept
    line for line (click's \\b marker)."""
    if not doc:
        return doc
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join("\b\n" + p if p.startswith((" ", "\t")) else p for p in paragraphs)


def command(cls: type[Settings], run: Callable[[Any], Any]) -> Callable[..., None]:
    """A typer command over the settings' CLI fields that builds the settings and calls `run(settings)`; its help
    is run's docstring."""
    hints = typing.get_type_hints(cls)
    offered = [f for f in dataclasses.fields(cls) if "spec" in f.metadata and f.metadata["spec"].cli]
    params = [_cli_parameter(cls, f, hints[f.name]) for f in offered]

    def cli(**values: Any) -> None:
        run(cls(**values))

    cli.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    cli.__annotations__ = {p.name: p.annotation for p in params}
    cli.__doc__ = _help_text(run.__doc__)
    cli.__name__ = getattr(run, "__name__", cls.__name__)
    return cli
