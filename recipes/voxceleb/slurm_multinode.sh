#!/usr/bin/env bash
# Slurm template: stage 2 (training) on several nodes with torchrun's c10d rendezvous.
# Run stage 1 (prepare) once beforehand, on one node, into the shared --exp folder.
#
#   sbatch recipes/voxceleb/slurm_multinode.sh
#
# Adjust the #SBATCH lines, EXP and HPARAMS. Every node runs run.sh once; torchrun starts
# GPUS_PER_NODE processes there and the first node of the allocation hosts the rendezvous.
#SBATCH --job-name=qmargin-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=72:00:00
set -euo pipefail

EXP=${EXP:-exp/vox2_qmargin}
HPARAMS=${HPARAMS:-hparams/vox2_ecapa_qmargin.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
PORT=${PORT:-29500}
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

# One task per node; each knows its node rank from Slurm.
srun --kill-on-bad-exit=1 bash -c "bash recipes/voxceleb/run.sh --exp '$EXP' --hparams '$HPARAMS' \
  --stage 2 --stop_stage 2 --nproc $GPUS_PER_NODE --nnodes $SLURM_JOB_NUM_NODES \
  --node_rank \$SLURM_NODEID --rdzv_endpoint $head_node:$PORT"
