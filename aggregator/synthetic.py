"""The FedProx paper's Synthetic(α, β) federated data set (Li et al. 2020).

Follows the paper's reference generator: per device k, u_k ~ N(0, α) and
B_k ~ N(0, β) (α and β are standard deviations, as in the reference code),
v_k ~ N(B_k, 1) per feature, W_k and b_k ~ N(u_k, 1), x ~ N(v_k, Σ) with
Σ = diag(j^-1.2), y = argmax(softmax(W_k x + b_k)), and
n_k = int(lognormal(4, 2)) + 50 samples.
"""

from __future__ import annotations

import numpy as np

# The reference code draws n_k from lognormal(4, 2), whose tail reaches tens
# of thousands; we keep the law but cap a device at this many samples so a
# simulation of 30 devices stays in memory and time budgets on a small
# machine (the reference code caps nothing; this is stated in the docs).
MAX_DEVICE_SAMPLES = 20_000


def synthetic(
    alpha: float,
    beta: float,
    n_devices: int = 30,
    dim: int = 60,
    n_classes: int = 10,
    seed: int = 0,
    iid: bool = False,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-device (X float32 [n_k, dim], y int64 [n_k]) for Synthetic(α, β).

    ``iid=True`` gives the paper's Synthetic-IID: one shared W, b and
    v = 0 for every device.
    """
    rng = np.random.default_rng(seed)
    sizes = np.minimum(rng.lognormal(4, 2, n_devices).astype(int) + 50, MAX_DEVICE_SAMPLES)
    sigma = np.array([(j + 1) ** -1.2 for j in range(dim)])
    shared_W = rng.normal(0, 1, (dim, n_classes))
    shared_b = rng.normal(0, 1, n_classes)
    out = []
    for k in range(n_devices):
        if iid:
            W, b, v = shared_W, shared_b, np.zeros(dim)
        else:
            u_k = rng.normal(0, alpha)
            B_k = rng.normal(0, beta)
            v = rng.normal(B_k, 1, dim)
            W = rng.normal(u_k, 1, (dim, n_classes))
            b = rng.normal(u_k, 1, n_classes)
        X = rng.normal(v, np.sqrt(sigma), (sizes[k], dim))
        y = np.argmax(X @ W + b, axis=1)  # argmax of softmax == argmax of logits
        out.append((X.astype(np.float32), y.astype(np.int64)))
    return out
