#!/usr/bin/env bash
# Set up everything `make demo` / `make test` need on a fresh Debian machine:
# a virtualenv with fedmqtt and the requested extras, and mosquitto.
#   scripts/setup.sh VENV EXTRAS      e.g. scripts/setup.sh .venv aggregator,demo,dev
# Idempotent: an existing venv is reused, pip only runs when pyproject.toml
# changed (a stamp file records what was installed), apt-get only runs when
# mosquitto is missing.
set -euo pipefail

venv=${1:-.venv}
extras=${2:-aggregator,demo}
python=${PYTHON:-python3}

die() { echo "setup: $*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo "$@"
    else return 1
    fi
}

apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "$1 is missing and this is not a Debian/Ubuntu system; install $* yourself"
    echo "setup: installing $* with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get update -qq || die "cannot run apt-get as root (run as root or with passwordless sudo, or install $* yourself)"
    as_root apt-get install -y -qq "$@" >/dev/null || die "apt-get install $* failed"
}

# Python >= 3.11 (Debian 12 ships 3.11).
command -v "$python" >/dev/null 2>&1 || apt_install python3
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "fedmqtt needs Python >= 3.11, $python is $("$python" -V 2>&1)"

# The virtualenv. Debian splits venv/ensurepip into python3-venv.
if [ ! -x "$venv/bin/python" ]; then
    if ! "$python" -m venv "$venv" 2>/dev/null; then
        rm -rf "$venv"
        apt_install python3-venv
        "$python" -m venv "$venv" || die "cannot create a virtualenv with $python"
    fi
fi

stamp="$venv/.fedmqtt-installed-$extras"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q -e ".[$extras]"
    touch "$stamp"
fi

# mosquitto (Debian installs it in /usr/sbin, not on every user's PATH).
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    apt_install mosquitto
fi
