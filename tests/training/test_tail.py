import math
from types import SimpleNamespace

import numpy as np
import pytest

from hhdpo.core.io import read_jsonl
from hhdpo.training.tail import TailTest, adapt_beta


def cfg(**kw):
    base = dict(delta=0.2, lambda_=0.5, save_npy=True, adaptive_beta=False, alpha=0.1, gamma=1.0, beta_min=0.01, beta_max=1.0)
    return SimpleNamespace(**{**base, **kw})


def test_warmup_pools_each_step_once_then_ema(tmp_path):
    rng = np.random.default_rng(0)
    steps = [rng.normal(size=8) for _ in range(5)]
    tt = TailTest(cfg(), warmup_steps=3, beta=0.1, log_dir=tmp_path)
    for i, m in enumerate(steps[:3], 1):
        tt.update(m, i, epoch=0)
    tau0 = np.quantile(np.concatenate(steps[:3]), 0.8)  # each step's margins counted once
    assert tt.tau == pytest.approx(tau0)
    out = tt.update(steps[3], 4, epoch=0)
    tau1 = 0.5 * tau0 + 0.5 * np.quantile(steps[3], 0.8)
    assert out["tau"] == pytest.approx(tau1)
    assert out["p_hat"] == pytest.approx(np.mean(steps[3] > tau1))
    assert out["risk_over"] == (out["p_hat"] > 0.2)
    log = read_jsonl(tmp_path / "global_tail_test_and_beta_log.jsonl")
    assert log[0]["type"] == "warmup_end" and log[0]["tau_0"] == pytest.approx(tau0)
    assert log[1]["step"] == 4
    margins = read_jsonl(tmp_path / "global_margins_log.jsonl")
    assert [r["step"] for r in margins] == [1, 2, 3, 4]
    assert set(margins[0]) >= {"epoch", "step", "batch_size", "mean", "std", "min", "p10", "median", "p90", "max", "pos_frac", "npy", "sample"}
    np.testing.assert_allclose(np.load(tmp_path / margins[1]["npy"]), steps[1], rtol=1e-6)


def test_adaptive_beta_formula():
    p_hat, delta, n = 0.5, 0.2, 16
    u = (p_hat - delta) / math.sqrt(delta * (1 - delta) / n)
    want = 0.1 * math.exp(0.05 * math.tanh(2.0 * u))
    assert adapt_beta(0.1, p_hat, delta, n, 0.05, 2.0, 0.01, 1.0) == pytest.approx(want)
    assert adapt_beta(0.1, 1.0, delta, n, 50.0, 2.0, 0.01, 0.3) == 0.3  # clipped


def test_state_roundtrip_continues_identically():
    rng = np.random.default_rng(1)
    steps = [rng.normal(size=6) for _ in range(6)]
    a = TailTest(cfg(adaptive_beta=True), 2, 0.1, None)
    for i, m in enumerate(steps, 1):
        a.update(m, i, 0)
    b = TailTest(cfg(adaptive_beta=True), 2, 0.1, None)
    for i, m in enumerate(steps[:1], 1):
        b.update(m, i, 0)
    c = TailTest(cfg(adaptive_beta=True), 2, 0.1, None)
    c.load_state_dict(b.state_dict())  # resumed mid-warmup
    for i, m in enumerate(steps[1:], 2):
        c.update(m, i, 0)
    assert (c.tau, c.beta) == pytest.approx((a.tau, a.beta))


def test_warmup_zero_means_no_warmup_pool(tmp_path):
    """tail_test.warmup_steps 0: the test runs from step 1, tau starting at that step's own quantile."""
    rng = np.random.default_rng(2)
    steps = [rng.normal(size=10) for _ in range(3)]
    tt = TailTest(cfg(adaptive_beta=True), warmup_steps=0, beta=0.1, log_dir=tmp_path)
    out1 = tt.update(steps[0], 1, epoch=0)
    tau1 = np.quantile(steps[0], 0.8)
    assert "type" not in out1 and out1["tau"] == pytest.approx(tau1)
    assert out1["p_hat"] == pytest.approx(np.mean(steps[0] > tau1))
    assert out1["beta"] == pytest.approx(adapt_beta(0.1, out1["p_hat"], 0.2, 10, 0.1, 1.0, 0.01, 1.0))
    out2 = tt.update(steps[1], 2, epoch=0)
    assert out2["tau"] == pytest.approx(0.5 * tau1 + 0.5 * np.quantile(steps[1], 0.8))
    log = read_jsonl(tmp_path / "global_tail_test_and_beta_log.jsonl")
    assert [r["step"] for r in log] == [1, 2] and not any(r.get("type") == "warmup_end" for r in log)
