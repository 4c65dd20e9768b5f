#!/usr/bin/env sh
# Installs what tests/test_playground.py drives: Debian's chromium and chromium-driver packages
# (/usr/bin/chromium, /usr/bin/chromedriver), with apt-get, as root or through sudo without a
# password prompt. Never fails: when they cannot be installed (no apt-get, no rights, no network) it
# prints one line and exits 0, and the browser test skips, naming what is missing.
#
#   scripts/install_browser.sh [LOG]   (apt-get's output goes to LOG, default /dev/null)
LOG=${1:-/dev/null}
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "browser test: no apt-get here; install chromium and chromedriver to run tests/test_playground.py"
    exit 0
fi
if [ "$(id -u)" = 0 ]; then
    SUDO=
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo -n"
else
    echo "browser test: not root and no sudo; install chromium and chromium-driver to run tests/test_playground.py"
    exit 0
fi
printf "browser test: installing Debian's chromium and chromium-driver with apt-get... "
if { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q &&
     $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver
   } >"$LOG" 2>&1 </dev/null; then
    echo "done"
else
    echo "failed (see $LOG); tests/test_playground.py will skip"
fi
exit 0
