"""The tasks: data, model, loss and evaluation of each suite, one module per family. ``make_task`` picks one."""

from __future__ import annotations

from ..suites import Suite
from .base import Task
from .clm import CausalLMTask
from .distill import DistillTask
from .glue import GlueTask
from .planted import FamilyTask, PlantedTask

__all__ = [
    "CausalLMTask",
    "DistillTask",
    "FamilyTask",
    "GlueTask",
    "PlantedTask",
    "Task",
    "make_task",
    "task_class",
]


def task_class(suite: Suite) -> type[Task]:
    """The task family of ``suite``, by the name it starts with."""
    if suite.name == "planted":
        return PlantedTask
    if suite.name.startswith("family-"):
        return FamilyTask
    if suite.name.startswith("distill"):
        return DistillTask
    if suite.name.startswith("clm"):
        return CausalLMTask
    if suite.name.startswith("glue-"):
        return GlueTask
    raise SystemExit(f"unknown suite {suite.name!r}")


def make_task(suite: Suite) -> Task:
    """The task of ``suite`` (loads its data and models)."""
    return task_class(suite)(suite)
