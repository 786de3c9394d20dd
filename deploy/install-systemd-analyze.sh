#!/bin/sh
# Installs `systemd-analyze` (Debian package `systemd`, ~10 MB) so tests/test_ops_notify.py can
# verify deploy/edison.service. Idempotent: does nothing when it is already there. Installing
# the package does not start systemd; `systemd-analyze verify` needs no running systemd.
# Without root or apt-get it only says what to run; the unit-file test then skips with a reason.
set -eu

if command -v systemd-analyze >/dev/null 2>&1; then
    echo "install-systemd-analyze: $(command -v systemd-analyze) already installed"
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-systemd-analyze: systemd-analyze missing; as root on Debian/Ubuntu run:" >&2
    echo "  apt-get update && apt-get install -y --no-install-recommends systemd" >&2
    exit 0
fi
apt-get update
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends systemd
