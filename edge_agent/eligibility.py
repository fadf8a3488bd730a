"""When a device may train: power, battery, CPU load and a time window.

Reading the device (``/sys/class/power_supply``, ``os.getloadavg``, the local
clock) is separate from deciding (:func:`check`), so the rules are tested
with made-up readings and the same code runs on a Raspberry Pi, a laptop
or a server without a battery.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

POWER_SUPPLY = Path("/sys/class/power_supply")
_WINDOW = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")


@dataclass
class EligibilityConfig:
    """The agent's ``[eligibility]`` section. Every rule is off by default."""

    require_ac: bool = field(default=False, metadata={"help": "train only on mains power (where the device reports it)"})
    min_battery: int = field(default=0, metadata={"help": "train only above this battery percentage (0: off)"})
    max_load: float = field(default=0.0, metadata={"help": "train only while the 1-minute load per CPU is below this (0: off)"})
    window: str = field(default="", metadata={"help": "train only inside this local time window, HH:MM-HH:MM (may wrap midnight)"})
    check_every: float = field(default=30.0, metadata={"help": "seconds between eligibility checks"})

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if not 0 <= self.min_battery <= 100:
            out.append(("min_battery", f"must be a percentage 0..100, got {self.min_battery}"))
        if self.max_load < 0:
            out.append(("max_load", f"must be >= 0, got {self.max_load}"))
        if self.window and not _WINDOW.match(self.window):
            out.append(("window", f"must look like 22:00-06:00, got {self.window!r}"))
        if not 1.0 <= self.check_every <= 3600.0:
            out.append(("check_every", f"must be in 1..3600 seconds, got {self.check_every}"))
        return out


@dataclass(frozen=True)
class Power:
    """What the power supply reports; None where the device says nothing."""

    on_ac: bool | None = None
    battery_percent: float | None = None


def read_power(root: Path = POWER_SUPPLY) -> Power:
    """Mains and battery state from sysfs (a device without either reports None for it)."""
    on_ac: bool | None = None
    battery: float | None = None
    try:
        supplies = sorted(root.iterdir())
    except OSError:
        return Power()
    for d in supplies:
        try:
            kind = (d / "type").read_text().strip()
            if kind in ("Mains", "USB") and (d / "online").exists():
                on_ac = bool(on_ac) or (d / "online").read_text().strip() == "1"
            elif kind == "Battery" and (d / "capacity").exists():
                battery = float((d / "capacity").read_text().strip())
        except (OSError, ValueError):
            continue
    return Power(on_ac, battery)


def check(cfg: EligibilityConfig, power: Power, load_per_cpu: float, now: _dt.time) -> tuple[bool, str]:
    """(eligible, reason): the first rule that fails names itself; all pass gives (True, "")."""
    if cfg.require_ac and power.on_ac is False:
        return False, "not on mains power"
    if cfg.min_battery and power.battery_percent is not None and power.battery_percent < cfg.min_battery:
        if not power.on_ac:  # a charging device may train whatever its charge
            return False, f"battery at {power.battery_percent:.0f}%, below {cfg.min_battery}%"
    if cfg.max_load and load_per_cpu > cfg.max_load:
        return False, f"CPU load {load_per_cpu:.2f} per core, above {cfg.max_load:.2f}"
    if cfg.window and not in_window(cfg.window, now):
        return False, f"outside the training window {cfg.window}"
    return True, ""


def in_window(window: str, now: _dt.time) -> bool:
    """Whether ``now`` is inside ``HH:MM-HH:MM`` (a window may wrap midnight, e.g. 22:00-06:00)."""
    m = _WINDOW.match(window)
    if m is None:
        raise ValueError(f"bad window {window!r}")
    start = _dt.time(int(m.group(1)), int(m.group(2)))
    end = _dt.time(int(m.group(3)), int(m.group(4)))
    if start <= end:
        return start <= now < end
    return now >= start or now < end


def check_device(cfg: EligibilityConfig) -> tuple[bool, str]:
    """:func:`check` with this device's real readings."""
    try:
        load = os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        load = 0.0
    return check(cfg, read_power(), load, _dt.datetime.now().time())
