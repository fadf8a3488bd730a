"""A small PyTorch CNN for scikit-learn's 8x8 digits, written only against fedmqtt's public API.

The network is plain PyTorch: two 3x3 convolutions (1 -> 16 -> 32 channels,
ReLU), one 2x2 max-pool, one linear layer to the 10 digit logits; 9,930
parameters, so ten devices train it in seconds on two CPU cores. fedmqtt
rows are flat (float32 [n, 64], the pixels divided by 16); ``forward``
makes them [n, 1, 8, 8] images itself.

:class:`DigitsCNN` is a :class:`fedmqtt.TorchModel` with no constructor
arguments, so a configuration file names it with
``kind = "digits_cnn:DigitsCNN"`` (this directory on ``PYTHONPATH``) and a
Python program passes ``DigitsCNN()``. On the wire it is nothing special:
its parameters are the state_dict entries (``conv1.weight``, ...) as named
float32 arrays, exactly as the numpy models' arrays.

Local training is the user's own loop (:func:`train`, the ``fit`` of a
Flower client): SGD with momentum 0.9 rather than fedmqtt's default plain
SGD, because momentum is what a PyTorch user reaches for first and it pays
here: on federate.py's partition (E = 5, batch 32) it reaches 0.978 test
accuracy after 20 rounds at lr 0.05, where the default loop at lr 0.1
reaches 0.969 (and 0.59 against 0.44 after the first round). The optimizer,
and so its momentum, is new every round: no local state outlives a round,
which is what FedAvg assumes. The loop honours FedProx's ``prox_mu`` too,
so the same class works under ``strategy = "fedprox"``.

The batch order comes from torch's RNG, which TorchModel seeds from the
round's seed before each fit. That RNG is process-global: two instances
training at the same time in one process would draw from each other's
streams, so simulated devices in one process share one instance (its lock
makes their fits take turns), as federate.py does.

torch is imported here, at top level: only the processes that train or
export this model import this file; a numpy-only device never does.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import fedmqtt

N_PIXELS, N_CLASSES = 64, 10
MOMENTUM = 0.9


class Net(nn.Module):
    """conv(1->16) ReLU conv(16->32) ReLU maxpool(2) linear(512->10): logits [n, 10] from rows [n, 64]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, 1, 8, 8)
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(torch.flatten(x, 1))


def train(net: nn.Module, data: fedmqtt.TrainData, config: fedmqtt.TrainConfig) -> dict[str, float]:
    """One round of local training, as a Flower client's ``fit`` would do it: (metrics).

    ``net`` already holds the global model and is in train mode; torch's RNG
    is seeded from the round's seed, so the batch order drawn from it makes
    the round reproducible. Whatever ``net`` holds afterwards is the update.
    """
    optimizer = torch.optim.SGD(net.parameters(), lr=config.lr, momentum=MOMENTUM)
    anchor = [p.detach().clone() for p in net.parameters()] if config.prox_mu > 0 else None
    rng = np.random.default_rng(int(torch.randint(2**62, ())))  # the batch order, from torch's seeded RNG
    losses: list[float] = []
    for _ in range(config.epochs):
        losses = []
        for Xb, yb in data.epoch(rng, config.batch_size):  # arrays or the device's own stream
            optimizer.zero_grad()
            loss = F.cross_entropy(net(torch.tensor(Xb, dtype=torch.float32)), torch.tensor(yb, dtype=torch.int64))
            total = loss
            if anchor is not None:  # FedProx: stay near the global model
                total = loss + config.prox_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(net.parameters(), anchor))
            total.backward()
            optimizer.step()
            losses.append(loss.item())
    return {"loss": float(np.mean(losses))} if losses else {}


class DigitsCNN(fedmqtt.TorchModel):
    """The CNN as a fedmqtt model: 64 pixel features in, 10 digit classes out, trained by :func:`train`."""

    kind = "digits_cnn:DigitsCNN"

    def __init__(self) -> None:
        # Net (the class) is the factory: init_params(seed) is torch.manual_seed(seed); Net().
        super().__init__(Net, n_features=N_PIXELS, n_outputs=N_CLASSES, fit_fn=train)
