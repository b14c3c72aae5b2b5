#!/usr/bin/env bash
# Sets Sluice up on this machine and runs the demo: the README's first command.
#
#   bash scripts/setup.sh [sluice demo options]
#
# 1. finds a Python >= 3.11 (python3.13, python3.12, python3.11, python3, in that order);
# 2. installs uv with pip (into the user's site) if it is not on PATH;
# 3. `uv sync --locked`: the workspace and its dev tools into .venv at the repository root,
#    exactly as uv.lock pins them (so `.venv/bin/sluice` exists afterwards);
# 4. on Debian/Ubuntu as root, installs the `postgresql` and `redis-server` packages when
#    their binaries are missing (`sluice demo` then runs its own throwaway servers from
#    them; nothing is started here);
# 5. runs `sluice demo`.
#
# Safe to run again: each step does nothing when its work is already done.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { printf '\033[1msetup:\033[0m %s\n' "$*"; }
die() {
  printf '\033[1;31msetup: error:\033[0m %s\n' "$*" >&2
  exit 1
}

is_root() { [[ $(id -u) -eq 0 ]]; }

APT_UPDATED=0
apt_install() {
  if [[ $APT_UPDATED -eq 0 ]]; then
    say "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -q </dev/null
    APT_UPDATED=1
  fi
  say "apt-get install -y --no-install-recommends $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" </dev/null
}

# --- 1. Python >= 3.11 -------------------------------------------------------------------
PYTHON=""
for candidate in python3.13 python3.12 python3.11 python3; do
  if command -v "$candidate" >/dev/null 2>&1 &&
    "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    PYTHON=$(command -v "$candidate")
    break
  fi
done
[[ -n $PYTHON ]] || die "Sluice needs Python 3.11 or newer, and none was found on PATH
  (tried python3.13, python3.12, python3.11, python3). On Debian 12 / Ubuntu 24.04:
  sudo apt-get install python3"
say "Python: $PYTHON ($("$PYTHON" -c 'import platform; print(platform.python_version())'))"

# --- 2. uv -------------------------------------------------------------------------------
find_uv() {
  if command -v uv >/dev/null 2>&1; then
    UV=(uv)
  elif "$PYTHON" -m uv --version >/dev/null 2>&1; then
    UV=("$PYTHON" -m uv) # installed by an earlier run, its script dir not on PATH
  else
    return 1
  fi
}
if ! find_uv; then
  if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
    if is_root && command -v apt-get >/dev/null 2>&1 && [[ $PYTHON == /usr/bin/* ]]; then
      apt_install python3-pip
    else
      die "uv is not installed and $PYTHON has no pip to install it with. Install one of:
  sudo apt-get install python3-pip     (then run this script again)
  pipx install uv"
    fi
  fi
  pip_args=(install --user --quiet uv)
  # A distribution's Python refuses even user installs (PEP 668, "externally managed"); uv
  # in ~/.local does not touch the system's packages, so that guard does not apply here.
  if "$PYTHON" -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'; then
    pip_args+=(--break-system-packages)
  fi
  say "installing uv: $PYTHON -m pip ${pip_args[*]}"
  PIP_ROOT_USER_ACTION=ignore "$PYTHON" -m pip "${pip_args[@]}" || die "could not install uv with pip"
  find_uv || die "uv was installed but cannot be run ($PYTHON -m uv)"
fi
say "uv: $("${UV[@]}" --version)"

# --- 3. the workspace into .venv ------------------------------------------------------------
sync_args=(sync --locked)
# Keep a working .venv as it is; otherwise build it with the Python found above (uv would
# otherwise pick its own, or try to download one).
if ! [[ -x .venv/bin/python ]] ||
  ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  sync_args+=(--python "$PYTHON")
fi
say "uv ${sync_args[*]} (installs into $(pwd)/.venv)"
"${UV[@]}" "${sync_args[@]}"
[[ -x .venv/bin/sluice ]] || die ".venv/bin/sluice is missing after uv sync"

# --- 4. PostgreSQL and Redis binaries for the embedded servers ------------------------------
have_postgres() {
  { command -v initdb && command -v postgres; } >/dev/null 2>&1 ||
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}
have_redis() { command -v redis-server >/dev/null 2>&1; }

missing=()
if [[ -n ${DATABASE_URL:-} ]]; then
  say "DATABASE_URL is set: the demo uses that PostgreSQL"
elif have_postgres; then
  say "PostgreSQL binaries found: nothing to install"
else
  missing+=(postgresql)
fi
if [[ -n ${REDIS_URL:-} ]]; then
  say "REDIS_URL is set: the demo uses that Redis"
elif have_redis; then
  say "redis-server found: nothing to install"
else
  missing+=(redis-server)
fi
if [[ ${#missing[@]} -gt 0 ]]; then
  if is_root && command -v apt-get >/dev/null 2>&1; then
    # Debian's postgresql package may also start a system cluster on port 5432; the demo
    # does not use it (it runs its own on a free port).
    apt_install "${missing[@]}"
  else
    say "not installed: ${missing[*]}. \`sluice demo\` needs them (or DATABASE_URL/REDIS_URL):"
    say "  sudo apt-get install ${missing[*]}"
  fi
fi

say "ready: \`source .venv/bin/activate\` gives the \`sluice\` command"
say "running: sluice demo $*"
exec .venv/bin/sluice demo "$@"
