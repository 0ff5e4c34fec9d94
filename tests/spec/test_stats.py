from tetrispec.spec.stats import SpecStats


def test_record_and_summary():
    s = SpecStats()
    s.record(drafted=4, verified=3, accepted=2, emitted=3)
    s.record(drafted=4, verified=0, accepted=0, emitted=1)
    s.record(drafted=0, verified=0, accepted=0, emitted=1)  # a plain decode
    out = s.summary()
    assert out["verification_success_rate"] == 2 / 3
    assert out["draft_acceptance_rate"] == 2 / 8
    assert out["system_efficiency"] == 5 / (3 + 3)
    assert out["mean_accepted_length"] == 2 / 2
    assert out["per_position_acceptance"] == [1.0, 1.0, 0.0]
    assert out["oracle_efficiency"] is None


def test_merge():
    a, b = SpecStats(), SpecStats()
    a.record(2, 2, 1, 2)
    b.record(3, 3, 3, 4)
    a.merge(b)
    assert (a.drafted, a.verified, a.accepted, a.emitted) == (5, 5, 4, 6)
    assert a.verified_per_pos == [2, 2, 1] and a.accepted_per_pos == [2, 1, 1]
