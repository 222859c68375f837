#!/usr/bin/env bash
# Set-up for `make demo` and `make test`; each part is skipped when already done:
#  1. Chromium (Debian's package, for the browser test tests/test_web.py), with apt-get when missing;
#  2. .venv in the repository root (if missing or stale) with the project and its dev extra.
# Nothing else is downloaded, then or at run time.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

chromium=/usr/bin/chromium
if [ ! -x "$chromium" ]; then
  if command -v apt-get >/dev/null; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    log="$(mktemp)"
    apt=($sudo env DEBIAN_FRONTEND=noninteractive apt-get -qq -o DPkg::Lock::Timeout=600)
    echo "bootstrap: installing Debian's chromium (apt-get) for the browser test"
    # A fresh or stale package index: refresh it once and retry.
    if ! "${apt[@]}" install -y chromium >"$log" 2>&1; then
      "${apt[@]}" update >>"$log" 2>&1 || true
      "${apt[@]}" install -y chromium >>"$log" 2>&1 || true
    fi
    if [ ! -x "$chromium" ]; then
      tail -n 20 "$log" >&2
      echo "bootstrap: WARNING: could not install chromium with apt-get (log above); tests/test_web.py will fail" >&2
    fi
    rm -f "$log"
  else
    echo "bootstrap: WARNING: $chromium is missing and apt-get is not available; install Chromium there for tests/test_web.py" >&2
  fi
fi

stamp=.venv/.bootstrap-stamp
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"
echo "$want" > "$stamp"
