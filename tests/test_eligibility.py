"""Eligibility rules with made-up device readings, and sysfs parsing on a fake tree."""

from __future__ import annotations

import datetime as dt

import pytest

from edge_agent.eligibility import EligibilityConfig, Power, check, in_window, read_power

NOON = dt.time(12, 0)


def test_everything_off_is_always_eligible():
    assert check(EligibilityConfig(), Power(False, 1.0), 50.0, NOON) == (True, "")


@pytest.mark.parametrize(
    "cfg,power,load,now,ok,fragment",
    [
        (EligibilityConfig(require_ac=True), Power(False, 80.0), 0.1, NOON, False, "mains"),
        (EligibilityConfig(require_ac=True), Power(True, 80.0), 0.1, NOON, True, ""),
        (EligibilityConfig(require_ac=True), Power(None, None), 0.1, NOON, True, ""),  # a server: no supply info
        (EligibilityConfig(min_battery=30), Power(False, 12.0), 0.1, NOON, False, "battery at 12%"),
        (EligibilityConfig(min_battery=30), Power(True, 12.0), 0.1, NOON, True, ""),  # charging
        (EligibilityConfig(min_battery=30), Power(False, 55.0), 0.1, NOON, True, ""),
        (EligibilityConfig(max_load=0.5), Power(), 0.9, NOON, False, "CPU load 0.90"),
        (EligibilityConfig(max_load=0.5), Power(), 0.2, NOON, True, ""),
        (EligibilityConfig(window="22:00-06:00"), Power(), 0.1, NOON, False, "window"),
        (EligibilityConfig(window="22:00-06:00"), Power(), 0.1, dt.time(23, 30), True, ""),
    ],
)
def test_rules(cfg, power, load, now, ok, fragment):
    eligible, reason = check(cfg, power, load, now)
    assert eligible is ok and fragment in reason


@pytest.mark.parametrize(
    "window,now,inside",
    [("08:00-17:00", dt.time(8, 0), True), ("08:00-17:00", dt.time(17, 0), False),
     ("22:00-06:00", dt.time(5, 59), True), ("22:00-06:00", dt.time(6, 0), False),
     ("22:00-06:00", dt.time(21, 59), False), ("00:00-00:00", dt.time(3, 0), False)],
)
def test_windows_wrap_midnight(window, now, inside):
    assert in_window(window, now) is inside


def test_read_power_from_a_sysfs_tree(tmp_path):
    for name, files in {
        "AC": {"type": "Mains", "online": "0"},
        "BAT0": {"type": "Battery", "capacity": "37"},
        "usb": {"type": "USB", "online": "1"},
    }.items():
        d = tmp_path / name
        d.mkdir()
        for f, v in files.items():
            (d / f).write_text(v + "\n")
    assert read_power(tmp_path) == Power(True, 37.0)  # the USB supply is online
    (tmp_path / "usb" / "online").write_text("0\n")
    assert read_power(tmp_path) == Power(False, 37.0)
    assert read_power(tmp_path / "missing") == Power(None, None)


def test_bad_eligibility_config_names_the_key():
    assert EligibilityConfig(window="late").problems()[0][0] == "window"
    assert EligibilityConfig(min_battery=120).problems()[0][0] == "min_battery"
