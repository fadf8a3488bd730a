#!/usr/bin/env bash
# Set up everything `make demo` / `make test` need on a fresh Debian machine:
# a virtualenv with fedmqtt and the requested extras, and mosquitto (and, for
# the dev extras, Debian's chromium, chromedriver and nats-server if apt-get can install them).
#   scripts/setup.sh VENV EXTRAS      e.g. scripts/setup.sh .venv aggregator,demo,dev
# Idempotent: an existing venv is reused, pip only runs when pyproject.toml
# changed (a stamp file records what was installed), apt-get only runs when
# mosquitto is missing (or, with the dev extras, chromium/chromedriver/nats-server).
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

# PyTorch (the torch extra; dev too, whose tests cover the torch adapter) is
# pinned to a CPU build and installed first: the extra's range ("torch>=2.1")
# alone could pull a multi-GB CUDA build. If the pin cannot be installed we
# warn and go on without torch (its tests skip, saying how to install it).
torch_pin="torch==2.13.0"
case ",$extras," in *,torch,*|*,dev,*) want_torch=1 ;; *) want_torch=0 ;; esac

has_torch() {  # a torch the extra's range accepts is already there
    "$venv/bin/python" -c 'import sys, torch; v = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(v < (2, 1))' 2>/dev/null
}

stamp="$venv/.fedmqtt-installed-$extras"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$venv/bin/python" -m pip install -q --upgrade pip
    pip_extras=$extras
    if [ "$want_torch" -eq 1 ] && ! has_torch; then
        torch_log="$venv/torch-install.log"
        if ! "$venv/bin/python" -m pip install -q "$torch_pin" >"$torch_log" 2>&1; then
            echo "setup: warning: cannot install $torch_pin (see $torch_log); going on without torch, its tests will be skipped" >&2
            # without the pin, the extra's range must not pick some other (CUDA) build
            pip_extras=$(echo ",$extras," | sed 's/,torch,/,/g; s/^,//; s/,$//')
        fi
    fi
    if [ -n "$pip_extras" ]; then
        "$venv/bin/python" -m pip install -q -e ".[$pip_extras]"
    else
        "$venv/bin/python" -m pip install -q -e .
    fi
    touch "$stamp"
fi

# mosquitto (Debian installs it in /usr/sbin, not on every user's PATH).
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    apt_install mosquitto
fi

# Debian's nats-server (2.9), for the NATS cluster test of the broker tier
# (tests/test_nats_cluster.py, dev extras). Optional: if apt-get cannot
# install it, warn and go on (the test then skips, saying why). Debian puts it
# in /usr/sbin.
case ",$extras," in
    *,dev,*)
        if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ]; then
            nats_log="$venv/nats-server-install.log"
            echo "setup: installing nats-server with apt-get"
            if ! { command -v apt-get && as_root apt-get update -qq \
                   && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server; } \
                   >"$nats_log" 2>&1; then
                echo "setup: warning: cannot install nats-server with apt-get (see $nats_log); the NATS cluster test will be skipped" >&2
            fi
        fi
        ;;
esac

# Debian's chromium and chromedriver, for the dashboard's browser test (dev
# extras). Optional: if apt-get cannot install them, warn and go on (the test
# then skips, saying why).
case ",$extras," in
    *,dev,*)
        if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
            browser_log="$venv/chromium-install.log"
            echo "setup: installing chromium chromium-driver with apt-get"
            if ! { command -v apt-get && as_root apt-get update -qq \
                   && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
                   >"$browser_log" 2>&1; then
                echo "setup: warning: cannot install chromium and chromium-driver with apt-get (see $browser_log); the dashboard's browser test will be skipped" >&2
            fi
        fi
        ;;
esac
