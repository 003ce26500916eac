"""Plain helpers for tests (importable: pytest puts tests/ on sys.path)."""


def assert_same_weights(a, b):
    import torch

    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb), sorted(set(sa) ^ set(sb))[:5]
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def assert_same_model(m1, m2):
    assert m1.family == m2.family
    assert_same_weights(m1.unet, m2.unet)
    assert_same_weights(m1.vae, m2.vae)
    assert len(m1.text_encoders) == len(m2.text_encoders)
    for a, b in zip(m1.text_encoders, m2.text_encoders):
        assert_same_weights(a, b)
