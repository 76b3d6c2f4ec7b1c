"""Stage registry: stages are found by name, including those of third-party packages.

A stage is a class with a `name` and a `run(state)` method. tbquant registers its own with
`@register_stage`; other packages expose theirs through the entry point group
`tbquant.stages`, for example in their `pyproject.toml`:

    [project.entry-points."tbquant.stages"]
    prune = "my_package.stages:PruneStage"
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import ClassVar, Protocol, runtime_checkable

from tbquant.errors import TbquantError
from tbquant.pipeline.state import PipelineState

ENTRY_POINT_GROUP = "tbquant.stages"

_STAGES: dict[str, type] = {}
_entry_points_loaded = False


@runtime_checkable
class Stage(Protocol):
    """One step of the pipeline: reads and updates the shared `PipelineState`."""

    name: ClassVar[str]

    def run(self, state: PipelineState) -> None: ...


def register_stage(cls: type) -> type:
    """Class decorator that registers a stage under its `name`."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"stage class {cls.__qualname__} needs a non-empty string attribute 'name'")
    if not callable(getattr(cls, "run", None)):
        raise TypeError(f"stage class {cls.__qualname__} needs a method run(self, state)")
    _STAGES[name] = cls
    return cls


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.name in _STAGES:
            continue
        try:
            cls = entry_point.load()
        except Exception as error:  # a broken plugin must not break the other stages
            raise TbquantError(f"cannot load stage {entry_point.name!r} from {entry_point.value}: {error}") from error
        if getattr(cls, "name", None) != entry_point.name:
            cls.name = entry_point.name
        register_stage(cls)


def available_stages() -> dict[str, type]:
    """Return every registered stage class by name, built-in and from entry points."""
    import tbquant.stages  # noqa: F401  registers the built-in stages

    _load_entry_points()
    return dict(sorted(_STAGES.items()))


def get_stage(name: str) -> type:
    """Return the stage class registered under `name`.

    Raises:
        TbquantError: if no stage has that name.
    """
    stages = available_stages()
    if name not in stages:
        raise TbquantError(f"unknown stage {name!r}: available stages are {', '.join(stages)}")
    return stages[name]
