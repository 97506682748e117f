#!/usr/bin/env bash
# Run bench/gpu_suite.py on a fresh GPU machine that cannot reach a package index (see bench/README.md).
#
#   bash bench/gpu_suite.sh fetch              # HERE, with an index: download the wheels the GPU image lacks
#                                              #   (bench/gpu_wheels.txt, CPython 3.12, x86-64) into .darkroom/wheels
#   bash bench/gpu_suite.sh [suite options]    # THERE, from the repo root: install .darkroom/wheels (if carried)
#                                              #   into /tmp/darkroom-site, check the imports, run the suite
#
# The GPU machine's own python3 (the one with torch) runs the suite; the carried wheels go to a --target
# folder put first on PYTHONPATH, so nothing of the image is changed. Without carried wheels the suite runs
# with whatever that python has, and says which import is missing if one is. The report is
# $OUT/gpu_suite.json when OUT is set (the device tool's folder), else .darkroom/bench/gpu_suite.json.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${DARKROOM_GPU_WHEELS:-$ROOT/.darkroom/wheels}"
PY="${PYTHON:-python3}"

if [[ "${1:-}" == "fetch" ]]; then
  mkdir -p "$WHEELS"
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" -r "$ROOT/bench/gpu_wheels.txt"
  du -sh "$WHEELS"
  echo "carry .darkroom/wheels with the device tool (carry: [\".darkroom/wheels\"]); see bench/README.md"
  exit 0
fi

cd "$ROOT"
SITE=/tmp/darkroom-site
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
  echo "installed $(ls "$WHEELS"/*.whl | wc -l) carried wheels into $SITE"
else
  echo "no carried wheels in $WHEELS: using $PY's own packages (bash bench/gpu_suite.sh fetch, then carry them)"
fi
export PYTHONPATH="$SITE:$ROOT/common:$ROOT/producer:$ROOT/worker:$ROOT/dev${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1 DIFFUSERS_VERBOSITY=error

missing=$("$PY" - <<'EOF'
import importlib
missing = []
for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "PIL", "numpy",
             "pydantic", "pydantic_settings", "redis"):
    try:
        importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - report every missing piece at once
        missing.append(f"{name} ({type(exc).__name__}: {exc})")
print("; ".join(missing))
EOF
)
"$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")' || true
if [[ -n "$missing" ]]; then
  echo "cannot run the suite: missing imports: $missing" >&2
  echo "carry the wheels (bash bench/gpu_suite.sh fetch here, then carry .darkroom/wheels)" >&2
  if [[ -n "${OUT:-}" ]]; then
    printf '{"suite": "darkroom-gpu-suite", "finished": false, "error": "missing imports: %s"}\n' "${missing//\"/\'}" >"$OUT/gpu_suite.json"
  fi
  exit 3
fi
exec "$PY" bench/gpu_suite.py "$@"
