#!/usr/bin/env bash
# On the dev box, before the first device call of a session: make the two git-ignored folders every protocol script
# expects to be carried (run's carry: [".whl", ".devdata"]), from pip's registry and ../shared. A fresh checkout has
# neither; a folder already complete is left as it is.
#   .whl/      wheels the device image lacks (its Python is 3.12, manylinux x86_64): zstandard, brotli and the pinned
#              python-minifier, at the versions this box runs (safetensors, sentencepiece, typer, rich are there)
#   .devdata/  the benchmark corpus and both tokenizers (benchmarks/gpu_setup.sh tokenizes them there), and
#              reference/ with the challenge's baseline as baseline_gpt.py (benchmarks/baseline_step.sh), the 04-16
#              record's train_gpt.py as record_0416.py and the FlashAttention-3 stand-in (benchmarks/record_step.sh)
#   bash benchmarks/device_prep.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
[ -d "$SHARED/data" ] || { echo "device_prep.sh: $SHARED/data not found (set SHARED=...)" >&2; exit 1; }
version() { python3 -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
mkdir -p .whl
for name in zstandard brotli python-minifier; do
  pin="$name==$(version "$name")"
  ls .whl/"${name//-/_}"-"$(version "$name")"-*.whl >/dev/null 2>&1 && continue
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$pin"
done
mkdir -p .devdata/reference
cp -n "$SHARED"/data/bench/blogs-125MB.jsonl.zst "$SHARED"/data/tokenizers/fineweb_{1024,8192}_bpe.model .devdata/
cp -n "$SHARED"/reference/flash_attn_interface.py .devdata/reference/
cp -n "$SHARED"/reference/baseline/train_gpt.py .devdata/reference/baseline_gpt.py
cp -n "$SHARED"/reference/records/2026-04-16_*/train_gpt.py .devdata/reference/record_0416.py
ls .whl; du -sh .whl .devdata | tr '\n' ' '; echo "(carry: [\".whl\", \".devdata\"], 64 MiB at most)"
