#!/bin/bash
# dvos with torchrun (a GPU machine, or nodes without SLURM): one process per GPU.
#
#   one node, all its GPUs:
#     experiments/torchrun/train.sh experiment=distill_davis2017 data.root=/data/DAVIS data.train_root=...
#   two nodes with 8 GPUs each: on every node, the same RUN_DIR on a shared file system:
#     NNODES=2 NODE_RANK=0 NPROC=8 MASTER_ADDR=node0 RUN_DIR=runs/big experiments/torchrun/train.sh ...
#     NNODES=2 NODE_RANK=1 NPROC=8 MASTER_ADDR=node0 RUN_DIR=runs/big experiments/torchrun/train.sh ...
#
# Every argument is a `dvos train` override. Started again with the same RUN_DIR, it continues from
# <RUN_DIR>/checkpoints/last.ckpt. docs/cluster.md explains the details.
set -euo pipefail
cd "$(dirname "$0")/../.."

NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
TORCHRUN=${TORCHRUN:-.venv/bin/torchrun}
if [[ "$NPROC" -lt 1 ]]; then
    echo "train.sh: no GPU found (nvidia-smi); set NPROC" >&2
    exit 2
fi
if [[ "$NNODES" -gt 1 && -z "${RUN_DIR:-}" ]]; then
    echo "train.sh: with NNODES > 1 set RUN_DIR to the same folder on every node" >&2
    exit 2
fi
# Every rank must write into one folder: fixed here, not the timestamp each process would pick.
RUN_DIR=${RUN_DIR:-runs/torchrun-$(date +%Y%m%d-%H%M%S)}
RESUME=()
if [[ -f "$RUN_DIR/checkpoints/last.ckpt" ]]; then
    RESUME=(ckpt_path=last)
fi

exec "$TORCHRUN" \
    --nnodes="$NNODES" --node-rank="$NODE_RANK" --nproc-per-node="$NPROC" \
    --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" \
    -m dvos.cli.main train \
    trainer=ddp_multinode \
    "trainer.devices=${NPROC}" \
    "trainer.num_nodes=${NNODES}" \
    "run_dir=${RUN_DIR}" \
    ${RESUME[@]+"${RESUME[@]}"} \
    "$@"
