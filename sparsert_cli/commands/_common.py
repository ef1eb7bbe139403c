"""What several commands share: the case selection options and the progress display."""

from __future__ import annotations

from dataclasses import replace

from ..console import err_console
from ..errors import UserError
from ..problem_shape import default_accumulate


def split_values(values) -> list[str]:
    return [v for item in values for v in str(item).split(",") if v.strip()]


def select(config, problem_ids, sparsities, dtype, accumulate=None):
    """Apply --problems / --sparsity / --dtype / --accumulate to a config (errors name the bad
    value). A new --dtype resets the accumulator to that type's default (fp32 for bf16) unless
    --accumulate is given."""
    from ..config import check_sparsity

    if len(set(problem_ids)) != len(problem_ids):
        raise UserError("--problems: a value is listed twice")
    if problem_ids:
        known = {p.id: p for p in config.problems}
        missing = [p for p in problem_ids if p not in known]
        if missing:
            raise UserError(f"{config.path}: --problems {missing[0]!r} is not in this config "
                            f"(it has {', '.join(known)})")
        config = replace(config, problems=tuple(known[p] for p in problem_ids))
    if sparsities:
        values = []
        for s in sparsities:
            try:
                values.append(check_sparsity(float(s), "--sparsity"))
            except ValueError:
                raise UserError(f"--sparsity: not a number: {s!r}") from None
        if len(set(values)) != len(values):   # as numbers: 0.8 and 0.80 are the same case
            raise UserError("--sparsity: a value is listed twice")
        config = replace(config, sparsities=tuple(values))
    if dtype:
        config = replace(config, dtype=dtype, accumulate=default_accumulate(dtype))
    if accumulate:
        config = replace(config, accumulate=accumulate)
    if config.accumulate == "fp16" and config.dtype != "fp16":
        raise UserError(f"{config.path}: --accumulate fp16 needs --dtype fp16 ({config.dtype} "
                        f"data is summed in fp32)")
    return config


def progress_bar():
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn)

    return Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[item]}"), TimeElapsedColumn(),
                    console=err_console, transient=False)


def progress_callback(progress):
    """An on_progress(stage, done, total, item) for the library's long calls, drawing one rich
    task per stage."""
    tasks: dict = {}

    def update(stage: str, done: int, total: int, item: str = "") -> None:
        if stage not in tasks:
            tasks[stage] = progress.add_task(stage, total=total, item="")
        progress.update(tasks[stage], completed=done, total=total, item=item)
    return update
