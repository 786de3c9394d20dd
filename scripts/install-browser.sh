#!/bin/sh
# Installs Debian's Chromium (and fonts, or screenshots have no text) for tests/test_browser.py.
# Idempotent: does nothing when /usr/bin/chromium exists. `playwright install` cannot be used
# here (no browser downloads), so the browser comes from apt; Playwright for Python drives it.
# Without root it only says what to run; the browser tests then skip with that reason.
set -eu

if [ -x /usr/bin/chromium ]; then
    echo "install-browser: /usr/bin/chromium already installed"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-browser: /usr/bin/chromium missing and not root; run as root:" >&2
    echo "  apt-get update && apt-get install -y chromium chromium-driver fonts-liberation" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-browser: no apt-get here; install Chromium at /usr/bin/chromium by hand" >&2
    exit 0
fi
apt-get update
DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver fonts-liberation
