#!/usr/bin/env bash
# One node, several GPUs: the sampler on GPU 0, the students on GPUs 1.. round-robin (all share the
# only GPU when there is one; everything on the CPU when there is none), coordinator on the CPU.
#   launch/single_node.sh configs/quickstart.toml [--set key=value ...]
#   GPUS=2,3,4 launch/single_node.sh CONFIG      # restrict to these GPUs
set -euo pipefail
config=${1:?usage: launch/single_node.sh CONFIG [gped run options]}
shift
if [ -n "${GPUS:-}" ]; then
  export CUDA_VISIBLE_DEVICES="$GPUS"
fi
exec gped run "$config" "$@"
