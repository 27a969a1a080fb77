#!/usr/bin/env bash
# Installs the Debian packages that the tests and the benchmark use (nginx for the proxy test, wrk for load,
# chromium for the console's browser tests: Playwright drives the system browser, it never downloads one;
# redis-server for several boards: the cluster tests start their own instances, never the system service)
# and that the sandbox needs (libseccomp2 for the syscall filter).
# Idempotent and quiet when everything is already there.
set -euo pipefail
need=()
command -v nginx >/dev/null 2>&1 || need+=(nginx)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
# The syscall filter: pyseccomp (requirements.txt) is a ctypes binding to Debian's libseccomp.
ldconfig -p 2>/dev/null | grep -q 'libseccomp\.so\.2' || need+=(libseccomp2)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
if ((${#need[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "setup-system: missing ${need[*]}; install them as root (apt-get install -y ${need[*]})" >&2
    exit 0
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
  # Debian starts the nginx service on install; fnbox runs its own nginx instances, never the system one.
  # Likewise redis-server: the tests run their own, with a password, on a free loopback port.
  if command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now nginx >/dev/null 2>&1 || true
    systemctl disable --now redis-server >/dev/null 2>&1 || true
  fi
fi

# Sandboxed calls run as unprivileged uids, and they must be able to read the Python runtime, the venv and
# the functions. A runtime under a private home (pyenv in /root, mode 0700) is unreachable for them, so as
# root we grant traverse-only permission (o+x: enter, not list) on each blocking ancestor directory.
if [[ $(id -u) -eq 0 ]]; then
  repo=$(cd "$(dirname "$0")/.." && pwd)
  py="$repo/.venv/bin/python"
  [[ -x $py ]] || py=$(command -v python3)
  for target in "$("$py" -c 'import sys; print(sys.base_prefix)')" "$repo"; do
    d=$(realpath "$target")
    while [[ $d != / ]]; do
      if [[ $(( 0$(stat -c '%a' "$d") & 1 )) -eq 0 ]]; then
        chmod o+x "$d" && echo "setup-system: granted o+x (traverse) on $d so sandbox uids can reach $target"
      fi
      d=$(dirname "$d")
    done
  done
fi
