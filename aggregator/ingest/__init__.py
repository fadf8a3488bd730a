"""Ingest workers: the reading of a federation's updates split over processes (docs/PROTOCOL.md §10).

- :mod:`.wire`: the messages between the coordinator and its workers;
- :mod:`.coordinator`: the aggregator's round coordinator when workers read the updates;
- :mod:`.worker`: one worker process (``fedmqtt worker --index I``);
- :mod:`.supervisor`: the workers an aggregator starts and restarts itself (``[workers] spawn``).
"""
