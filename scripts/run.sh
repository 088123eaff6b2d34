#!/usr/bin/env bash
# The README's main command: a real headless ComfyUI runs a shipped workflow end to end.
#   scripts/run.sh [--workflow NAME] [--models DIR] [--size tiny|full] [--out DIR] ...   (--help for all)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
comfy=$("$root/scripts/bootstrap.sh" | tail -n 1)
export COMFYUI_PATH=${COMFYUI_PATH:-$comfy}
cd "$root"
exec "${LOWVRAM_VENV:-$root/.venv}/bin/python" -m harness.main "$@"
