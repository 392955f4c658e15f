"""benchmarks/shapes_pg_snr.py: the unbiased signal and noise estimates from K gradient vectors."""

import math

import torch
from bench_scripts import load_benchmark


def test_signal_and_noise_of_a_known_set():
    snr = load_benchmark("shapes_pg_snr")
    # g_i = mu + 2 e_{i+1}: every pair's dot product is |mu|^2 = 9, every |g_i|^2 = 9 + 4
    mu = torch.zeros(6)
    mu[0] = 3.0
    grads = [mu + 2.0 * torch.eye(6)[i + 1] for i in range(4)]
    s = snr.signal_and_noise(grads)
    assert math.isclose(s["mean_sq"], 9.0) and math.isclose(s["noise_trace"], 4.0)
    assert math.isclose(s["snr_per_batch"], 9.0 / 4.0) and math.isclose(s["mean_pairwise_cosine"], 9.0 / 13.0)
    assert math.isclose(s["snr_per_batch_jackknife_se"], 0.0, abs_tol=1e-12)  # every leave-one-out set alike
    # pure noise (orthogonal, no common part): no signal
    noise = snr.signal_and_noise([torch.eye(5)[i] for i in range(5)])
    assert noise["mean_sq"] == 0.0 and noise["snr_per_batch"] == 0.0 and noise["mean_pairwise_cosine"] == 0.0
    uneven = snr.signal_and_noise([torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.0, 2.0])])
    assert uneven["snr_per_batch_jackknife_se"] > 0  # leave-one-out sets differ
