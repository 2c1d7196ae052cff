#!/usr/bin/env bash
# What tests/test_page.py needs on a fresh Debian machine (run as root; idempotent, quick when
# everything is there already):
#   - Debian's Chromium (/usr/bin/chromium) and a font with Cyrillic/Kazakh glyphs, from apt;
#   - the `playwright` Python package in the project's venv, which only *drives* that Chromium.
# No browser is downloaded: `playwright install` is never run, the test passes
# executable_path=/usr/bin/chromium.
#
#   bash tests/install_browser.sh          # VENV=.venv by default
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
# The pin lives in requirements-dev.txt when it is there; this is the fallback.
PLAYWRIGHT_PIN="$(grep -Eo '^playwright==[^ ;#]+' requirements-dev.txt 2>/dev/null || true)"
PLAYWRIGHT_PIN="${PLAYWRIGHT_PIN:-playwright==1.65.2}"
APT_PACKAGES=(chromium fonts-dejavu-core)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "install_browser: apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
test -x /usr/bin/chromium
/usr/bin/chromium --version 2>/dev/null || true

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
if ! "$VENV/bin/python" - "$PLAYWRIGHT_PIN" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(version("playwright") != sys.argv[1].split("==")[1])
EOF
then
  echo "install_browser: pip install $PLAYWRIGHT_PIN"
  find_links=()
  [ -d /opt/wheels ] && find_links=(--find-links /opt/wheels)
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 "$VENV/bin/python" -m pip install --disable-pip-version-check -q \
    "${find_links[@]}" "$PLAYWRIGHT_PIN"
fi
"$VENV/bin/python" -c "import playwright.sync_api, importlib.metadata as m; print('playwright', m.version('playwright'))"
