#!/bin/sh
# Installs Debian's HAProxy for tests/test_haproxy.py (two real Edison instances behind a real
# proxy). Idempotent: does nothing when `haproxy` is on the PATH. The package is installed, not
# started: the tests run their own `haproxy -f <rendered config>` on loopback ports, and apt's
# policy-rc.d in containers (or no init at all) keeps the packaged service from starting.
# Without root or apt-get it says what to run; the HAProxy tests then skip, loudly, with that reason.
set -eu

if command -v haproxy >/dev/null 2>&1; then
    echo "install-haproxy: $(haproxy -v | head -n 1) already installed"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-haproxy: haproxy missing and not root; run as root:" >&2
    echo "  apt-get update && apt-get install -y haproxy" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-haproxy: no apt-get here; install HAProxy 2.6 or newer by hand" >&2
    exit 0
fi
apt-get -o DPkg::Lock::Timeout=600 update
# Other set-up scripts may hold the dpkg lock at the same moment: wait for it instead of failing.
DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends haproxy
