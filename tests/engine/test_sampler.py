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
