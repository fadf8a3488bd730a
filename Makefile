# The two commands of the quickstart. Both set up what they need first.
#   make demo   run a whole federation on this machine
#   make test   run the whole test suite against a real mosquitto
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench setup-demo setup-dev clean

demo: setup-demo
	$(VENV)/bin/fedmqtt demo

test: setup-dev
	$(PY) -m pytest -q

bench: setup-dev
	$(PY) bench/bench_codec.py
	$(PY) bench/bench_ingest.py
	$(PY) bench/bench_agent_rss.py
	$(PY) bench/bench_onnx.py
	$(PY) bench/bench_rounds.py
	$(PY) bench/bench_secagg.py --quick
	$(PY) bench/bench_journal.py
	$(PY) bench/bench_startup.py
	$(PY) bench/bench_compression.py --jobs 2
	ulimit -v 16000000; timeout 900 $(PY) bench/bench_chunking.py
	$(PY) bench/bench_flower.py
	$(PY) bench/bench_scale.py --floor
	timeout 900 $(PY) bench/bench_brokers.py
	ulimit -v 16000000; timeout 900 $(PY) bench/bench_workers.py

setup-demo:
	@scripts/setup.sh $(VENV) aggregator,demo

# The tests run the demo and the dashboard too, so the dev set includes their extras.
setup-dev:
	@scripts/setup.sh $(VENV) aggregator,demo,dashboard,dev

clean:
	rm -rf $(VENV) fedmqtt-out .pytest_cache .hypothesis *.egg-info
