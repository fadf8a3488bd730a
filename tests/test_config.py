"""The TOML config loader, the aggregator and agent config classes, flags, and the CLI's error path."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aggregator.config import AggregatorConfig, ModelConfig, RoundConfig, TrainingConfig
from edge_agent.agent_config import AgentConfig
from edge_agent.config import (
    BrokerConfig,
    ConfigError,
    add_flags,
    flag_overrides,
    leaf_fields,
    load,
    parse_hostport,
)

REPO = Path(__file__).resolve().parent.parent
FEDMQTT = Path(sys.executable).parent / "fedmqtt"

AGGREGATOR_TOML = """\
federation = "plant-7"
rounds = 12
state_dir = "/var/lib/fedmqtt"

[strategy]
name = "fedavg_unweighted"

[model]
kind = "mlp"
n_features = 64
n_outputs = 10
hidden = [32, 16]
seed = 3

[training]
epochs = 2
batch_size = 16
lr = 0.05

[round]
min_agents = 3
agents_per_round = 5
quorum = 4
timeout = 30

[broker]
host = "broker.local"
port = 8883
keepalive = 60
username = "agg"
password = "secret"
"""

AGENT_TOML = """\
federation = "plant-7"
agent_id = "press-04"
data = "/data/local.npz"
label_column = "y"
holdout = 0.25
seed = 9
exit_when_done = true

[broker]
host = "10.0.0.2"
port = 1884
"""


def _toml(tmp_path: Path, text: str, name: str = "c.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _error(cls, path, overrides=None) -> str:
    with pytest.raises(ConfigError) as info:
        load(cls, path, overrides)
    return str(info.value)


# ---------------------------------------------------------------------------
# valid files


def test_load_aggregator_config(tmp_path):
    cfg = load(AggregatorConfig, _toml(tmp_path, AGGREGATOR_TOML))
    assert cfg.federation == "plant-7"
    assert cfg.rounds == 12
    assert cfg.strategy.name == "fedavg_unweighted"
    assert cfg.state_dir == "/var/lib/fedmqtt"
    assert cfg.model == ModelConfig(kind="mlp", n_features=64, n_outputs=10, hidden=[32, 16], seed=3)
    assert cfg.model.spec().param_shapes()["W1"] == (32, 16)
    assert cfg.training == TrainingConfig(epochs=2, batch_size=16, lr=0.05)
    assert cfg.round == RoundConfig(min_agents=3, agents_per_round=5, quorum=4, timeout=30.0)
    assert isinstance(cfg.round.timeout, float)  # a TOML integer for a float key is fine
    assert cfg.broker == BrokerConfig(host="broker.local", port=8883, keepalive=60, username="agg", password="secret")


def test_load_agent_config(tmp_path):
    cfg = load(AgentConfig, _toml(tmp_path, AGENT_TOML))
    assert (cfg.federation, cfg.agent_id, cfg.data, cfg.label_column) == ("plant-7", "press-04", "/data/local.npz", "y")
    assert cfg.holdout == 0.25 and cfg.seed == 9 and cfg.exit_when_done is True
    assert cfg.broker.host == "10.0.0.2" and cfg.broker.port == 1884
    assert cfg.broker.keepalive == BrokerConfig().keepalive  # untouched keys keep their defaults


def test_defaults_without_a_file():
    cfg = load(AggregatorConfig, None)
    assert cfg == AggregatorConfig()
    assert load(AggregatorConfig, None, {}) == AggregatorConfig()


def test_partial_file_keeps_defaults(tmp_path):
    cfg = load(AggregatorConfig, _toml(tmp_path, "[training]\nlr = 0.5\n"))
    assert cfg.training.lr == 0.5
    assert cfg.training.epochs == TrainingConfig().epochs
    assert cfg.model == ModelConfig()


def test_agent_config_needs_id_and_the_agent_needs_data():
    msg = _error(AgentConfig, None)
    assert "agent_id" in msg
    # The data may come from Python (arrays, a callable, batches), so the
    # config alone does not need a file; an agent given none is refused.
    from edge_agent.api import Agent

    cfg = load(AgentConfig, None, {"agent_id": "a1"})
    with pytest.raises(ConfigError, match="^data: must name the local data file"):
        Agent(cfg)
    assert load(AgentConfig, None, {"agent_id": "a1", "data": "x.npz"}).agent_id == "a1"


# ---------------------------------------------------------------------------
# errors name the key


def test_unknown_top_level_key(tmp_path):
    p = _toml(tmp_path, 'federation = "f"\nroundz = 3\n')
    msg = _error(AggregatorConfig, p)
    assert "roundz" in msg and str(p) in msg


def test_unknown_key_in_section(tmp_path):
    p = _toml(tmp_path, "[training]\nlrr = 1\n")
    msg = _error(AggregatorConfig, p)
    assert "training" in msg and "lrr" in msg and str(p) in msg


def test_unknown_key_in_agent_config(tmp_path):
    msg = _error(AgentConfig, _toml(tmp_path, AGENT_TOML + "[broker.tls]\nca = 'x'\n"))
    assert "broker" in msg and "tls" in msg


def test_unknown_section(tmp_path):
    msg = _error(AggregatorConfig, _toml(tmp_path, "[trainig]\nlr = 1\n"))
    assert "trainig" in msg


@pytest.mark.parametrize(
    "text, key",
    [
        ('[training]\nlr = "fast"\n', "training.lr"),
        ("[training]\nepochs = 2.5\n", "training.epochs"),
        ("[training]\nepochs = true\n", "training.epochs"),
        ("rounds = \"ten\"\n", "rounds"),
        ("federation = 7\n", "federation"),
        ("[model]\nhidden = 8\n", "model.hidden"),
        ('[model]\nhidden = [8, "4"]\n', "model.hidden[1]"),
        ("[broker]\nport = \"1883\"\n", "broker.port"),
        ("training = 3\n", "training"),
    ],
)
def test_wrong_type_names_the_key(tmp_path, text, key):
    msg = _error(AggregatorConfig, _toml(tmp_path, text))
    assert f"{key}:" in msg, msg


def test_wrong_bool_type_in_agent_config(tmp_path):
    msg = _error(AgentConfig, _toml(tmp_path, AGENT_TOML.replace("exit_when_done = true", 'exit_when_done = "yes"')))
    assert "exit_when_done" in msg


@pytest.mark.parametrize(
    "text, key",
    [
        ("[round]\nquorum = 0\n", "round.quorum"),
        ("[round]\nagents_per_round = 2\nquorum = 3\n", "round.quorum"),
        ("[round]\ntimeout = 0.0\n", "round.timeout"),
        ("[round]\nmin_agents = 0\n", "round.min_agents"),
        ("[broker]\nport = 70000\n", "broker.port"),
        ("[broker]\nport = 0\n", "broker.port"),
        ('[broker]\nhost = ""\n', "broker.host"),
        ("[broker]\nkeepalive = 1\n", "broker.keepalive"),
        ('federation = "bad id!"\n', "federation"),
        ('federation = ""\n', "federation"),
        ("rounds = -1\n", "rounds"),
        ('[strategy]\nname = "nonsense"\n', "strategy.name"),
        ('state_dir = ""\n', "state_dir"),
        ("[training]\nlr = 0\n", "training.lr"),
        ("[training]\nepochs = -1\n", "training.epochs"),
        ("[training]\nbatch_size = 0\n", "training.batch_size"),
        ('[model]\nkind = "cnn"\n', "model.kind"),
        ("[model]\nn_features = 0\n", "model.n_features"),
        ('[model]\nkind = "mlp"\n', "model.hidden"),
    ],
)
def test_invalid_value_names_the_key(tmp_path, text, key):
    p = _toml(tmp_path, text)
    msg = _error(AggregatorConfig, p)
    assert f"{key}:" in msg, msg
    assert str(p) in msg


def test_invalid_model_outputs_is_explained(tmp_path):
    # the problem is reported (the message mentions n_outputs), whatever key it is filed under
    msg = _error(AggregatorConfig, _toml(tmp_path, "[model]\nn_outputs = 0\n"))
    assert "model." in msg and "n_outputs" in msg
    msg = _error(AggregatorConfig, _toml(tmp_path, '[model]\nkind = "linear"\n', "lin.toml"))
    assert "model." in msg and "n_outputs" in msg


@pytest.mark.parametrize(
    "text, key",
    [
        ('agent_id = "a b"\ndata = "x.npz"\n', "agent_id"),
        ('agent_id = "a"\n[model]\nkind = "not a kind!"\n', "model.kind"),
        ('agent_id = "a"\n[model]\nkind = "softmax"\n[model.options]\nwidth = 3\n', "model.options"),
        ('agent_id = "a"\n[model]\noptions = 3\n', "model.options"),
        ('agent_id = "a"\ndata = "x.npz"\nholdout = 1.0\n', "holdout"),
        ('agent_id = "a"\ndata = "x.npz"\nfederation = "x/y"\n', "federation"),
        ('agent_id = "a"\ndata = "x.npz"\n[broker]\nport = 70000\n', "broker.port"),
    ],
)
def test_invalid_agent_value_names_the_key(tmp_path, text, key):
    msg = _error(AgentConfig, _toml(tmp_path, text))
    assert f"{key}:" in msg, msg


def test_invalid_toml_names_the_file(tmp_path):
    p = _toml(tmp_path, "[training\nlr = 1\n")
    msg = _error(AggregatorConfig, p)
    assert str(p) in msg and "TOML" in msg


def test_missing_config_file(tmp_path):
    p = tmp_path / "absent.toml"
    msg = _error(AggregatorConfig, p)
    assert str(p) in msg and "no such" in msg


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# ---------------------------------------------------------------------------
# flags


def _parser(cls) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(exit_on_error=False)
    p.add_argument("--config")
    add_flags(p, cls)
    return p


def test_every_leaf_key_is_a_flag():
    keys = [k for k, _, _ in leaf_fields(AggregatorConfig)]
    assert "training.lr" in keys and "round.timeout" in keys and "model.hidden" in keys and "federation" in keys
    assert not any(k in ("model", "training", "round", "broker") for k in keys)
    parser = _parser(AggregatorConfig)
    flags = {a for action in parser._actions for a in action.option_strings}
    tables = {k for k, typ, _ in leaf_fields(AggregatorConfig) if typ is dict}
    assert tables == {"model.options"}  # a table has no one-line form: file only
    for key in set(keys) - tables:
        assert "--" + key.replace(".", "-").replace("_", "-") in flags, key


def test_flag_overrides_apply_and_beat_the_file(tmp_path):
    p = _toml(tmp_path, AGGREGATOR_TOML)
    args = _parser(AggregatorConfig).parse_args(
        ["--training-lr", "0.5", "--round-timeout", "3", "--model-hidden", "8,4"]
    )
    overrides = flag_overrides(args)
    assert overrides == {"training.lr": "0.5", "round.timeout": "3", "model.hidden": "8,4"}
    cfg = load(AggregatorConfig, p, overrides)
    assert cfg.training.lr == 0.5  # file says 0.05
    assert cfg.round.timeout == 3.0  # file says 30
    assert cfg.model.hidden == [8, 4]  # file says [32, 16]
    # keys not given as flags keep the file's values
    assert cfg.training.epochs == 2 and cfg.round.quorum == 4 and cfg.broker.host == "broker.local"


def test_flags_without_a_file():
    args = _parser(AggregatorConfig).parse_args(
        ["--federation", "f1", "--round-agents-per-round", "4", "--broker-port", "1999", "--rounds", "0"]
    )
    cfg = load(AggregatorConfig, None, flag_overrides(args))
    assert cfg.federation == "f1" and cfg.round.agents_per_round == 4 and cfg.broker.port == 1999 and cfg.rounds == 0


def test_bool_flag(tmp_path):
    parser = _parser(AgentConfig)
    for text, expected in [("true", True), ("yes", True), ("1", True), ("off", False), ("FALSE", False)]:
        args = parser.parse_args(["--agent-id", "a", "--data", "d.npz", "--exit-when-done", text])
        assert load(AgentConfig, None, flag_overrides(args)).exit_when_done is expected
    args = parser.parse_args(["--agent-id", "a", "--data", "d.npz", "--exit-when-done", "maybe"])
    with pytest.raises(ConfigError, match="--exit-when-done"):
        load(AgentConfig, None, flag_overrides(args))
    # bare, as a switch (the same form `fedmqtt sim` takes)
    args = parser.parse_args(["--exit-when-done", "--agent-id", "a"])
    assert load(AgentConfig, None, flag_overrides(args)).exit_when_done is True


def test_the_cli_without_a_command_is_a_usage_error(capsys):
    from fedmqtt.cli import main

    assert main([]) == 2 and "usage: fedmqtt" in capsys.readouterr().err
    assert main(["--help"]) == 0 and "usage: fedmqtt" in capsys.readouterr().out


def test_sim_takes_the_same_exit_flag_and_the_broker_login_flags(monkeypatch):
    """`fedmqtt sim` parses --exit-when-done like `agent` and the --broker-* TLS/login flags like `status`."""
    import aggregator.cli as cli

    seen = {}

    class FakeSim:  # stops before any network: only the parsed arguments matter here
        def __init__(self, broker, federation, agents, **kw):
            seen.update(broker=broker, n=len(agents))
            raise SystemExit(0)

    monkeypatch.setattr("aggregator.sim.Simulation", FakeSim)
    for flag in (["--exit-when-done"], ["--exit-when-done", "true"]):
        with pytest.raises(SystemExit):
            cli.sim_main(["--agents", "2", "--broker", "10.1.2.3:8883", "--broker-tls", "--broker-username", "u",
                          "--broker-password", "p", *flag])
        assert (seen["broker"].host, seen["broker"].port, seen["broker"].tls, seen["broker"].username) == \
            ("10.1.2.3", 8883, True, "u") and seen["n"] == 2


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--training-epochs", "x"], "--training-epochs"),
        (["--training-lr", "fast"], "--training-lr"),
        (["--model-hidden", "8,four"], "--model-hidden"),
        (["--round-agents-per-round", "1.5"], "--round-agents-per-round"),
    ],
)
def test_bad_flag_value_names_the_flag(tmp_path, argv, flag):
    args = _parser(AggregatorConfig).parse_args(argv)
    msg = _error(AggregatorConfig, _toml(tmp_path, AGGREGATOR_TOML), flag_overrides(args))
    assert flag in msg, msg


def test_flag_value_is_validated_like_the_file():
    args = _parser(AggregatorConfig).parse_args(["--broker-port", "70000"])
    msg = _error(AggregatorConfig, None, flag_overrides(args))
    assert "broker.port" in msg


def test_unknown_override_key():
    assert "nope" in _error(AggregatorConfig, None, {"training.nope": "1"})


@pytest.mark.parametrize(
    "text, expected",
    [("localhost:1883", ("localhost", 1883)), ("10.0.0.1:8883", ("10.0.0.1", 8883)), ("[::1]:1", ("[::1]", 1))],
)
def test_parse_hostport(text, expected):
    assert parse_hostport(text) == expected


@pytest.mark.parametrize("text", ["localhost", ":1883", "host:", "host:port", "host:0", "host:65536"])
def test_parse_hostport_rejects(text):
    with pytest.raises(ConfigError, match="--broker"):
        parse_hostport(text)


# ---------------------------------------------------------------------------
# the shipped example configs


@pytest.mark.parametrize("name, cls", [("aggregator.toml", AggregatorConfig), ("agent.toml", AgentConfig)])
def test_example_configs_load(name, cls):
    path = REPO / "deploy" / name
    if not path.is_file():
        pytest.skip(f"deploy/{name} does not exist yet")
    cfg = load(cls, path)
    assert isinstance(cfg, cls)


# ---------------------------------------------------------------------------
# the CLI turns config and data errors into one line and exit code 2


def _run(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(FEDMQTT), *argv], cwd=cwd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )


@pytest.fixture(scope="module")
def fedmqtt_exe() -> Path:
    assert FEDMQTT.is_file(), f"console script missing at {FEDMQTT}"
    return FEDMQTT


def _assert_clean_error(r: subprocess.CompletedProcess, *fragments: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    for f in fragments:
        assert f in r.stderr, (f, r.stderr)


def test_cli_aggregator_config_error(tmp_path, fedmqtt_exe):
    bad = _toml(tmp_path, "[training]\nlrr = 1\n", "bad.toml")
    r = _run("aggregator", "--config", str(bad), cwd=tmp_path)
    _assert_clean_error(r, "lrr", "bad.toml")


def test_cli_aggregator_bad_flag_value(tmp_path, fedmqtt_exe):
    r = _run("aggregator", "--training-epochs", "x", cwd=tmp_path)
    _assert_clean_error(r, "--training-epochs")


def test_cli_aggregator_invalid_toml(tmp_path, fedmqtt_exe):
    bad = _toml(tmp_path, "rounds = = 3\n", "broken.toml")
    r = _run("aggregator", "--config", str(bad), cwd=tmp_path)
    _assert_clean_error(r, "broken.toml")


def test_cli_agent_config_error(tmp_path, fedmqtt_exe):
    bad = _toml(tmp_path, 'agent_id = "a1"\ndata = "d.npz"\n[broker]\nport = 70000\n', "agent.toml")
    r = _run("agent", "--config", str(bad), cwd=tmp_path)
    _assert_clean_error(r, "broker.port")


def test_cli_agent_data_error(tmp_path, fedmqtt_exe):
    # an object array in the data file: refused with a one-line data error before any connection
    X = np.empty((2, 2), dtype=object)
    X[:] = 1.0
    np.savez(tmp_path / "obj.npz", X=X, y=np.array([0, 1]))
    r = _run("agent", "--agent-id", "a1", "--data", str(tmp_path / "obj.npz"), cwd=tmp_path)
    _assert_clean_error(r, "obj.npz")


@pytest.mark.parametrize("cls, path", [(AggregatorConfig, "deploy/aggregator.toml"), (AgentConfig, "deploy/agent.toml")])
def test_the_example_configs_show_every_key(cls, path):
    """Each leaf key appears in its section of the annotated example (set or commented out), and the file loads."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / path).read_text()
    sections: dict[str, list[str]] = {"": []}
    current = ""
    for line in text.splitlines():
        header = re.match(r"^#?\s*\[([a-z_.]+)\]", line)
        if header:
            current = header.group(1)
            sections.setdefault(current, [])
        else:
            sections.setdefault(current, []).append(line)
    missing = []
    for key, typ, _ in leaf_fields(cls):
        section, _, leaf = key.rpartition(".")
        body = "\n".join(sections.get(section, []))
        if typ is dict:
            if f"[{key}]" not in text:
                missing.append(key)
        elif not re.search(rf"^#?\s*{re.escape(leaf)}\s*=", body, re.M):
            missing.append(key)
    assert missing == []
    load(cls, Path(__file__).resolve().parents[1] / path)
