"""The tasks: data, model, loss and evaluation of each suite, one module per family. ``make_task`` picks one."""

from __future__ import annotations

from ..suites import Suite
from .base import Task
from .clm import CausalLMTask
from .distill import DistillTask
from .glue import GlueTask
from .planted import FamilyTask, PlantedTask

__all__ = ["CausalLMTask", "DistillTask", "FamilyTask", "GlueTask", "PlantedTask", "Task", "make_task"]


def make_task(suite: Suite) -> Task:
    """The task of ``suite``, by the family its name starts with."""
    if suite.name == "planted":
        return PlantedTask(suite)
    if suite.name.startswith("family-"):
        return FamilyTask(suite)
    if suite.name.startswith("distill"):
        return DistillTask(suite)
    if suite.name.startswith("clm"):
        return CausalLMTask(suite)
    if suite.name.startswith("glue-"):
        return GlueTask(suite)
    raise SystemExit(f"unknown suite {suite.name!r}")
