"""The click that Typer runs on: recent Typer releases vendor it as `typer._click`, older ones
import the `click` package."""

import importlib

import typer

click = getattr(typer, "_click", None) or importlib.import_module("click")
exceptions = importlib.import_module(f"{click.__name__}.exceptions")
ParameterSource = importlib.import_module(f"{click.__name__}.core").ParameterSource
