#!/usr/bin/env bash
# Set up and run the main job: train the reference VQ-VAE with the fused kernels on the photos
# bundled with scikit-image/scikit-learn (a few minutes on 2 CPU cores). Results land in
# runs/quickstart/: metrics.json, reconstructions.png, checkpoint.pt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh dev,models
"$PY" -m models.train --model vqvae --dataset photos --out runs/quickstart --minutes "${MINUTES:-3}" "$@"
echo "[quickstart] reconstructions: runs/quickstart/reconstructions.png  metrics: runs/quickstart/metrics.json"
