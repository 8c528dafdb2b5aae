#!/usr/bin/env bash
# mmfm's check on a lent CUDA machine (it starts bare; nothing can be fetched there). From the repo root:
#
#     bash tools/gpu_check.sh [OUT_JSON [--cpu-dry-run]]   # default: $OUT/gpu_check.json, else ./gpu_check.json
#
# Carry `.whl` (ignored by git) holding the wheels the machine lacks; prepare it once on a machine with
# pip access (see docs/architecture.md, "GPU check"): open_clip_torch, ftfy, wcwidth (the text tokenizer)
# and, optionally, xformers built for the torch found there. They go to a private --target folder with
# --no-deps, so the machine's torch is never replaced; mmfm itself runs from the checkout via PYTHONPATH.
# If xformers is missing or does not import against this torch, that is recorded and the SDPA parts run.
# Whole run: well under 5 minutes on an H100.
set -u
cd "$(dirname "$0")/.."
OUT_JSON=${1:-${OUT:-.}/gpu_check.json}
PY=${PYTHON:-python3}
SITE=${MMFM_GPU_SITE:-/tmp/mmfm_site}
export PYTHONUNBUFFERED=1

"$PY" -c 'import torch; print("torch", torch.__version__, "| cuda", torch.version.cuda,
"| available", torch.cuda.is_available(), "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")' || exit 2

if compgen -G ".whl/*.whl" >/dev/null; then
    for wheel in .whl/*.whl; do
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$wheel" \
            || echo "gpu_check.sh: could not install $wheel"
    done
else
    echo "gpu_check.sh: no .whl/ folder carried; relying on the packages already installed"
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c 'import xformers.ops, xformers; print("xformers", xformers.__version__)' 2>/dev/null \
    || echo "gpu_check.sh: xformers could not be installed/imported for this torch; SDPA parts only"

timeout 60 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_attention.py 2>&1 | tail -5
timeout 240 "$PY" tools/gpu_check.py --json "$OUT_JSON" "${@:2}"
status=$?
echo "gpu_check.sh: exit $status, report in $OUT_JSON"
exit $status
