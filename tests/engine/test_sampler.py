import torch

from tetrispec import SamplingParams
from tetrispec.engine.sampler import logits_to_probs, sample


def test_greedy_rows_are_one_hot_and_random_rows_softmax():
    logits = torch.tensor([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0]])
    probs = logits_to_probs(logits, [SamplingParams(temperature=0), SamplingParams(temperature=2.0)])
    assert probs[0].tolist() == [0.0, 1.0, 0.0]
    assert torch.allclose(probs[1], torch.softmax(logits[1] / 2.0, -1))


def test_top_k_and_top_p_truncate():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    k2 = logits_to_probs(logits, [SamplingParams(top_k=2)])
    assert torch.allclose(k2, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    p = logits_to_probs(logits, [SamplingParams(top_p=0.7)])  # 0.5 + 0.3 crosses 0.7: keep both
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    p = logits_to_probs(logits, [SamplingParams(top_p=0.5)])
    assert torch.allclose(p, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


def test_inverse_cdf_sampling_never_picks_zero_probability():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5]]).expand(1000, 4)
    u = torch.linspace(1e-6, 1.0, 1000)
    tokens = sample(probs, u)
    assert set(tokens.tolist()) == {1, 3}
    assert (tokens[:400] == 1).all() and (tokens[-400:] == 3).all()


def test_min_p_masks_tokens_below_min_p_times_the_top_after_temperature():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = logits_to_probs(logits, [SamplingParams(min_p=0.5)])  # floor 0.25: 0.15 and 0.05 go
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    p = logits_to_probs(logits, [SamplingParams(min_p=0.25)])  # floor 0.125: only 0.05 goes
    assert torch.allclose(p, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)
    # temperature 2 flattens to sqrt(p): 0.05 -> 0.224 / 0.707 of the top, which a floor of 0.25 drops,
    # 0.15 -> 0.548 of the top, which it keeps (before temperature it was below 0.5 and went)
    p = logits_to_probs(logits, [SamplingParams(min_p=0.5, temperature=2.0)])
    flat = torch.tensor([0.5, 0.3, 0.15, 0.0]).sqrt()
    assert torch.allclose(p, (flat / flat.sum())[None])
    p = logits_to_probs(logits, [SamplingParams(min_p=1.0)])  # only the most likely token
    assert p.tolist() == [[1.0, 0.0, 0.0, 0.0]]
    # rows mix: min_p 0 masks nothing, greedy ignores min_p
    p = logits_to_probs(logits.expand(3, 4), [SamplingParams(min_p=0.5), SamplingParams(),
                                              SamplingParams(temperature=0, min_p=0.9)])
    assert (p[0] > 0).tolist() == [True, True, False, False]
    assert torch.allclose(p[1], torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert p[2].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_min_p_comes_before_top_p():
    """vLLM's order: min_p on the full distribution, then top-p over what is left."""
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    p = logits_to_probs(logits, [SamplingParams(min_p=0.4, top_p=0.5)])  # min_p leaves 0.4, 0.3, 0.2 (floor .16)
    assert torch.allclose(p, torch.tensor([[4 / 7, 3 / 7, 0.0, 0.0]]))  # top-p 0.5 of 4/9, 3/9, 2/9 keeps two
