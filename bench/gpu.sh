#!/usr/bin/env bash
# The vision benchmark on a CUDA machine, as one prepared run: bare models in fp32 and mixed
# precision at two batch sizes (a GPU host without Postgres/Redis measures the models alone).
#   bash bench/gpu.sh            (set SIZE=tiny for a quick check)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
for precision in fp32 amp; do
  for batch in 8 32; do
    echo "== precision=$precision batch=$batch"
    "$PY" -m bench.vision --size "${SIZE:-base}" --device cuda --precision "$precision" \
      --batch "$batch" --images "${IMAGES:-64}" --bare-only
  done
done
