"""Secure aggregation (Bonawitz et al. 2017, with the SecAgg+ graph of Bell et al. 2020), the device's side.

The aggregator and the broker learn only the sum of the selected devices'
quantized updates. Pure parts, each unit-tested on its own:
:mod:`.shamir` (t-of-n secret sharing over a prime field), :mod:`.crypto`
(X25519 + HKDF key agreement, AES-GCM for shares, AES-CTR mask expansion),
:mod:`.quantize` (stochastic rounding into integers mod 2^b),
:mod:`.messages` (the wire format of the protocol's messages) and
:mod:`.client` (the device's protocol state machine, sans I/O).

Needs the ``cryptography`` package (``pip install 'fedmqtt[secagg]'``); a
device that never takes part in secure aggregation never imports it.
"""
