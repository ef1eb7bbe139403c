"""Options shared by several commands, validated into one-line errors."""

from __future__ import annotations

import click

from .errors import UserError


def _arch(ctx, param, value):
    if value is None:
        return None
    from .compile import check_arch

    try:
        return check_arch(value)
    except ValueError as exc:
        raise UserError(str(exc)) from None


arch_option = click.option("--arch", default=None, callback=_arch,
                           help="Target, e.g. sm_90 (default: the GPU's, else sm_90).")
family_option = click.option(
    "--family", default=None, metavar="auto|NAME",
    help="Kernel family: auto (tuned winner or the cost model's choice over every family) or "
         "one family's name, e.g. immediate.")


def check_family(name: str | None, tuning: bool = False) -> str | None:
    """A --family value: "auto" or a registered family's name (one line otherwise); `tuning`:
    one the tuner can make candidates for (it has the cost-model hooks)."""
    if name is not None:
        from .families import get_family
        try:
            family = get_family(name)
        except UserError as exc:
            raise UserError(f"--family: {exc.message}") from None
        if tuning and name != "auto" and not family.choosable:
            raise UserError(f"--family: the {name} family has no candidates to tune yet (no "
                            f"cost-model hooks)")
    return name


plan_option = click.option("--plan", "plan_items", multiple=True, metavar="KEY=VALUE",
                           help="Override a plan parameter, e.g. --plan rows_per_group=4.")


def parse_plan_options(items, family: str | None = "auto") -> dict:
    """`--plan rows_per_group=4 --plan balance=contiguous` -> overrides that some family (or
    `family`) takes, validated."""
    from .families import check_overrides

    doc = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--plan takes KEY=VALUE, got {item!r}")
        key = key.strip()
        try:
            doc[key] = value.strip() if key == "balance" else int(value)
        except ValueError:
            raise UserError(f"--plan {key}: expected an integer, got {value!r}") from None
    if doc:
        try:
            check_overrides(doc, family or "auto")     # names, types and ranges
        except UserError as exc:
            raise UserError(f"--plan: {exc.message}") from None
    return doc


def check_plan_width(overrides: dict, dtype: str) -> None:
    """A vector width asked for that no 16-byte load of `dtype` covers is refused (the planner
    would otherwise narrow it without a word)."""
    from .problem_shape import max_vector_width

    width, most = overrides.get("vector_width"), max_vector_width(dtype)
    if isinstance(width, int) and width > most:
        raise UserError(f"vector_width {width} is too wide for {dtype} data (at most {most}: "
                        f"one 16-byte load)")
