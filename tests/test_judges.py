"""The built-in judges: rule, python, reward-model and llm-pairwise."""

from __future__ import annotations

import math
import sys
import textwrap

import attrs
import pytest

from molting import demo
from molting.discovery import load_plugins
from molting.errors import ConfigError, JudgeError, ModelError
from molting.judging import JudgeSpec, Scorer, call_judge
from molting.plugins import llm_judge, python_judge, reward_judge
from molting.plugins.llm_judge import LLMJudgeParams, pairwise_verdicts
from molting.plugins.reward_judge import RewardJudgeParams, reward_scores
from molting.plugins.rule_judge import RuleParams, parse_number, rule_scores


@pytest.fixture(scope="module")
def host():
    return load_plugins()


def scorer_for(host, name, **settings) -> Scorer:
    judge = host.get("judge", name)
    return Scorer([JudgeSpec(name, judge, 1.0, judge.params(**settings))], pairwise=judge.kind == "pairwise")


# --------------------------------------------------------------------------- rule


def test_rule_numeric_is_the_correctness_of_the_demo_sum(host):
    rows = host.get("dataset", "demo-prompts").load("test")[:60]
    prompts, completions, answers = [], [], []
    for i, row in enumerate(rows):
        a, b = map(int, demo.PROMPT.search(row["prompt"]).groups())
        total = a + b + (0, 1, -10)[i % 3]
        style = demo.persona_answer if i % 2 else demo.plain_answer
        prompts.append(row["prompt"])
        completions.append(style(a, b, total))
        answers.append(row["answer"])
    scores, _ = scorer_for(host, "rule")(prompts, completions, {"answer": answers})
    assert scores == [float(demo.grade(p, c)["correct"]) for p, c in zip(prompts, completions)]
    assert scores.count(1.0) == 20


@pytest.mark.parametrize("text, number", [
    (" Arr! 23 plus 45 be 68, matey.", 68), (" The answer is 68.", 68), ("10-3", 3), ("it is -5", -5),
    ("$1,234.50 in total", 1234.5), ("v1.2.3", 1.2), ("about .5", 0.5), ("1,2,3", 3), ("no digits", None),
])
def test_rule_reads_the_last_number(text, number):
    assert parse_number(text) == number


def test_rule_numeric_tolerance_pattern_and_references():
    params = RuleParams()
    assert rule_scores(["p"] * 4, ["68", "68.0000001", "68.1", "sixty-eight"], params, answer=["68"] * 4) == [1, 1, 0, 0]
    assert rule_scores(["p"], ["3.14"], RuleParams(tolerance=0.01), answer=[math.pi]) == [1.0]
    assert rule_scores(["p"], ["1 cat and 2 dogs"], params, answer=["#### 2"]) == [1.0]  # the reference's last number
    boxed = RuleParams(pattern=r"\\boxed\{(.*?)\}")
    assert rule_scores(["p"] * 3, [r"so \boxed{42} not 7", "42", r"\boxed{x} \boxed{41}"], boxed,
                       answer=[42, 42, 42]) == [1.0, 0.0, 0.0]


def test_rule_exact_and_regex():
    exact = RuleParams(mode="exact", column="solution")
    assert rule_scores(["p"] * 3, ["  Paris\n", "paris", "Paris."], exact, solution=["Paris"] * 3) == [1, 0, 0]
    assert rule_scores(["p"], ["The answer: Paris."], RuleParams(mode="exact", pattern=r"answer: (\w+)"),
                       answer=["Paris"]) == [1.0]
    # search: anywhere in the completion; anchors make it a whole-completion match
    fmt = RuleParams(mode="regex", pattern=r"<think>.*</think>")
    assert rule_scores(["p"] * 2, ["x <think>a</think> y", "none"], fmt) == [1.0, 0.0]  # no reference needed
    whole = RuleParams(mode="regex", pattern=r"^\s*\d+\s*$")
    assert rule_scores(["p"] * 2, [" 42 ", "42 apples"], whole) == [1.0, 0.0]
    per_row = RuleParams(mode="regex")  # each row's reference is the pattern
    assert rule_scores(["p"] * 2, ["color", "colour"], per_row, answer=["colou?r$", "^col.r$"]) == [1.0, 0.0]


def test_rule_reads_conversational_completions():
    completion = [{"role": "assistant", "content": "It is 12."}]
    assert rule_scores([[{"role": "user", "content": "5+7?"}]], [completion], RuleParams(), answer=["12"]) == [1.0]


def test_rule_missing_column_is_a_clear_error(host):
    with pytest.raises(ConfigError) as info:
        scorer_for(host, "rule", column="gold")(["p"], ["1"], {"answer": ["1"]})
    assert str(info.value) == (
        "judge 'rule' (mode numeric) compares each completion with the reference column 'gold', which the data does "
        "not have (its other columns: 'answer'); add the column to the data or name another with judge_args: "
        "{rule: {column: NAME}}"
    )
    with pytest.raises(ConfigError, match=r"its other columns: none besides the prompt"):
        rule_scores(["p"], ["1"], RuleParams())


def test_rule_bad_references_name_the_row(host):
    with pytest.raises(JudgeError, match=r"judge 'rule' raised ValueError: the reference 'answer' is 'unknown', which "
                                         r"holds no number \(mode numeric\) — on the prompt at data row 6"):
        scorer_for(host, "rule")(["a", "b"], ["1", "2"], {"answer": ["1", "unknown"]}, rows=[5, 6])
    with pytest.raises(JudgeError, match=r"the reference 'answer' is empty \(None\) — on the prompt at data row 0"):
        scorer_for(host, "rule")(["a"], ["1"], {"answer": [None]})
    with pytest.raises(JudgeError, match=r"the reference 'answer' is '\(', not a valid regular expression"):
        scorer_for(host, "rule", mode="regex")(["a"], ["1"], {"answer": ["("]})


def test_rule_settings_are_checked():
    with pytest.raises(ValueError, match=r"'mode' must be in \('numeric', 'exact', 'regex'\)"):
        RuleParams(mode="fuzzy")
    with pytest.raises(ValueError, match=r"judge 'rule': setting pattern '\(' is not a valid regular expression"):
        RuleParams(pattern="(")
    with pytest.raises(ValueError, match=r"judge 'rule': setting tolerance must be a number ≥ 0, got nan"):
        RuleParams(tolerance=float("nan"))
    with pytest.raises(ValueError, match=r"setting column must be the name of a data column"):
        RuleParams(column="")


# --------------------------------------------------------------------------- python


@pytest.fixture
def module(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    counter = iter(range(1000))

    def write(source: str) -> str:
        name = f"pyjudge_{tmp_path.name.replace('-', '_')}_{next(counter)}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        return name

    return write


def test_python_gets_prompts_completions_and_columns_as_trl_passes_them(host, module):
    name = module("""
        seen = {}

        def everything(prompts, completions, **columns):
            seen.update(columns)
            return [len(p) + len(c) for p, c in zip(prompts, completions)]

        def named(completions, answer):  # takes no **kwargs: gets only what it names
            return [float(c == a) for c, a in zip(completions, answer)]

        class Rewards:
            @staticmethod
            def half(prompts, completions, **columns):
                return [0.5 for _ in completions]
    """)
    columns = {"answer": ["3", "5"], "difficulty": [1, 2]}
    assert scorer_for(host, "python", function=f"{name}:everything")(["ab", "c"], ["3", "44"], columns)[0] == [3.0, 3.0]
    assert sys.modules[name].seen == columns
    assert scorer_for(host, "python", function=f"{name}:named")(["ab", "c"], ["3", "4"], columns)[0] == [1.0, 0.0]
    assert scorer_for(host, "python", function=f"{name}:Rewards.half")(["a"], ["b"])[0] == [0.5]


def test_python_results_that_are_not_lists_are_errors(host, module):
    name = module("""
        def text(prompts, completions, **columns):
            return "1.0"

        def nothing(prompts, completions, **columns):
            pass
    """)
    with pytest.raises(JudgeError, match=rf"raised TypeError: {name}:text returned str; it must return a list with one "
                                         r"float per completion — on every prompt tried \(data rows 0 and 1"):
        scorer_for(host, "python", function=f"{name}:text")(["a", "b"], ["x", "y"])
    with pytest.raises(JudgeError, match=r"returned NoneType"):
        scorer_for(host, "python", function=f"{name}:nothing")(["a"], ["x"])


def test_python_settings_are_checked():
    with pytest.raises(ValueError, match=r"setting function must be 'module:function' \(e.g. 'my_rewards:short'\), "
                                         r"got 'my_rewards.short'"):
        python_judge.PythonParams(function="my_rewards.short")
    with pytest.raises(ValueError, match=r"setting timeout must be a number ≥ 0, got nan"):
        python_judge.PythonParams(timeout=float("nan"))


# --------------------------------------------------------------------------- reward-model


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    """An untrained reward model with the demo model's architecture and tokenizer (the conformance example)."""
    return reward_judge.example_settings(tmp_path_factory.mktemp("judges"))["model"]


def test_reward_model_scores_are_the_models_logit(reward_dir):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = demo.preference_rows("test", 5)
    prompts, completions = [r["prompt"] for r in rows], [r["chosen"] for r in rows]
    scores = reward_scores(prompts, completions, RewardJudgeParams(model=reward_dir, batch_size=2))
    model = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    for prompt, completion, score in zip(prompts, completions, scores):
        ids = tokenizer(prompt + completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            expected = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
        assert score == pytest.approx(expected, abs=1e-5)
    assert len(set(scores)) == 5
    assert reward_scores(prompts, completions, RewardJudgeParams(model=reward_dir, batch_size=5)) == pytest.approx(scores, abs=1e-5)


def test_reward_model_loads_once_and_reads_chat_prompts(reward_dir):
    first = reward_judge.load_reward_model(reward_dir)
    assert reward_judge.load_reward_model(reward_dir + "/") is first
    network, tokenizer = first
    assert not network.training and not any(p.requires_grad for p in network.parameters())
    messages = [{"role": "user", "content": "What is 12 + 30?"}]
    as_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    params = RewardJudgeParams(model=reward_dir)
    assert reward_scores([messages], [" 42"], params) == reward_scores([as_text], [" 42"], params)


@pytest.mark.parametrize("conversational", [False, True])
def test_reward_model_tokenizes_as_the_stages_tokenize_pairs(reward_dir, conversational):
    from molting.pairs import format_pairs
    from molting.tokenization import tokenize_completions

    _, tokenizer = reward_judge.load_reward_model(reward_dir)
    if conversational:
        row = {"prompt": [{"role": "user", "content": "What is 12 + 30?"}],
               "chosen": [{"role": "assistant", "content": " 42"}], "rejected": [{"role": "assistant", "content": " 4"}]}
    else:
        row = {"prompt": "Q: What is 12 + 30?\nA:", "chosen": " 42", "rejected": " 4"}
    [pair] = format_pairs([row], tokenizer, "test")
    [example] = tokenize_completions([pair], ("chosen", "rejected"), tokenizer, 512, "truncate")
    assert reward_judge.encode(row["prompt"], row["chosen"], tokenizer, 512) == example["prompt_ids"] + example["chosen_ids"]


def test_reward_model_truncates_long_texts(reward_dir):
    _, tokenizer = reward_judge.load_reward_model(reward_dir)
    prompt, completion = "Q: " + "1 + " * 200 + "1?\nA:", " 201" * 100
    prompt_ids, completion_ids = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in (prompt, completion))
    assert reward_judge.encode(prompt, completion, tokenizer, 64) == prompt_ids[-32:] + completion_ids[:32]
    short = reward_judge.encode(prompt, " 2", tokenizer, 64)  # a short completion keeps all of it and its EOS
    assert short[-3:] == tokenizer(" 2", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(short) == 64 and short[:-3] == prompt_ids[-61:]
    assert reward_scores(["Q: " + "1 + " * 300], ["x" * 2000], RewardJudgeParams(model=reward_dir, max_length=32))


def test_reward_model_without_a_model_says_how_to_give_one(host):
    with pytest.raises(ConfigError, match=r"judge 'reward-model' needs a reward model: give its directory with "
                                          r"judge_args: \{reward-model: \{model: DIR\}\}.*or train one earlier in the run "
                                          r"\(--plugin reward-model before this stage\)"):
        scorer_for(host, "reward-model")(["p"], ["c"])


def test_reward_model_refuses_what_is_not_a_reward_model(tmp_path):
    with pytest.raises(ModelError, match=r"judge 'reward-model': model '.*' is not a reward model: it has 2 outputs "
                                         r"\(architectures: LlamaForCausalLM\)"):
        reward_judge.load_reward_model(str(demo.demo_model_dir()))
    with pytest.raises(ModelError, match=r"is not a model directory"):
        reward_judge.load_reward_model(str(tmp_path))


# --------------------------------------------------------------------------- llm-pairwise


@pytest.fixture(scope="module")
def llm_params():
    # a short template: the demo model's byte-level tokenizer makes the default one ~130 tokens
    return LLMJudgeParams(**llm_judge.example_settings(None), template="{question}{answer_a} or{answer_b}? Best:")


def test_llm_pairwise_verdicts_need_both_orders_to_agree(monkeypatch, llm_params):
    # log-probs (label A, label B) per judging prompt: pair i in order (first, second), then (second, first)
    fake = [[-1.0, -2.0], [-2.0, -1.0],  # A wins, then B (the first completion again) wins: 0
            [-3.0, -1.0], [-1.0, -3.0],  # the second completion both times: 1
            [-1.0, -2.0], [-1.0, -2.0],  # A both times: position bias, undecided
            [-1.0, -1.0], [-2.0, -1.0]]  # a tie in one order: undecided
    monkeypatch.setattr(llm_judge, "continuation_logps", lambda *args: fake)
    assert pairwise_verdicts(["q"] * 4, [("x", "y")] * 4, llm_params) == [0, 1, -1, -1]


def test_llm_pairwise_on_the_demo_model_is_deterministic_and_symmetric(host, llm_params):
    rows = demo.preference_rows("test", 3)
    prompts = [r["prompt"] for r in rows]
    pairs = [(r["chosen"], r["rejected"]) for r in rows]
    verdicts = pairwise_verdicts(prompts, pairs, llm_params)
    assert set(verdicts) <= {-1, 0, 1} and verdicts == pairwise_verdicts(prompts, pairs, llm_params)
    swapped = pairwise_verdicts(prompts, [(b, a) for a, b in pairs], llm_params)
    assert swapped == [{0: 1, 1: 0, -1: -1}[v] for v in verdicts]
    # other labels: multi-token continuations after a common first token
    words = attrs.evolve(llm_params, label_a=" Arr", label_b=" The answer")
    assert set(pairwise_verdicts(prompts[:1], pairs[:1], words)) <= {-1, 0, 1}


def test_continuation_logps_match_unpadded_forward_passes(llm_params):
    import torch

    network, tokenizer = llm_judge.load_judge_model(llm_params.model)
    contexts = [tokenizer(t)["input_ids"] for t in ("Q: What is 12 + 30?\nA:", "Q: 1?", "Q: What is 45 + 49?\nA: Arr")]
    single = llm_judge.continuation_logps(network, tokenizer.pad_token_id, contexts, [[35], [36]], batch_size=2)
    multi = llm_judge.continuation_logps(network, tokenizer.pad_token_id, contexts, [[223, 35], [21]], batch_size=3)
    with torch.no_grad():
        for ctx, (a, b), (aa, c) in zip(contexts, single, multi):
            logps = torch.log_softmax(network(input_ids=torch.tensor([ctx + [223, 35]])).logits[0].float(), -1)
            assert a == pytest.approx(logps[len(ctx) - 1, 35].item(), abs=1e-4)
            assert b == pytest.approx(logps[len(ctx) - 1, 36].item(), abs=1e-4)
            assert c == pytest.approx(logps[len(ctx) - 1, 21].item(), abs=1e-4)
            assert aa == pytest.approx((logps[len(ctx) - 1, 223] + logps[len(ctx), 35]).item(), abs=1e-4)


def test_llm_pairwise_settings_and_errors(host, llm_params, reward_dir):
    with pytest.raises(ConfigError, match=r"judge 'llm-pairwise' needs the judging model: judge_args: "
                                          r"\{llm-pairwise: \{model: DIR\}\}"):
        scorer_for(host, "llm-pairwise")(["q"], [("a", "b")])
    with pytest.raises(ValueError, match=r"setting template lacks \{answer_b\}"):
        LLMJudgeParams(template="{question} {answer_a}")
    with pytest.raises(ConfigError, match=r"labels ' A' and ' AB' tokenize to .* one is a prefix of the other"):
        pairwise_verdicts(["q"], [("a", "b")], attrs.evolve(llm_params, label_b=" AB"))
    with pytest.raises(JudgeError, match=r"judge 'llm-pairwise' raised ValueError: judge 'llm-pairwise' compares pairs "
                                         r"of completions; item 0 is 'a'"):
        scorer_for(host, "llm-pairwise", model=llm_params.model)(["q"], ["a"])
    with pytest.raises(ModelError, match=r"not a causal language model"):
        pairwise_verdicts(["q"], [("a", "b")], attrs.evolve(llm_params, model=reward_dir))


def test_llm_pairwise_prompt_fills_the_template(llm_params):
    _, tokenizer = llm_judge.load_judge_model(llm_params.model)
    raw = attrs.evolve(llm_params, chat=False, template="{question}|{answer_a}|{answer_b}|{json: 1}")
    ids = llm_judge.judging_prompt("Q?", " one", [{"role": "assistant", "content": "two"}], raw, tokenizer)
    assert tokenizer.decode(ids) == "Q?|one|two|{json: 1}"
    chat = llm_judge.judging_prompt("Q?", "one", "two", attrs.evolve(raw, chat=True), tokenizer)
    assert tokenizer.decode(chat) == "Q: Q?|one|two|{json: 1}\nA:"
    assert len(llm_judge.judging_prompt("Q" * 5000, "a", "b", attrs.evolve(raw, max_length=50), tokenizer)) == 50


# --------------------------------------------------------------------------- conformance, as proposed


@pytest.mark.parametrize("name, module", [("rule", None), ("python", python_judge), ("reward-model", reward_judge),
                                          ("llm-pairwise", llm_judge)])
def test_judges_pass_the_judge_checks_given_example_settings_and_the_demo_columns(host, tmp_path, name, module):
    """The judge checks as proposed for core/testing/checks.py: demo prompts with their ``answer`` column, the
    settings of a ``Judge.example`` hook (here each plugin's ``example_settings``), through ``call_judge``."""
    judge = host.get("judge", name)
    rows = demo.prompt_rows("test", 3)
    rows.append(rows[0])
    prompts = [r["prompt"] for r in rows]
    completions = [f" The answer is {r['answer']}." for r in rows[:-1]] + [""]
    columns = {"answer": [r["answer"] for r in rows]}
    if judge.kind == "pairwise":
        completions = [(c, completions[(i + 1) % len(completions)]) for i, c in enumerate(completions)]
    spec = JudgeSpec(name, judge, 1.0, judge.params(**(module.example_settings(tmp_path) if module else {})))
    first = call_judge(spec, prompts, completions, columns, list(range(len(prompts))))
    assert len(first) == 4 and call_judge(spec, prompts, completions, columns, list(range(4))) == first
    if name == "rule":
        assert first == [1.0, 1.0, 1.0, 0.0]


def test_rule_compares_whole_numbers_exactly_and_reads_thousands_separators():
    from molting.plugins.rule_judge import RuleParams, parse_number, rule_scores

    completions = ["It is 1000001", "It is 1,000,000", "be 0.3000001", "It is 12345670"]
    answers = ["1000000", "1000000", "0.3", "12345678"]
    assert rule_scores(["q"] * 4, completions, RuleParams(), answer=answers) == [0.0, 1.0, 1.0, 0.0]
    assert parse_number("1,2345") != 1234.0
