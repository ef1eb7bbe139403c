"""Problem specs and benchmark configs: shipped files load, shapes add up, and every bad config is
one UserError that names the file and the offending key."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from sparsert_cli.config import Config, load_config
from sparsert_cli.errors import UserError
from sparsert_cli.problems import Problem, builtin_problems, load_problem_file

PAPER20_IDS = [
    "mbv1_pw0", "mbv1_pw1", "mbv1_pw2", "mbv1_pw3", "mbv1_pw4", "mbv1_pw5", "mbv1_pw6",
    "mbv1_pw11", "mbv1_pw12",
    "rn50_c2_expand", "rn50_c3_reduce", "rn50_c4_reduce", "rn50_c5_expand",
    "rn50_c2_3x3", "rn50_c3_3x3", "rn50_c4_3x3", "rn50_c5_3x3",
    "bert_attn_out", "bert_ffn_up", "bert_ffn_down",
]


def _problem_files(repo):
    return sorted((repo / "problems").glob("*.yaml"))


# ---------------------------------------------------------------- shipped files


def test_every_shipped_problem_file_loads_with_matching_id(repo):
    files = _problem_files(repo)
    assert files, "no problems/*.yaml shipped"
    for path in files:
        problem = load_problem_file(path)
        assert problem.id == path.stem
        assert problem.m > 0 and problem.k > 0 and problem.n > 0


def test_builtin_problems_are_keyed_by_file_name(repo):
    known = builtin_problems()
    assert sorted(known) == sorted(p.stem for p in _problem_files(repo))


CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
SHIPPED_CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED_CONFIGS)
def test_every_shipped_config_loads(repo, name):
    cfg = load_config(repo / "configs" / f"{name}.yaml")
    assert isinstance(cfg, Config)
    assert cfg.name == name
    assert cfg.problems and cfg.sparsities
    assert all(0.0 <= s < 1.0 for s in cfg.sparsities)
    assert len(cfg.cases()) == len(cfg.problems) * len(cfg.sparsities)


def test_the_documented_configs_are_shipped():
    assert {"bert", "ci", "mobilenet", "paper20", "resnet", "sweep",
            "throughput"} <= set(SHIPPED_CONFIGS)


def test_paper20_lists_exactly_the_twenty_issue_layers(repo):
    cfg = load_config(repo / "configs" / "paper20.yaml")
    ids = [p.id for p in cfg.problems]
    assert len(ids) == 20
    assert sorted(ids) == sorted(PAPER20_IDS)
    assert cfg.sparsities == (0.9, 0.95)
    assert cfg.dtype == "fp32"
    assert all(p.batch == 1 for p in cfg.problems)


def test_config_name_without_suffix_resolves_to_configs_dir(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert load_config("ci").name == "ci"


def test_throughput_batch_multiplies_gemm_columns_and_conv_batch(repo):
    cfg = load_config(repo / "configs" / "throughput.yaml")
    base = builtin_problems()
    for p in cfg.problems:
        assert p.n == 32 * base[p.id].n


# ---------------------------------------------------------------- shape arithmetic


@pytest.mark.parametrize("problem, out_hw, k, n", [
    (Problem("g", "gemm", 37, 53, height=1, width=129), (1, 129), 53, 129),
    (Problem("pw", "conv1x1", 64, 32, height=14, width=14), (14, 14), 32, 196),
    (Problem("pw_s2", "conv1x1", 20, 12, height=11, width=9, stride=2), (6, 5), 12, 30),
    (Problem("c3", "conv3x3", 8, 16, height=13, width=10, padding=1), (13, 10), 144, 130),
    (Problem("c3_p0", "conv3x3", 8, 6, height=8, width=8), (6, 6), 54, 36),
    (Problem("c3_s2", "conv3x3", 128, 128, height=56, width=56, stride=2, padding=1), (28, 28),
     1152, 784),
    (Problem("c3_s2_odd", "conv3x3", 12, 8, height=9, width=7, stride=2, padding=1, batch=2),
     (5, 4), 72, 40),
    (Problem("c3_b8", "conv3x3", 64, 64, height=56, width=56, padding=1, batch=8), (56, 56),
     576, 8 * 56 * 56),
])
def test_problem_shape_arithmetic(problem, out_hw, k, n):
    assert (problem.out_height, problem.out_width) == out_hw
    assert problem.k == k
    assert problem.n == n
    assert problem.weight_shape == (problem.m, problem.in_channels, problem.kernel_size,
                                    problem.kernel_size)
    assert problem.output_shape == (problem.batch, problem.m) + out_hw
    assert problem.dense_flops() == 2 * problem.m * k * n


def test_gemm_with_batch_scales_columns_not_batch():
    p = Problem("g", "gemm", 8, 16, height=1, width=128).with_batch(4)
    assert (p.batch, p.n) == (1, 512)
    c = Problem("c", "conv1x1", 8, 16, height=7, width=7).with_batch(4)
    assert (c.batch, c.n) == (4, 196)


# ---------------------------------------------------------------- bad configs


VALID_INLINE = "{id: g, op: gemm, m: 8, k: 8, n: 8}"

BAD_CONFIGS = {
    # name: (yaml text, words the one-line message must contain besides the file name)
    "malformed_yaml": ("problems: [a, b\nsparsity: 0.9\n", ["malformed YAML"]),
    "not_a_mapping": ("- 1\n- 2\n", ["mapping"]),
    "empty_file": ("", ["mapping"]),
    "unknown_top_key": (f"problems: [{VALID_INLINE}]\nsparsity: 0.9\nsparsty: 0.5\n",
                        ["sparsty"]),
    "missing_problems": ("sparsity: 0.9\n", ["problems"]),
    "missing_sparsity": (f"problems: [{VALID_INLINE}]\n", ["sparsity"]),
    "empty_problem_list": ("problems: []\nsparsity: 0.9\n", ["problems"]),
    "empty_sparsity_list": (f"problems: [{VALID_INLINE}]\nsparsity: []\n", ["sparsity"]),
    "sparsity_one": (f"problems: [{VALID_INLINE}]\nsparsity: 1.0\n", ["sparsity"]),
    "sparsity_negative": (f"problems: [{VALID_INLINE}]\nsparsity: -0.1\n", ["sparsity"]),
    "sparsity_string": (f"problems: [{VALID_INLINE}]\nsparsity: abc\n", ["sparsity", "abc"]),
    "sparsity_bool": (f"problems: [{VALID_INLINE}]\nsparsity: true\n", ["sparsity"]),
    "sparsity_nan": (f"problems: [{VALID_INLINE}]\nsparsity: .nan\n", ["sparsity"]),
    "sparsity_in_list": (f"problems: [{VALID_INLINE}]\nsparsity: [0.5, 1.2]\n", ["sparsity"]),
    "unknown_op": ("problems: [{id: g, op: conv5x5, m: 8, k: 8, n: 8}]\nsparsity: 0.9\n",
                   ["op", "conv5x5"]),
    "unknown_problem_id": ("problems: [nosuch_layer]\nsparsity: 0.9\n", ["nosuch_layer"]),
    "duplicate_id": ("problems: [mbv1_pw0, mbv1_pw0]\nsparsity: 0.9\n", ["mbv1_pw0", "twice"]),
    "duplicate_inline_and_builtin": (
        "problems: [bert_ffn_up, {id: bert_ffn_up, op: gemm, m: 4, k: 4, n: 4}]\n"
        "sparsity: 0.9\n", ["bert_ffn_up", "twice"]),
    "inline_unknown_key": ("problems: [{id: g, op: gemm, m: 8, k: 8, n: 8, heigth: 3}]\n"
                           "sparsity: 0.9\n", ["heigth"]),
    "inline_conv_zero_channels": (
        "problems: [{id: c, op: conv1x1, out_channels: 0, in_channels: 4, height: 4, "
        "width: 4}]\nsparsity: 0.9\n", ["out_channels"]),
    "inline_conv_negative_height": (
        "problems: [{id: c, op: conv3x3, out_channels: 4, in_channels: 4, height: -3, "
        "width: 4}]\nsparsity: 0.9\n", ["height"]),
    "inline_zero_stride": (
        "problems: [{id: c, op: conv3x3, out_channels: 4, in_channels: 4, height: 8, "
        "width: 8, stride: 0}]\nsparsity: 0.9\n", ["stride"]),
    "inline_zero_batch": (
        "problems: [{id: c, op: conv1x1, out_channels: 4, in_channels: 4, height: 8, "
        "width: 8, batch: 0}]\nsparsity: 0.9\n", ["batch"]),
    "inline_float_size": (
        "problems: [{id: c, op: conv1x1, out_channels: 4, in_channels: 4, height: 1.5, "
        "width: 8}]\nsparsity: 0.9\n", ["height"]),
    "inline_missing_size": ("problems: [{id: g, op: gemm, m: 8, k: 8}]\nsparsity: 0.9\n",
                            ["'n'"]),
    "negative_padding": (
        "problems: [{id: c, op: conv3x3, out_channels: 4, in_channels: 4, height: 8, "
        "width: 8, padding: -1}]\nsparsity: 0.9\n", ["padding"]),
    "output_not_positive": (
        "problems: [{id: c, op: conv3x3, out_channels: 4, in_channels: 4, height: 2, "
        "width: 8, padding: 0}]\nsparsity: 0.9\n", ["output size"]),
    "bad_problem_id_chars": ("problems: [{id: 'a b', op: gemm, m: 8, k: 8, n: 8}]\n"
                             "sparsity: 0.9\n", ["id"]),
    "epilogue_unknown_key": (f"problems: [{VALID_INLINE}]\nsparsity: 0.9\n"
                             "epilogue: {bias: true, gelu: true}\n", ["epilogue.gelu"]),
    "epilogue_bias_not_bool": (f"problems: [{VALID_INLINE}]\nsparsity: 0.9\n"
                               "epilogue: {bias: 1}\n", ["epilogue.bias"]),
    "epilogue_bad_activation": (f"problems: [{VALID_INLINE}]\nsparsity: 0.9\n"
                                "epilogue: {activation: swish}\n", ["activation", "swish"]),
    "epilogue_not_mapping": (f"problems: [{VALID_INLINE}]\nsparsity: 0.9\nepilogue: relu\n",
                             ["epilogue"]),
    "plan_unknown_key": (f"problems: [{VALID_INLINE}]\nsparsity: 0.9\n"
                         "plan: {rows_per_grp: 4}\n", ["plan.rows_per_grp"]),
    "plan_not_mapping": (f"problems: [{VALID_INLINE}]\nsparsity: 0.9\nplan: 4\n", ["plan"]),
    "bad_dtype": (f"problems: [{VALID_INLINE}]\nsparsity: 0.9\ndtype: fp64\n", ["dtype"]),
    "bad_pattern": (f"problems: [{VALID_INLINE}]\nsparsity: 0.9\npattern: banded\n",
                    ["pattern"]),
    "bad_emit": (f"problems: [{VALID_INLINE}]\nsparsity: 0.9\nemit: sass\n", ["emit"]),
    "negative_seed": (f"problems: [{VALID_INLINE}]\nsparsity: 0.9\nseed: -1\n", ["seed"]),
    "zero_batch": (f"problems: [{VALID_INLINE}]\nsparsity: 0.9\nbatch: 0\n", ["batch"]),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_config_is_one_line_user_error_naming_file_and_key(tmp_path, name):
    text, words = BAD_CONFIGS[name]
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as caught:
        load_config(path)
    message = caught.value.message
    assert "\n" not in message
    assert str(path) in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert caught.value.code == 2


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(textwrap.dedent("""\
        name: broken
        problems: [mbv1_pw0
        sparsity: [0.9]
        seed: 0
        """))
    with pytest.raises(UserError, match=r"broken\.yaml: malformed YAML at line \d+"):
        load_config(path)


def test_missing_config_file_is_user_error(tmp_path):
    with pytest.raises(UserError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")


def test_problem_file_whose_id_differs_from_its_name_is_rejected(tmp_path):
    path = tmp_path / "layer_a.yaml"
    path.write_text("{id: layer_b, op: gemm, m: 4, k: 4, n: 4}\n")
    with pytest.raises(UserError, match="layer_a.yaml.*does not match"):
        load_problem_file(path)


# The gemm keys a user writes are m, k, n; the size check reports the internal conv names.
@pytest.mark.parametrize("key", ["m", "k", "n"])
def test_inline_gemm_non_positive_size_names_the_gemm_key(tmp_path, key):
    sizes = {"m": 8, "k": 8, "n": 8, key: 0}
    path = tmp_path / "gemm_zero.yaml"
    path.write_text(f"problems: [{{id: g, op: gemm, m: {sizes['m']}, k: {sizes['k']}, "
                    f"n: {sizes['n']}}}]\nsparsity: 0.9\n")
    with pytest.raises(UserError) as caught:
        load_config(path)
    message = caught.value.message
    assert f"'{key}'" in message or f": {key} must be" in message, message


@pytest.mark.parametrize("value", ["'x'", "0", "true"])
def test_config_plan_values_are_validated_with_the_file_name(tmp_path, value):
    path = tmp_path / "badplan.yaml"
    path.write_text(f"problems: [{VALID_INLINE}]\nsparsity: 0.9\n"
                    f"plan: {{rows_per_group: {value}}}\n")
    with pytest.raises(UserError) as caught:
        load_config(path)
    assert str(path) in caught.value.message and "rows_per_group" in caught.value.message


def test_config_digest_changes_with_what_decides_results(tmp_path):
    def digest(extra: str) -> str:
        path = tmp_path / "d.yaml"
        path.write_text(f"problems: [{VALID_INLINE}]\nsparsity: 0.9\n{extra}")
        return load_config(path).digest()

    base = digest("")
    assert digest("") == base
    assert digest("seed: 1\n") != base
    assert digest("pattern: pruned\n") != base
    assert digest("epilogue: {activation: relu}\n") != base
    assert digest("description: words only\n") == base


# ---------------------------------------------------------------- issue 14 should-fix


@pytest.mark.parametrize("text, where", [
    (f"name: a\nname: b\nproblems: [{VALID_INLINE}]\nsparsity: 0.9\n", "line 2, column 1"),
    (f"problems: [{VALID_INLINE}]\nsparsity: 0.9\nepilogue: {{bias: true, bias: false}}\n",
     "line 3"),
    ("problems: [{id: g, op: gemm, m: 4, k: 4, k: 8, n: 4}]\nsparsity: 0.9\n", "line 1"),
])
def test_duplicate_yaml_keys_are_rejected_with_key_and_line(tmp_path, text, where):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as caught:
        load_config(path)
    message = caught.value.message
    assert str(path) in message and "duplicate key" in message and where in message


def test_duplicate_key_in_a_problem_file_is_rejected(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("id: p\nop: gemm\nm: 4\nk: 4\nn: 4\nm: 8\n")
    with pytest.raises(UserError, match=r"p\.yaml: malformed YAML at line 6.*duplicate key 'm'"):
        load_problem_file(path)


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("problems:\n  - &g {id: g, op: gemm, m: 4, k: 4, n: 4}\n"
                    "  - {<<: *g, id: h, m: 8}\nsparsity: 0.9\n")
    assert [p.m for p in load_config(path).problems] == [4, 8]


@pytest.mark.parametrize("name", ["ci\n", "ci\t", " ci", "a b", "a/b", "..", "x" * 101, "ci\r"])
def test_names_and_ids_with_whitespace_control_or_separators_are_rejected(tmp_path, name):
    quoted = '"' + name.encode("unicode_escape").decode() + '"'
    path = tmp_path / "n.yaml"
    path.write_text(f"name: {quoted}\nproblems: [{VALID_INLINE}]\nsparsity: 0.9\n")
    with pytest.raises(UserError, match="'name' must be"):
        load_config(path)
    path.write_text(f"problems: [{{id: {quoted}, op: gemm, m: 4, k: 4, n: 4}}]\nsparsity: 0.9\n")
    with pytest.raises(UserError, match="invalid 'id'"):
        load_config(path)


def test_one_malformed_problem_file_breaks_only_configs_that_name_it(tmp_path, monkeypatch):
    from sparsert_cli import problems

    shipped = tmp_path / "problems"
    shipped.mkdir()
    (shipped / "good.yaml").write_text("{id: good, op: gemm, m: 4, k: 4, n: 4}\n")
    (shipped / "bad.yaml").write_text("{id: bad, op: gemm, m: [\n")
    monkeypatch.setattr(problems, "PROBLEM_DIR", shipped)
    path = tmp_path / "c.yaml"
    path.write_text(f"problems: [{VALID_INLINE}, good]\nsparsity: 0.9\n")
    assert [p.id for p in load_config(path).problems][1] == "good"
    path.write_text("problems: [good, bad]\nsparsity: 0.9\n")
    with pytest.raises(UserError, match=r"bad\.yaml: malformed YAML"):
        load_config(path)
    path.write_text("problems: [../problems/good]\nsparsity: 0.9\n")
    with pytest.raises(UserError, match="unknown problem id"):
        load_config(path)


def test_config_path_that_is_a_directory_says_so(tmp_path):
    with pytest.raises(UserError, match="is a directory, not a config file"):
        load_config(tmp_path)


def test_keys_of_mixed_types_are_one_line(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text(f"problems: [{VALID_INLINE}]\nsparsity: 0.9\n1: a\nnull: b\n")
    with pytest.raises(UserError, match="unknown key"):
        load_config(path)
