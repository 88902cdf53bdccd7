"""How online stages sample: the drawn distribution, the warpers, and nothing of the model's own generation config."""

from __future__ import annotations

import pytest
import torch


def test_the_sampler_draws_from_the_softmax_of_the_scores():
    from molting.sampling import InverseCdfSampler

    torch.manual_seed(0)
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, -40.0, float("-inf")])
    rows = 200_000
    scores = InverseCdfSampler()(None, logits.repeat(rows, 1))
    drawn = scores.argmax(dim=-1)
    assert (scores.isfinite().sum(dim=-1) == 1).all()  # only the drawn token is left
    frequencies = torch.bincount(drawn, minlength=6).double() / rows
    expected = torch.softmax(logits.double(), dim=-1)
    assert torch.allclose(frequencies, expected, atol=4e-3), (frequencies, expected)
    assert frequencies[4:].sum() == 0  # a ~1e-18 share and a masked token are never drawn here


def _always(model, token: int, logit: float = 20.0):
    """``model`` with an output layer whose logits favour ``token`` by ``logit`` whatever the input."""
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    torch.nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.zero_()
        head.bias[token] = logit
    model.set_output_embeddings(head)
    model.config.tie_word_embeddings = False
    return model


@pytest.fixture
def demo(demo_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(demo_model), AutoTokenizer.from_pretrained(demo_model)


def test_the_models_own_generation_config_does_not_apply(demo):
    """A hub model's generation_config may set repetition_penalty, top_k, ...; sampling follows the stage alone."""
    from molting.sampling import sample

    model, tokenizer = demo
    token = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(" 7")[-1])
    model = _always(model, token)
    model.generation_config.repetition_penalty = 1e9  # would make every repeat impossible
    model.generation_config.max_new_tokens = 1
    samples = sample(model, tokenizer, ["Q: What is 3 + 4?\nA:"], n=2, max_new_tokens=6, temperature=1.0)
    assert samples.completion_ids.tolist() == [[token] * 6] * 2
    assert model.generation_config.repetition_penalty == 1e9  # restored afterwards


def test_top_k_one_is_greedy_and_temperature_zero_too(demo):
    from molting.sampling import sample

    model, tokenizer = demo
    prompts = ["Q: What is 12 + 30?\nA:", "Q: What is 5 + 9?\nA:"]
    greedy = sample(model, tokenizer, prompts, max_new_tokens=8, temperature=0)
    torch.manual_seed(1)
    top1 = sample(model, tokenizer, prompts, max_new_tokens=8, temperature=1.3, top_k=1)
    assert torch.equal(greedy.completion_ids, top1.completion_ids)
