"""A model with a known answer: independent branches, a teacher with low-rank changes planted in some of them.

``Branches`` maps ``x = [x_0 | x_1 | x_2]`` to ``[l0(x_0) | l1(x_1) | l2(x_2)]``: each ``Linear`` only affects its own
output block, so the student's gradient in a branch is exactly the planted change seen through the inputs, and
the best allocation is known (the planted ranks).
"""

from __future__ import annotations

import torch
from torch import nn

WIDTH = 48
PLANTED = {"branches.1": 3, "branches.2": 1}  # module -> rank of the planted change; branches.0 unchanged


class Branches(nn.Module):
    def __init__(self, width: int = WIDTH, count: int = 3):
        super().__init__()
        self.width = width
        self.branches = nn.ModuleList(nn.Linear(width, width) for _ in range(count))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunks = x.split(self.width, dim=-1)
        return torch.cat([branch(chunk) for branch, chunk in zip(self.branches, chunks)], dim=-1)


def planted_pair(seed: int = 0) -> tuple[Branches, Branches, dict[str, torch.Tensor]]:
    """(student base, teacher, planted changes by module name); the changes have singular values 1."""
    torch.manual_seed(seed)
    student = Branches()
    teacher = Branches()
    teacher.load_state_dict(student.state_dict())
    changes = {}
    for name, rank in PLANTED.items():
        u, _ = torch.linalg.qr(torch.randn(WIDTH, rank))
        v, _ = torch.linalg.qr(torch.randn(WIDTH, rank))
        changes[name] = u @ v.T
        teacher.get_submodule(name).weight.data += changes[name]
    return student, teacher.requires_grad_(False), changes


def inputs(count: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, 3 * WIDTH, generator=torch.Generator().manual_seed(seed))


def row_space_fraction(rows: torch.Tensor, change: torch.Tensor) -> float:
    """Share of the rows' squared norm that lies in the row space of ``change`` (1: entirely inside)."""
    _, _, vh = torch.linalg.svd(change)
    basis = vh[: int(torch.linalg.matrix_rank(change))]
    inside = rows @ basis.T
    return float(inside.pow(2).sum() / rows.pow(2).sum())
