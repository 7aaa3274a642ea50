python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src
# Train the bundled tiny-shapes model on a lent GPU in one run (all three stages within MINUTES):
#
#     OUT=/some/dir bash scripts/device_train.sh [MINUTES=7.5] [options]
#
# options are those of easel.training.base; the next run planned (docs/MODEL.md) is
#     bash scripts/device_train.sh 8.5 --latent-channels 8 --vae-share 0.3
# The first line installs the wheels carried in .whl/ (diffusers) beside the machine's torch and
# transformers. Writes into $OUT: tiny-shapes.tar.gz.part-aa, -ab, ... (the
# StableDiffusionPipeline folder, in 9 MB parts since a lent machine sends back files of at most
# 16 MiB: `cat tiny-shapes.tar.gz.part-* | tar -xz`), samples.png, loss.png, summary.json (final
# losses, throughput, params) and train.log.
# On a machine without CUDA the same command trains on the CPU (device auto), e.g. to check it.
set -euo pipefail
MINUTES="${1:-7.5}"
shift || true
OUT="${OUT:?set OUT to the folder for the results}"
RUN="${RUN:-/tmp/tiny-shapes-run}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
rm -rf "$RUN"  # a fresh run: the budget covers all stages
python3 - <<'PY' 2>&1 | tee "$OUT/train.log"
import torch, diffusers, transformers
print(f"torch {torch.__version__} diffusers {diffusers.__version__} ({diffusers.__file__}) transformers {transformers.__version__}")
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
PY
python3 -m easel.training.base --preset gpu --out "$RUN" --max-minutes "$MINUTES" "$@" 2>&1 \
    | tee -a "$OUT/train.log"
tar -czf - -C "$RUN" pipeline | split -b 9m - "$OUT/tiny-shapes.tar.gz.part-"
cp "$RUN/samples.png" "$RUN/loss.png" "$RUN/summary.json" "$OUT/"
ls -l "$OUT"
