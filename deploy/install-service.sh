#!/bin/sh
# `make install-service`: run Edison from this checkout as the systemd service `edison`.
#
#   deploy/install-service.sh             install (as root): user, unit, env file, enable --now
#   deploy/install-service.sh --render D  only write the unit for this checkout to D/edison.service
#
# The unit (deploy/edison.service) runs this checkout's .venv/bin/edison with its config.toml
# as the system user `edison`, whose writable home is /var/lib/edison (the model cache).
# Idempotent: re-running it updates the unit and restarts the service.
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd -P)
UNIT_SRC="$ROOT/deploy/edison.service"
SERVICE_USER=edison
ENV_FILE=/etc/edison/edison.env

die() { echo "install-service: $*" >&2; exit 1; }

render() {  # $1: output file. The repo's unit names /opt/edison; point it at this checkout.
    case "$ROOT" in
        *[[:space:]]* | *[\|\&\\]*) die "the checkout path '$ROOT' has spaces or |&\\ in it; move it (e.g. to /opt/edison)" ;;
    esac
    sed "s|/opt/edison|$ROOT|g" "$UNIT_SRC" > "$1"
}

if [ "${1:-}" = "--render" ]; then
    [ -n "${2:-}" ] || die "usage: $0 --render DIR"
    mkdir -p "$2"
    render "$2/edison.service"
    echo "$2/edison.service"
    exit 0
fi

[ "$(id -u)" -eq 0 ] || die "run as root: sudo make install-service"
[ -x "$ROOT/.venv/bin/edison" ] || die "no $ROOT/.venv/bin/edison; run 'make setup' first"
command -v systemctl >/dev/null 2>&1 || die "systemctl not found: this needs a systemd host"

if ! id "$SERVICE_USER" >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/edison --no-create-home --shell /usr/sbin/nologin \
        --comment "Edison LLM service" "$SERVICE_USER"
    echo "install-service: created system user $SERVICE_USER"
fi
# A GPU build needs /dev/nvidia* (group video/render on most distributions).
for group in video render; do
    if getent group "$group" >/dev/null 2>&1; then usermod -a -G "$group" "$SERVICE_USER"; fi
done

# The service user must be able to read the checkout, its venv and the model; a checkout in a
# private home directory (mode 0700) is the usual reason it cannot.
if ! (cd / && runuser -u "$SERVICE_USER" -- "$ROOT/.venv/bin/python" - "$ROOT/config.toml") <<'PY'
import sys
from edison.settings import load_settings
import llama_cpp  # noqa: F401  (the compiled library must be readable too)

settings = load_settings(sys.argv[1])
if settings.model.path:
    open(settings.model.path, "rb").close()
PY
then
    die "user $SERVICE_USER cannot read $ROOT (or the configured model). Give it read access, e.g.
    setfacl -R -m u:$SERVICE_USER:rX $ROOT  (and u:$SERVICE_USER:x on each parent directory),
or move the checkout to /opt/edison."
fi

STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
render "$STAGE/edison.service"
if command -v systemd-analyze >/dev/null 2>&1; then
    systemd-analyze verify "$STAGE/edison.service" || die "the rendered unit does not verify"
fi
install -m 0644 "$STAGE/edison.service" /etc/systemd/system/edison.service

if [ ! -e "$ENV_FILE" ]; then
    install -d -m 0750 -g "$SERVICE_USER" /etc/edison
    printf '%s\n' "# Read by edison.service. Set a key before binding beyond 127.0.0.1:" \
        "# EDISON_API_KEY=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')" > "$ENV_FILE"
    chown root:"$SERVICE_USER" "$ENV_FILE"
    chmod 0640 "$ENV_FILE"
fi

systemctl daemon-reload
systemctl enable edison.service
systemctl restart edison.service
echo "install-service: edison.service installed from $ROOT and started."
echo "  status:  systemctl status edison     logs: journalctl -u edison -f"
echo "  API key: uncomment EDISON_API_KEY in $ENV_FILE, then systemctl restart edison"
