import pytest

from tetrispec import SamplingParams


@pytest.mark.parametrize("kw, match", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature="hot"), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=True), "max_tokens"),
    (dict(seed="x"), "seed"),
    (dict(seed=2**64), "seed"),  # torch.Generator.manual_seed overflows
    (dict(top_k=2**63), "top_k"),  # overflows the int64 tensor inside an engine step
    (dict(stop=[""]), "stop"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
])
def test_invalid_params_raise_with_the_name(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


def test_defaults_and_normalisation():
    p = SamplingParams(temperature=0, stop="###")
    assert p.greedy and p.stop == ["###"] and p.max_tokens == 16
    assert not SamplingParams().greedy
    assert SamplingParams(temperature=1e-40).greedy  # logits / 1e-40 overflowed to NaN probabilities
