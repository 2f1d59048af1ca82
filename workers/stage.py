"""What a stage hands back to its task: the work that follows it and the runs it touched.

Each stage module does its stage and nothing else; the task base (workers/tasks.py) sends the
next stage's messages and closes the runs."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StageResult:
    # Runs whose images this batch touched: one of them may be complete now.
    run_ids: set[int | None] = field(default_factory=set)
    # The next stage's task and the images (or crops) it should take, in batches of batch_size.
    next_task: str | None = None
    next_ids: list[int] = field(default_factory=list)
    batch_size: int = 1
