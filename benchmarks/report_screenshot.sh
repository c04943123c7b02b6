#!/usr/bin/env bash
# Render a `scdist report` in headless Chromium and save a screenshot (the render check).
#   benchmarks/report_screenshot.sh STORE [OUT.png]
# Installs Debian's chromium when it is missing (needs root / apt), writes STORE.report.html,
# then screenshots it. tests/test_report.py runs the same check when /usr/bin/chromium exists.
set -euo pipefail
STORE=${1:?usage: $0 STORE [OUT.png]}
OUT=${2:-${STORE%/}.report.png}
HERE=$(cd "$(dirname "$0")/.." && pwd)
if [ ! -x /usr/bin/chromium ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
"$HERE/.venv/bin/scdist" report "$STORE" --out "${STORE%/}.report.html"
/usr/bin/chromium --headless --no-sandbox --disable-gpu --hide-scrollbars \
  --window-size=1200,4000 --screenshot="$OUT" "file://$(realpath "${STORE%/}.report.html")" 2>/dev/null
echo "screenshot: $OUT"
