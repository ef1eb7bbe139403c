"""Problem specs: one layer shape each, read from problems/*.yaml or written inline in a config.

Every problem is a (possibly batched, strided, padded) convolution over NCHW activations; a GEMM is
the 1x1 case with height 1 and width N. The weight is M x (C*kh*kw) and the activation matrix has
N = batch * H_out * W_out columns.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from .errors import UserError
from .paths import PROBLEM_DIR

OPS = {"gemm": 1, "conv1x1": 1, "conv3x3": 3}
MAX_ELEMS = 2 ** 31          # every tensor a kernel addresses (32-bit offsets)
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")


_GEMM_KEYS = {"id", "op", "m", "k", "n", "source", "weights"}
_CONV_KEYS = {"id", "op", "out_channels", "in_channels", "height", "width", "batch", "stride",
              "padding", "source", "weights"}


@dataclass(frozen=True)
class Problem:
    id: str
    op: str
    out_channels: int          # M
    in_channels: int           # C (K for a GEMM)
    height: int = 1            # input H
    width: int = 1             # input W (N for a GEMM)
    batch: int = 1
    stride: int = 1
    padding: int = 0
    source: str = ""
    weights: str = ""          # FILE[#TENSOR]: the layer's own weights (else generated)

    @property
    def kernel_size(self) -> int:
        return OPS[self.op]

    @property
    def out_height(self) -> int:
        return (self.height + 2 * self.padding - self.kernel_size) // self.stride + 1

    @property
    def out_width(self) -> int:
        return (self.width + 2 * self.padding - self.kernel_size) // self.stride + 1

    @property
    def m(self) -> int:
        return self.out_channels

    @property
    def k(self) -> int:
        return self.in_channels * self.kernel_size ** 2

    @property
    def n(self) -> int:
        return self.batch * self.out_height * self.out_width

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels, self.kernel_size, self.kernel_size)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.in_channels, self.height, self.width)

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.out_channels, self.out_height, self.out_width)

    def dense_flops(self) -> int:
        return 2 * self.m * self.k * self.n

    def shape_text(self) -> str:
        if self.op == "gemm":
            return f"{self.m}x{self.k}, N={self.n}"
        conv = f"{self.out_channels}x{self.in_channels}"
        if self.kernel_size > 1:
            conv += f"x{self.kernel_size}x{self.kernel_size}"
        spatial = f"{self.height}x{self.width}"
        if (self.out_height, self.out_width) != (self.height, self.width):
            spatial += f"->{self.out_height}x{self.out_width}"
        extra = "".join([f" s{self.stride}" if self.stride > 1 else "",
                         f" p{self.padding}" if self.padding else "",
                         f" b{self.batch}" if self.batch > 1 else ""])
        return f"{conv} @ {spatial}{extra}"

    def with_batch(self, batch: int) -> Problem:
        """Override the batch; for a GEMM the batch multiplies the N (token) columns."""
        if self.op == "gemm":
            return replace(self, width=self.width // self.batch * batch, batch=1)
        return replace(self, batch=batch)

    def validate(self, where: str) -> Problem:
        sizes = {"out_channels": self.out_channels, "in_channels": self.in_channels,
                 "height": self.height, "width": self.width, "batch": self.batch,
                 "stride": self.stride}
        for key, value in sizes.items():
            if value <= 0:
                raise UserError(f"{where}: {key} must be a positive integer, got {value}")
        if self.padding < 0:
            raise UserError(f"{where}: padding must be >= 0, got {self.padding}")
        for key, value in {**sizes, "padding": self.padding}.items():   # Python ints: no overflow
            if value >= MAX_ELEMS:
                raise UserError(f"{where}: {key} = {value} is too large (limit {MAX_ELEMS - 1})")
        if self.out_height <= 0 or self.out_width <= 0:
            raise UserError(f"{where}: output size {self.out_height}x{self.out_width} is not "
                            f"positive (input {self.height}x{self.width}, kernel "
                            f"{self.kernel_size}, stride {self.stride}, padding {self.padding})")
        inputs, outputs = math.prod(self.input_shape), math.prod(self.output_shape)
        if max(inputs, outputs) >= MAX_ELEMS:
            which = "input" if inputs >= outputs else "output"
            raise UserError(f"{where}: shape too large: the {which} holds {max(inputs, outputs)} "
                            f"elements; kernels address fewer than 2^31")
        return self


def valid_name(text: object) -> bool:
    """A problem id or config name: it names files, so letters, digits, _ . - only (no spaces,
    control characters or separators), starting with a letter, digit or _, at most 100 long."""
    return isinstance(text, str) and _NAME_RE.fullmatch(text) is not None


def _int_field(spec: dict, key: str, where: str, default: int | None = None) -> int:
    if key not in spec:
        if default is None:
            raise UserError(f"{where}: missing field '{key}'")
        return default
    value = spec[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{where}: '{key}' must be an integer, got {value!r}")
    return value


def problem_from_dict(spec: object, where: str) -> Problem:
    """Validate one problem mapping (from a problems/ file or inline in a config)."""
    if not isinstance(spec, dict):
        raise UserError(f"{where}: a problem must be a mapping, got {type(spec).__name__}")
    pid = spec.get("id")
    if not valid_name(pid):
        raise UserError(f"{where}: missing or invalid 'id' (up to 100 letters, digits, _ . -), "
                        f"got {pid!r}")
    where = f"{where} [{pid}]"
    op = spec.get("op")
    if op not in OPS:
        raise UserError(f"{where}: unknown op {op!r} (expected one of {', '.join(OPS)})")
    allowed = _GEMM_KEYS if op == "gemm" else _CONV_KEYS
    unknown = sorted(set(spec) - allowed, key=str)
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r} for op {op} "
                        f"(allowed: {', '.join(sorted(allowed))})")
    source = spec.get("source", "")
    if not isinstance(source, str):
        raise UserError(f"{where}: 'source' must be a string")
    weights = spec.get("weights", "")
    if not isinstance(weights, str) or ("weights" in spec and not weights.strip()):
        raise UserError(f"{where}: 'weights' must be a file name (FILE or FILE#TENSOR)")
    if op == "gemm":
        for key in ("m", "k", "n"):
            if _int_field(spec, key, where) <= 0:
                raise UserError(f"{where}: {key} must be a positive integer, got {spec[key]}")
        problem = Problem(pid, op, _int_field(spec, "m", where), _int_field(spec, "k", where),
                          height=1, width=_int_field(spec, "n", where), source=source,
                          weights=weights)
    else:
        problem = Problem(pid, op, _int_field(spec, "out_channels", where),
                          _int_field(spec, "in_channels", where),
                          height=_int_field(spec, "height", where),
                          width=_int_field(spec, "width", where),
                          batch=_int_field(spec, "batch", where, 1),
                          stride=_int_field(spec, "stride", where, 1),
                          padding=_int_field(spec, "padding", where, 0), source=source,
                          weights=weights)
    return problem.validate(where)


class _Loader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that a key repeated in one mapping is an error (YAML
    says keys are unique; PyYAML would silently keep the last value)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    repeated = key in seen
                    seen.add(key)
                except TypeError:
                    continue              # unhashable: the base class says so
                if repeated:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep)


def load_yaml(path: Path) -> object:
    """Parse a YAML file (configs, problems): every failure is one line naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not a YAML file") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        return yaml.load(text, Loader=_Loader)
    except RecursionError:
        raise UserError(f"{path}: malformed YAML: nested too deeply") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}: malformed YAML{at}: {reason}") from None


def load_problem_file(path: Path) -> Problem:
    problem = problem_from_dict(load_yaml(path), str(path))
    if problem.id != path.stem:
        raise UserError(f"{path}: id {problem.id!r} does not match the file name {path.stem!r}")
    return problem


def builtin_problem(pid: str, directory: Path | None = None) -> Problem | None:
    """The shipped problem `pid`, read from its own file only when asked for (a malformed file
    fails the configs that name it, no others); None when there is no such problem."""
    path = (directory or PROBLEM_DIR) / f"{pid}.yaml"
    return load_problem_file(path) if valid_name(pid) and path.is_file() else None


def builtin_problems(directory: Path = PROBLEM_DIR) -> dict[str, Problem]:
    """All problems shipped in problems/, by id, in file-name order."""
    return {p.id: p for p in (load_problem_file(f) for f in sorted(directory.glob("*.yaml")))}
