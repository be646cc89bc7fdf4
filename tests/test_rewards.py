"""easyrl.rewards: loading reward functions, weighting, None handling, errors, built-ins."""

import textwrap

import numpy as np
import pytest

from easyrl import rewards as R
from easyrl.rewards import RewardError, RewardSet, load_reward_functions

USER_REWARDS = textwrap.dedent("""
    def accuracy(prompts, completions, completion_ids, answer, **kwargs):
        return [None if a is None else float(c.strip() == a) for c, a in zip(completions, answer)]

    def brevity(prompts, completions, completion_ids, **kwargs):
        return [1.0 / len(ids) for ids in completion_ids]

    def boom(prompts, completions, completion_ids, **kwargs):
        return 1 / 0

    def short(prompts, completions, completion_ids, **kwargs):
        return [1.0]

    def words(prompts, completions, completion_ids, **kwargs):
        return ["high"] * len(prompts)

    def nothing(prompts, completions, completion_ids, **kwargs):
        return [None] * len(prompts)

    NOT_A_FUNCTION = 3
""")

PROMPTS = ["q1", "q2", "q3"]
COMPLETIONS = ["4", " 5 ", "x"]
IDS = [[1, 2], [3, 4, 5, 6], [7]]
COLUMNS = {"answer": ["4", "6", None]}


@pytest.fixture
def user_file(tmp_path):
    p = tmp_path / "my_rewards.py"
    p.write_text(USER_REWARDS)
    return p


def test_user_file_by_path_with_answer_column(user_file):
    rs = load_reward_functions(f"{user_file}:accuracy")
    assert rs.names == ["accuracy"] and rs.weights == [1.0]
    total, m = rs(PROMPTS, COMPLETIONS, IDS, COLUMNS)
    assert total.dtype == np.float32 and total.shape == (3,)
    # the row without an answer is unscorable: NaN (TRL), out of reward / reward_std
    np.testing.assert_allclose(total, [1.0, 0.0, np.nan])
    assert m["rewards/accuracy/mean"] == pytest.approx(0.5)  # over the 2 rows with an answer
    assert m["rewards/accuracy/std"] == pytest.approx(0.5)
    assert m["rewards/none_rows"] == 1.0
    assert m["reward"] == pytest.approx(0.5)
    assert m["reward_std"] == pytest.approx(np.std([1.0, 0.0]))


def test_user_module_on_sys_path(user_file, monkeypatch):
    monkeypatch.syspath_prepend(str(user_file.parent))
    rs = load_reward_functions(["my_rewards:accuracy", "my_rewards:brevity"], [2.0, 0.5])
    total, m = rs(PROMPTS, COMPLETIONS, IDS, COLUMNS)
    # row0: 2*1 + 0.5*(1/2) = 2.25; row1: 2*0 + 0.5*(1/4) = 0.125; row2: accuracy None, 0.5*1
    np.testing.assert_allclose(total, [2.25, 0.125, 0.5], rtol=1e-6)
    assert m["rewards/brevity/mean"] == pytest.approx((0.5 + 0.25 + 1.0) / 3)
    assert m["rewards/brevity/std"] == pytest.approx(np.std([0.5, 0.25, 1.0]))
    assert m["rewards/none_rows"] == 0.0
    assert m["reward"] == pytest.approx((2.25 + 0.125 + 0.5) / 3)
    assert set(m) == {"rewards/accuracy/mean", "rewards/accuracy/std", "rewards/brevity/mean",
                      "rewards/brevity/std", "rewards/none_rows", "reward", "reward_std"}


def test_comma_separated_strings_and_builtins(user_file):
    rs = load_reward_functions(f"{user_file}:brevity, easyrl.rewards:exact_match,length_penalty",
                               "1, 3,-1")
    assert rs.names == ["brevity", "exact_match", "length_penalty"]
    assert rs.weights == [1.0, 3.0, -1.0]
    rs.context["max_completion_length"] = 4
    total, _ = rs(PROMPTS, COMPLETIONS, IDS, COLUMNS)
    # brevity + 3*exact + -1*(-L/4)
    np.testing.assert_allclose(total, [0.5 + 3 + 0.5, 0.25 + 0 + 1.0, 1.0 + 0.25], rtol=1e-6)


def test_weight_zero_removes_effect_but_is_reported(user_file):
    rs = load_reward_functions([f"{user_file}:accuracy", f"{user_file}:brevity"], [1.0, 0.0])
    total, m = rs(PROMPTS, COMPLETIONS, IDS, COLUMNS)
    np.testing.assert_allclose(total, [1.0, 0.0, 0.0])  # brevity applies to row 2 (weight 0)
    assert m["rewards/brevity/mean"] == pytest.approx((0.5 + 0.25 + 1.0) / 3)


def test_all_none_row_is_nan_and_counted(user_file):
    rs = load_reward_functions([f"{user_file}:nothing", f"{user_file}:accuracy"])
    total, m = rs(PROMPTS, COMPLETIONS, IDS, COLUMNS)
    np.testing.assert_allclose(total, [1.0, 0.0, np.nan])
    warn = R.unscorable_warning(PROMPTS, COMPLETIONS, rs.values(PROMPTS, COMPLETIONS, IDS, COLUMNS))
    assert "1 of 3 rows (first: row 2, prompt 'q3', completion 'x')" in warn
    assert m["rewards/none_rows"] == 1.0
    assert "rewards/nothing/mean" not in m  # applies to no row: no mean/std (no NaN metrics)


def test_name_collision_made_unique(user_file, monkeypatch):
    monkeypatch.syspath_prepend(str(user_file.parent))
    rs = load_reward_functions(["my_rewards:brevity", f"{user_file}:brevity"])
    rs.add_model("brevity", 1.0, lambda p, c, ids: np.zeros(len(p)))  # the RM path: positional
    assert rs.names == ["brevity", "brevity_2", "brevity_3"]
    _, m = rs(PROMPTS, COMPLETIONS, IDS, COLUMNS)
    assert "rewards/brevity_2/mean" in m and "rewards/brevity_3/std" in m


@pytest.mark.parametrize("fn, needle", [
    ("boom", "raised ZeroDivisionError: division by zero"),
    ("short", "returned 1 values for 3 completions"),
    ("words", "returned a non-number at row 0"),
])
def test_failing_function_one_line_error(user_file, fn, needle):
    rs = load_reward_functions(f"{user_file}:{fn}")
    with pytest.raises(RewardError) as ei:
        rs(PROMPTS, COMPLETIONS, IDS, COLUMNS)
    msg = str(ei.value)
    assert "\n" not in msg and f"reward function '{fn}'" in msg and needle in msg, msg
    assert ei.value.__cause__ is None  # no chained traceback from inside the user code
    assert ei.value.__context__ is None or ei.value.__suppress_context__
    assert isinstance(ei.value, ValueError)  # the CLI prints ValueErrors as one line


def test_non_finite_and_wrong_shape_rejected():
    rs = RewardSet()
    rs.add("inf", 1.0, lambda prompts, **kw: [float("inf")] * len(prompts))
    with pytest.raises(RewardError, match="'inf' returned a non-finite value at row 0"):
        rs(PROMPTS, COMPLETIONS, IDS)
    rs = RewardSet()  # NaN means "not applicable", as None (TRL turns None into NaN)
    rs.add("nan", 1.0, lambda prompts, **kw: np.array([np.nan, 1.0, 2.0]))
    np.testing.assert_allclose(rs(PROMPTS, COMPLETIONS, IDS)[0], [np.nan, 1.0, 2.0])
    rs = RewardSet()
    rs.add_model("rm", 1.0, lambda p, c, ids: np.zeros((len(p), 2)))
    with pytest.raises(RewardError, match=r"'rm' \(reward model\) returned an array of shape"):
        rs(PROMPTS, COMPLETIONS, IDS)
    rs = RewardSet()
    rs.add("scalar", 1.0, lambda completions, **kw: 1.0)
    with pytest.raises(RewardError, match="'scalar' returned float, expected a list of 3"):
        rs(PROMPTS, COMPLETIONS, IDS)


def test_reward_model_source_combines(user_file):
    rs = load_reward_functions(f"{user_file}:accuracy", [2.0])
    seen = {}

    def score(prompts, completions, completion_ids):
        seen["n"] = len(prompts)
        return np.array([0.5, -1.0, 2.0], np.float32)

    assert rs.add_model("rm", 0.5, score) == "rm"
    total, m = rs(PROMPTS, COMPLETIONS, IDS, COLUMNS)
    np.testing.assert_allclose(total, [2.25, -0.5, 1.0], rtol=1e-6)
    assert seen["n"] == 3
    assert m["rewards/rm/mean"] == pytest.approx(0.5)


@pytest.mark.parametrize("names, weights, needle", [
    ("no_such_module_xyz:f", None, "'no_such_module_xyz:f': no module named 'no_such_module_xyz'"),
    ("easyrl.rewards:exakt", None, "module easyrl.rewards has no function 'exakt'"),
    ("exakt", None, "expected 'module:function'"),
    ("a.b:", None, "expected 'module:function'"),
    ("easyrl.rewards:DEFAULT_FORMAT_PATTERN", None, "not callable"),
    ("exact_match,synthetic", "1.0", "1 weights for 2 reward functions"),
    ("exact_match", "heavy", "'heavy' (for 'exact_match') is not a number"),
    ("exact_match", [float("inf")], "weight must be a finite number"),
    ("missing/dir/rw.py:f", None, "no such file 'missing/dir/rw.py'"),
])
def test_config_errors(names, weights, needle):
    with pytest.raises(ValueError) as ei:
        load_reward_functions(names, weights)
    assert needle in str(ei.value) and "\n" not in str(ei.value), str(ei.value)


def test_user_module_errors(user_file, monkeypatch):
    monkeypatch.syspath_prepend(str(user_file.parent))
    with pytest.raises(ValueError, match="config reward.functions: 'my_rewards:exakt': module "
                                         "my_rewards has no function 'exakt'"):
        load_reward_functions("my_rewards:exakt")
    with pytest.raises(ValueError, match="has no function 'exakt'"):
        load_reward_functions(f"{user_file}:exakt")
    with pytest.raises(ValueError, match="'NOT_A_FUNCTION' is a int, not callable"):
        load_reward_functions("my_rewards:NOT_A_FUNCTION")
    bad = user_file.parent / "bad_import.py"
    bad.write_text("import no_such_dependency_xyz\ndef f(*a, **k):\n    return []\n")
    with pytest.raises(ValueError, match="importing module bad_import raised ModuleNotFoundError"):
        load_reward_functions("bad_import:f")
    with pytest.raises(ValueError, match="raised ModuleNotFoundError"):
        load_reward_functions(f"{bad}:f")


def test_empty_set_and_misaligned_inputs():
    rs = load_reward_functions("", None)
    assert len(rs) == 0
    with pytest.raises(ValueError, match="no reward sources"):
        rs(PROMPTS, COMPLETIONS, IDS)
    rs = load_reward_functions("exact_match")
    with pytest.raises(ValueError, match="must align"):
        rs(PROMPTS, COMPLETIONS[:2], IDS)
    with pytest.raises(ValueError, match="column 'answer' has 2 values for 3 prompts"):
        rs(PROMPTS, COMPLETIONS, IDS, {"answer": ["1", "2"]})


# ----------------------------------------------------------------------------- built-ins
def test_synthetic_builtin():
    from easyrl.data.synthetic import true_reward
    prompts = ["sort: c a b", "sort: d b", "sort: f e"]
    comps = ["a b c", "d b", "e f </s> junk"]
    out = R.synthetic(prompts, comps, None)
    assert out[0] == 1.0 and out[2] == 1.0
    assert out[1] == pytest.approx(0.5)  # content 2/2, order 0/2
    assert out == [true_reward(p, c) for p, c in zip(prompts, comps)]


def test_exact_match_builtin():
    assert R.exact_match(["p"] * 3, [" 42\n", "41", "x"], None, answer=["42", "42", None]) == \
        [1.0, 0.0, None]
    assert R.exact_match(["p"], ["42"], None, answer=[42]) == [1.0]
    assert R.exact_match(["p", "q"], ["a", "b"], None) == [None, None]  # no answer column


def test_answer_extraction_and_gsm8k_exact():
    ex = R.answer_extraction
    assert ex("Natalia sold 48/2 = 24 clips.\n#### 72") == "72"
    assert ex("so 3 + 4 = 7 then 12") == "12"
    assert ex("#### 1,000.50 dollars, not 7") == "1000.5"
    assert ex("the answer is -3.") == "-3"
    assert ex("72.0") == "72"
    assert ex("#### 5 #### 6") == "6"
    assert ex("no number here") is None
    assert ex("#### none") is None
    gold = ["She has 3 + 4 = 7.\n#### 7", "#### 1,200", "#### 5", None, "no number"]
    comps = ["I think 7", "That is 1200 apples.", "#### 6 (not 5)", "7", "7"]
    assert R.gsm8k_exact(["p"] * 5, comps, None, answer=gold) == [1.0, 1.0, 0.0, None, None]
    assert R.gsm8k_exact(["p"], ["nothing"], None, answer=["#### 3"]) == [0.0]


def test_regex_format_builtin():
    comps = ["<think>a\nb</think> 42", "  <think></think>", "42 <think>x</think>", "<think>x"]
    assert R.regex_format(["p"] * 4, comps, None) == [1.0, 1.0, 0.0, 0.0]
    assert R.regex_format(["p"] * 2, ["ANSWER: 3", "3"], None,
                          format_pattern=[r"^ANSWER: \d+$", None]) == [1.0, 0.0]
    assert R.regex_format(["p"], ["ANSWER: 3"], None, format_pattern=r"^ANSWER") == [1.0]


def test_length_penalty_builtin():
    ids = [[], [1] * 8, [1] * 16]
    assert R.length_penalty(["p"] * 3, [""] * 3, ids, max_completion_length=16) == \
        [0.0, -0.5, -1.0]
    assert R.length_penalty(["p"], [""], [[1] * 64]) == [-64 / 256]  # default max 256
    with pytest.raises(ValueError, match="needs completion_ids"):
        R.length_penalty(["p"], [""], None)


@pytest.mark.parametrize("L, want", [
    (0, 0.0), (11, 0.0), (12, 0.0),  # L <= Lmax - Lc = 12: no penalty (boundary included)
    (13, -0.25), (14, -0.5), (15, -0.75), (16, -1.0),  # linear ramp, -1 at L = Lmax
    (17, -1.0), (100, -1.0),  # beyond Lmax
])
def test_overlong_builtin_regimes(L, want):
    out = R.overlong(["p"], [""], [[1] * L], max_completion_length=16, overlong_cache=4)
    assert out == [pytest.approx(want)]
    assert R.overlong_penalty(L, 16, 4) == pytest.approx(want)


def test_overlong_defaults_and_columns():
    # defaults: Lmax 256, Lc = 256 // 4 = 64: no penalty up to 192, -0.5 at 224
    assert R.overlong(["p"] * 3, [""] * 3, [[1] * 192, [1] * 224, [1] * 257]) == [0.0, -0.5, -1.0]
    # per-row columns via a RewardSet; context provides the cache size
    rs = load_reward_functions("easyrl.rewards:overlong", context={"overlong_cache": 2})
    total, m = rs(["p", "q"], ["", ""], [[1] * 7, [1] * 9],
                  {"max_completion_length": [8, 10]})
    np.testing.assert_allclose(total, [-0.5, -0.5])
    assert m["rewards/overlong/mean"] == pytest.approx(-0.5)
    with pytest.raises(RewardError, match="'overlong' .*raised ValueError: overlong_cache must be"):
        rs(["p"], [""], [[1]], {"overlong_cache": [0]})


def test_no_eval_in_module():
    import inspect
    src = inspect.getsource(R)
    assert "eval(" not in src and "exec(" not in src.replace("exec_module(", "")


def test_boxed_math_string_normalised_match():
    """The last \\boxed{} (braces balanced) against the answer's own boxed value or the whole
    answer, after the LaTeX normalisation; no boxed value scores 0, no answer None."""
    assert R.last_boxed(r"a \boxed{1} then \boxed{\frac{x^{2}}{2}} end") == r"\frac{x^{2}}{2}"
    assert R.last_boxed(r"\fbox{7}") == "7" and R.last_boxed(r"\boxed{4") is None
    assert R.last_boxed("none") is None
    assert R.normalize_math(r"\left( 1, \dfrac{1}{2} \right)") == r"(1,\frac{1}{2})"
    assert R.normalize_math(r"\text{ 1,000.0 }") == "1000"
    assert R.normalize_math(r"90^\circ") == "90" and R.normalize_math("$5$.") == "5"
    comps = [r"so \boxed{\dfrac{1}{2}}", r"\boxed{\frac{1}{2}}.", "1/2", r"\boxed{3.0}",
             r"\boxed{0.5}", r"\boxed{2}"]
    gold = [r"\frac{1}{2}", r"The answer is \boxed{\tfrac{1}{2}}", r"\frac{1}{2}", "3",
            r"\frac{1}{2}", None]
    assert R.boxed_math(["p"] * 6, comps, None, answer=gold) == [1.0, 1.0, 0.0, 1.0, 0.0, None]
    assert "boxed_math" in R.BUILTINS
    name, fn = R.resolve_reward_function("boxed_math")
    assert fn is R.boxed_math
