#!/usr/bin/env bash
# The README's test command: lint with the registry's rules, then every CPU test (unit and integration:
# a real headless ComfyUI 0.3.75 runs the pack). Extra arguments go to pytest (e.g. -k server, -x).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
comfy=$("$root/scripts/bootstrap.sh" | tail -n 1)
export COMFYUI_PATH=${COMFYUI_PATH:-$comfy}
py="${LOWVRAM_VENV:-$root/.venv}/bin/python"
cd "$root"
echo "[test] ruff (Comfy Registry rules S102, S307, E702; pyflakes)"
"$py" -m ruff check .
echo "[test] disk space for the synthetic models and the tests' scratch files"
"$py" -m harness.synthetic disk ${LOWVRAM_SYNTHETIC_DIR:+--models-dir "$LOWVRAM_SYNTHETIC_DIR"}
echo "[test] pytest"
set +e
"$py" -m pytest -q -ra "$@"
rc=$?
set -e
# pytest exits 5 when it collected no test: that is a failure here, never a pass.
[ $rc -eq 5 ] && { echo "[test] pytest collected no tests" >&2; exit 1; }
exit $rc
