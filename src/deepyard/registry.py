"""Name -> builder tables, one per extension point (models, data sets, optimizers; tasks and job kinds
have their own: ``tasks.TASKS``, ``spec.KINDS``).

A builder's keyword arguments are the schema of its ``params:`` in a spec, so a spec can be
checked against it before anything is built. Names from YAML resolve here, never as import paths.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable, Generic, TypeVar

import pydantic

from deepyard.errors import UnknownName

Builder = TypeVar("Builder", bound=Callable[..., Any])


def closest(name: str, choices: list[str]) -> str | None:
    matches = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return matches[0] if matches else None


def did_you_mean(name: str, choices: list[str]) -> str:
    """``"; did you mean 'epochs'?"`` for the closest choice, or nothing."""
    hint = closest(name, choices)
    return f"; did you mean {hint!r}?" if hint else ""


def unknown_name_message(what: str, name: str, choices: list[str]) -> str:
    return f"unknown {what} {name!r}{did_you_mean(name, choices)} (valid: {', '.join(sorted(choices))})"


class Registry(Generic[Builder]):
    def __init__(self, what: str, injected: tuple[str, ...] = ()):
        self.what = what
        # Arguments the runner supplies (input shape, number of outputs...), never the spec.
        self.injected = injected
        self._builders: dict[str, Builder] = {}
        self._checks: dict[str, Callable[[Any], None]] = {}

    def register(self, name: str, check: Callable[[Any], None] | None = None) -> Callable[[Builder], Builder]:
        """``check``: what the annotations cannot say (one argument's value needs another's); it gets
        the validated params and raises ValueError, before anything is built."""
        def add(builder: Builder) -> Builder:
            if name in self._builders:
                raise ValueError(f"{self.what} {name!r} is registered twice")
            self._builders[name] = builder
            if check:
                self._checks[name] = check
            return builder

        return add

    def names(self) -> list[str]:
        return sorted(self._builders)

    def __contains__(self, name: str) -> bool:
        return name in self._builders

    def get(self, name: str) -> Builder:
        if name not in self._builders:
            raise UnknownName(unknown_name_message(self.what, name, self.names()))
        return self._builders[name]

    def params_model(self, name: str) -> type[pydantic.BaseModel]:
        """A pydantic model of the builder's user-facing keyword arguments."""
        signature = inspect.signature(self.get(name), eval_str=True)
        fields: dict[str, Any] = {}
        for param in signature.parameters.values():
            if param.name in self.injected or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            annotation = Any if param.annotation is param.empty else param.annotation
            default = ... if param.default is param.empty else param.default
            fields[param.name] = (annotation, default)
        return pydantic.create_model(
            f"{name}_params", __config__=pydantic.ConfigDict(extra="forbid"), **fields
        )

    def accepts(self, name: str, argument: str) -> bool:
        return argument in inspect.signature(self.get(name)).parameters

    def validated(self, name: str, params: dict[str, Any]) -> pydantic.BaseModel:
        """``params`` checked as building would check them, without building (ValueError: pydantic's
        ValidationError is one)."""
        checked = self.params_model(name).model_validate(params)
        if name in self._checks:
            self._checks[name](checked)
        return checked

    def build(self, name: str, params: dict[str, Any], **injected: Any) -> Any:
        """The builder called with the spec's ``params`` and the injected arguments it takes."""
        checked = self.validated(name, params)
        injected = {key: value for key, value in injected.items() if self.accepts(name, key)}
        return self.get(name)(**injected, **checked.model_dump())
