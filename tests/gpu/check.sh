#!/usr/bin/env bash
# The GPU checks in one go, for a box with an NVIDIA GPU: nvidia-smi's view, one real
# telemetry sample, then the gpu-marked tests. RECORD (default: test-artifacts/gpu) gets
# every reading the tests compared, as JSON, for the notes.
# Usage: bash tests/gpu/check.sh [RECORD]   (PYTHON picks the interpreter; default python3)
set -uo pipefail
cd "$(dirname "$0")/../.."
record="${1:-test-artifacts/gpu}"
mkdir -p "$record"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi >"$record/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed (rc $?)"
"$PY" -m tunnel.client.telemetry >"$record/sample.json" 2>&1 || echo "telemetry sample failed"
cat "$record/sample.json"
TUNNEL_GPU_RECORD="$record" "$PY" -m pytest -p no:cacheprovider -m gpu tests/gpu -v -rs \
  2>&1 | tee "$record/pytest.log"
rc=${PIPESTATUS[0]}
"$PY" -m pytest -q -p no:cacheprovider tests/unit/test_telemetry.py 2>&1 | tail -3 \
  | tee -a "$record/pytest.log"
exit "$rc"
