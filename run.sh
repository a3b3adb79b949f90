#!/usr/bin/env bash
# Launch train_gpt.py on every GPU of this machine (8 on a record machine), or, with no
# GPU, the small CPU preset on the shipped sample. Extra arguments go to train_gpt.py.
set -euo pipefail
cd "$(dirname "$0")"
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$gpus" -gt 0 ]; then
    exec torchrun --standalone --nproc_per_node="$gpus" train_gpt.py "$@"
else
    echo "no GPU found: running the CPU preset on data/sample (a few minutes)"
    exec python3 train_gpt.py --preset cpu "$@"
fi
