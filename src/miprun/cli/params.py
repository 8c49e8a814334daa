"""Command-line options generated from the option dataclasses of :mod:`miprun.options`.

A command declares ``options: SomeOptions`` as its first parameter and is decorated with
:func:`with_options`: every leaf field becomes one ``--flag`` (its help, bounds and default taken from the
field), grouped in ``--help`` by the option group it belongs to, and the command receives the built,
checked options object. Defaults and descriptions therefore live in one place for the API and the CLI.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from miprun.errors import MiprunError
from miprun.options import Options, flag, flat_fields

# The flags several commands share that are not options of the API: the model, output handling, verbosity.
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Embedded name (smollm2-135m, gemma3-270m), local HF folder, .gguf file or hub name. "
        "Default: the embedded SmolLM2-135M-Instruct.",
    ),
]
QuietOpt = Annotated[
    bool,
    typer.Option(
        "--quiet", "-q", help="No progress bars, log lines or library warnings: results and errors."
    ),
]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")]
# -o/--out names a folder in every command; a command that writes one JSON file takes --json FILE. Its old
# spelling, --out FILE, still works there with a warning (hidden from --help).
OldOutOpt = Annotated[
    Path | None, typer.Option("--out", "-o", hidden=True, help="Deprecated: use --json FILE.")
]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace --out if it is an earlier miprun output (or empty); never anything else. The old "
        "output stays until the new one is complete.",
    ),
]

PANELS = {
    "CalibrationConfig": "Calibration",
    "EstimatorOptions": "Estimator",
    "ScoringOptions": "Method",
    "RepairOptions": "Repair",
    "HeldoutOptions": "Held-out evaluation",
    "RuntimeOptions": "Runtime",
    "OutputOptions": "Output",
    "BenchConfig": "Measurement",
}


# Options whose value names plugins: their help lists every registered plugin with its own summary, written
# when help is shown (listing them imports the plugins, which a plain run of another command need not do).
PLUGIN_OPTIONS = {
    "method": "methods",
    "methods": "methods",
    "estimator": "estimators",
    "repair": "repairs",
    "repairs": "repairs",
}


def plugin_listing(kind: str, default: Any = None) -> str:
    """Every plugin of ``kind`` (methods, estimators, repairs) with its summary; the default marked."""
    from miprun import estimators, methods, repair

    registries: dict[str, Any] = {
        "methods": methods.REGISTRY,
        "estimators": estimators.REGISTRY,
        "repairs": repair.REGISTRY,
    }
    entries = sorted(registries[kind].items(), key=lambda item: item[0] != default)  # the default first
    return " | ".join(
        f"{name}{' (default)' if name == default else ''}: {cls.summary}" for name, cls in entries
    )


def describe_plugins(app: typer.Typer) -> None:
    """Write into every plugin option's help the plugins registered now, from their own summaries."""
    for command in app.registered_commands:
        signature = getattr(command.callback, "__signature__", None)
        for parameter in signature.parameters.values() if signature is not None else ():
            kind = PLUGIN_OPTIONS.get(parameter.name)
            infos = [m for m in getattr(parameter.annotation, "__metadata__", ()) if hasattr(m, "help")]
            if kind is None or not infos:
                continue
            info = infos[0]
            base = info.help.split(" Choices: ")[0]
            default = parameter.default if isinstance(parameter.default, str) else None
            info.help = f"{base} Choices: {plugin_listing(kind, default)}. Parameters: `miprun list {kind}`."


def _owner(cls: type, path: tuple[str, ...]) -> type:
    """The option group class that holds a leaf reached through ``path``."""
    for name in path:
        cls = typing.get_type_hints(cls)[name]
    return cls


def _cli_type(hint: Any, f: dataclasses.Field) -> Any:
    """The type the command line reads: collections arrive as repeatable strings and are parsed after."""
    origin = typing.get_origin(hint)
    if origin in (list, dict) or f.metadata.get("parse") is not None:
        return list[str] | None
    return hint


def _parameter(name: str, f: dataclasses.Field, hint: Any, panel: str) -> inspect.Parameter:
    meta = f.metadata
    flags = list(meta.get("flags") or ()) or [flag(f)]
    text = meta.get("help", "")
    if name in PLUGIN_OPTIONS:
        text += f" Choices: `miprun list {PLUGIN_OPTIONS[name]}`."
    kwargs: dict[str, Any] = {"help": text, "rich_help_panel": panel}
    for bound in ("min", "max"):
        if meta.get(bound) is not None:
            kwargs[bound] = meta[bound]
    cli_type = _cli_type(hint, f)  # typer reads Literal[...] as a choice
    if typing.get_origin(hint) is dict:
        kwargs["metavar"] = "KEY=VALUE"
    elif typing.get_origin(hint) is list:
        kwargs["metavar"] = "A[,B...]"
    default: Any = None if cli_type == list[str] | None else f.default
    if default is dataclasses.MISSING:
        default = f.default_factory()  # type: ignore[misc,operator]
    annotation = Annotated[cli_type, typer.Option(*flags, **kwargs)]  # type: ignore[valid-type]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def build(cls: type, values: dict[str, Any]) -> Any:
    """An instance of the option class ``cls`` from flat leaf values (missing leaves keep their defaults)."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and issubclass(tp, Options):
            kwargs[f.name] = build(tp, values)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def with_options(cls: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Replace the command's ``options`` parameter by one CLI option per field of ``cls`` (see module doc)."""
    leaves = {name: (path, f) for name, (path, f) in flat_fields(cls).items() if f.metadata.get("cli", True)}

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        own = list(inspect.signature(fn).parameters.values())
        if not own or own[0].name != "options":
            raise TypeError(f"{fn.__name__} must take `options` as its first parameter")
        generated = []
        for name, (path, f) in leaves.items():
            owner = _owner(cls, path)
            hint = typing.get_type_hints(owner)[f.name]
            panel = PANELS.get(owner.__name__, "Options")
            generated.append(_parameter(name, f, hint, panel))

        @functools.wraps(fn)
        def command(cli_context: typer.Context, **kwargs: Any) -> Any:
            values = {}
            try:
                for name, (_, f) in leaves.items():
                    if name not in kwargs:
                        continue
                    raw = kwargs.pop(name)
                    if raw is None and (f.default_factory is not dataclasses.MISSING):  # type: ignore[misc]
                        continue  # a collection not given on the command line keeps its default
                    parse = f.metadata.get("parse")
                    try:
                        values[name] = parse(raw) if parse is not None else raw
                    except MiprunError as err:  # name the option whose value did not parse
                        raise typer.BadParameter(str(err), ctx=cli_context, param_hint=flag(f)) from err
                options = build(cls, values)
                from miprun.pipeline import check  # names are checked against the registries, too

                check(options)
                budget = getattr(options, "check_budget", None)  # e.g. neither --num-blocks nor --ratio
                if budget is not None:
                    budget()
            except MiprunError as err:  # a bad value on the command line: usage error, exit 2
                flag_named = re.search(r"\((--[a-z][a-z-]*)\)", str(err))
                hint = flag_named.group(1) if flag_named else None
                raise typer.BadParameter(str(err), ctx=cli_context, param_hint=hint) from err
            return fn(options, **kwargs)

        resolved = typing.get_type_hints(fn, include_extras=True)  # the command's own, from its module
        context = inspect.Parameter("cli_context", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
        params = (
            [context]
            + [
                p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=resolved.get(p.name, p.annotation))
                for p in own[1:]
            ]
            + generated
        )
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate


def json_path(
    console: Any, json_file: Path | None, old_out: Path | None, command: str
) -> tuple[Path | None, str]:
    """The JSON file a command writes and the flag that named it; ``--out FILE`` still works, with a warning."""
    if old_out is None:
        return json_file, "--json"
    if json_file is not None:
        raise typer.BadParameter("give the file once, as --json FILE (--out FILE is its old spelling)")
    console.print(
        f"miprun: warning: `{command} --out FILE` is deprecated: --out names a folder in every command; "
        f"write this file with --json {old_out}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    return old_out, "--out"
