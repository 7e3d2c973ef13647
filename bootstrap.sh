#!/usr/bin/env bash
# lazysky set-up: the whole of it, on a fresh Debian/Ubuntu machine with Python >= 3.11.
#
#   bash bootstrap.sh demo    install everything, then run the main job (`lazysky demo`)
#   bash bootstrap.sh test    install everything, then lint, type-check and run the tests
#   bash bootstrap.sh setup   install everything, run nothing
#
# It installs the system packages lazysky needs (the PostgreSQL server and pg_sphere for
# the embedded catalog; python3-venv where the system Python lacks it; for `test`, the
# reference tools Source Extractor and SWarp, and chromium for the dashboard's browser test)
# with apt-get, as
# root or through `sudo -n`, and the Python environment in .venv (pyproject.toml, extras
# `all` and `test`). Each step is skipped when what it installs is already there, so a
# second run costs seconds. Environment: PYTHON (default python3), LAZYSKY_VENV (.venv).
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")"

action=${1:-demo}
[ $# -gt 0 ] && shift
case "$action" in demo|test|setup) ;; *)
  echo "usage: bash bootstrap.sh [demo|test|setup] [args passed on]" >&2; exit 2 ;;
esac

log() { printf '[bootstrap] %s\n' "$*" >&2; }

PYTHON=${PYTHON:-python3}
VENV=${LAZYSKY_VENV:-.venv}

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo -n "$@"
  else
    log "need root to run: $*"
    log "run this script as root, or with password-less sudo, or install those packages yourself"
    exit 1
  fi
}

apt_updated=0
apt_install() {
  [ $# -gt 0 ] || return 0
  if [ "$apt_updated" -eq 0 ]; then
    log "apt-get update"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    apt_updated=1
  fi
  log "apt-get install $*"
  # Debian's postinst would start a system-wide cluster on 5432; lazysky never uses it, so
  # ask policy-rc.d to leave services alone while we install (restored afterwards).
  local policy=/usr/sbin/policy-rc.d created=0
  if [ ! -e "$policy" ]; then
    as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod +x $policy" && created=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" \
    >/dev/null || { [ "$created" -eq 1 ] && as_root rm -f "$policy"; exit 1; }
  [ "$created" -eq 1 ] && as_root rm -f "$policy"
  return 0
}

# --- Python itself -------------------------------------------------------------------
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  log "lazysky needs Python >= 3.11; '$PYTHON' is $("$PYTHON" --version 2>&1 || echo missing)"
  log "set PYTHON=/path/to/python3.11 (or newer) and run again"
  exit 1
fi

# --- system packages: PostgreSQL server + pg_sphere (the embedded catalog) -------------
if command -v apt-get >/dev/null 2>&1; then
  pkgs=()
  pg_major=$(ls -d /usr/lib/postgresql/*/bin/postgres 2>/dev/null | sed -E 's|.*/postgresql/([0-9]+)/.*|\1|' \
             | sort -n | tail -n 1 || true)
  if [ -z "$pg_major" ]; then
    if [ "$apt_updated" -eq 0 ]; then as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq; apt_updated=1; fi
    pg_major=$(apt-cache depends postgresql 2>/dev/null | grep -oE 'postgresql-[0-9]+' | head -n 1 | cut -d- -f2)
    [ -n "$pg_major" ] || { log "no PostgreSQL server package found by apt-cache"; exit 1; }
    pkgs+=("postgresql-$pg_major")
  fi
  if [ ! -e "/usr/share/postgresql/$pg_major/extension/pg_sphere.control" ]; then
    pkgs+=("postgresql-$pg_major-pgsphere")
  fi
  if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
    pkgs+=("python3-venv")
  fi
  # The tools lazysky is measured against (Source Extractor, SWarp): the tests compare with
  # them side by side, so `test` installs them too.
  if [ "$action" = test ]; then
    command -v source-extractor >/dev/null 2>&1 || pkgs+=("source-extractor")
    command -v SWarp >/dev/null 2>&1 || command -v swarp >/dev/null 2>&1 || pkgs+=("swarp")
    # the dashboard page's browser test (tests/dashboard): Debian's headless chromium,
    # driven by Playwright from the venv (no browser download)
    command -v chromium >/dev/null 2>&1 || pkgs+=("chromium")
  fi
  apt_install "${pkgs[@]}"
else
  log "no apt-get here: install a PostgreSQL server (>= 15) with pg_sphere yourself"
fi

# --- the Python environment ------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.lazysky-installed"
want=$(cat pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing lazysky and its dependencies into $VENV (a few minutes the first time)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[all,test]"
  echo "$want" > "$stamp"
fi
export PATH="$PWD/$VENV/bin:$PATH"

# --- checkov (tests/kube) in its own venv: its many pinned dependencies stay out of ours --
TOOLS_VENV=${LAZYSKY_TOOLS_VENV:-.venv-tools}
if [ "$action" = test ] && [ ! -x "$TOOLS_VENV/bin/checkov" ]; then
  log "installing checkov into $TOOLS_VENV"
  "$PYTHON" -m venv "$TOOLS_VENV"
  "$TOOLS_VENV/bin/python" -m pip install -q --disable-pip-version-check "checkov>=3.2"
fi

case "$action" in
  setup) log "ready: activate with 'source $VENV/bin/activate'" ;;
  demo)  exec lazysky demo "$@" ;;
  test)
    log "ruff"; ruff check .
    log "mypy"; mypy
    log "pytest"; exec python -m pytest "$@" ;;
esac
