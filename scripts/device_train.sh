# Train the bundled tiny-shapes model on a lent GPU in one run (all three stages within MINUTES):
#
#     OUT=/some/dir [NAME=tiny-shapes] bash scripts/device_train.sh [MINUTES=7.5] [options]
#
# options are those of easel.training.tinyshapes.recipe (e.g. --latent-channels 8). Needs
# diffusers importable (on a lent machine: the wheels carried in .whl/, installed with
# PYTHONPATH=/tmp/site:src first).
# Two runs may share one GPU (each with its own NAME and RUN folder); docs/TRAINING-LOG.md says how the
# 2026-11-27 pair was run. Writes one archive into $OUT, in 15 MB parts since a lent machine sends
# back files of at most 16 MiB (`cat NAME.tar.gz.part-* | tar -xz`): NAME/pipeline (the
# StableDiffusionPipeline folder), samples.png, loss.png, summary.json (final losses, throughput,
# params) and train.log.
# On a machine without CUDA the same command trains on the CPU (device auto), e.g. to check it.
set -euo pipefail
MINUTES="${1:-7.5}"
shift || true
OUT="${OUT:?set OUT to the folder for the results}"
NAME="${NAME:-tiny-shapes}"
RUN="${RUN:-/tmp/$NAME-run}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
rm -rf "$RUN"  # a fresh run: the budget covers all stages
mkdir -p "$RUN/$NAME"
python3 - <<'PY' 2>&1 | tee "$RUN/$NAME/train.log"
import torch, diffusers, transformers
print(f"torch {torch.__version__} diffusers {diffusers.__version__} ({diffusers.__file__}) transformers {transformers.__version__}")
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
PY
python3 -m easel.training.tinyshapes.recipe --preset gpu --out "$RUN" --max-minutes "$MINUTES" "$@" 2>&1 \
    | tee -a "$RUN/$NAME/train.log"
mv "$RUN/pipeline" "$RUN/samples.png" "$RUN/loss.png" "$RUN/summary.json" "$RUN/$NAME/"
tar -czf - -C "$RUN" "$NAME" | split -b 15m - "$OUT/$NAME.tar.gz.part-"
ls -l "$OUT"
