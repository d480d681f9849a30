#!/usr/bin/env bash
# Several hosts: start one role per invocation, on the host that should run it. Every host needs
# gped installed, the same CONFIG, and the same prepared data (gped data prepare CONFIG --out DIR;
# the handshake compares fingerprints, so copying the folder is fine).
#
#   COORD=10.0.0.1 SAMPLER=10.0.0.2 launch/multi_host.sh coordinator CONFIG
#   COORD=10.0.0.1 SAMPLER=10.0.0.2 launch/multi_host.sh sampler     CONFIG
#   COORD=10.0.0.1 SAMPLER=10.0.0.2 launch/multi_host.sh student     CONFIG NAME
#
# The coordinator and the sampler bind on all interfaces (coordinator.bind=0.0.0.0). Across hosts
# set KEYS to a folder made by `gped keys` (CURVE authentication); without it pass INSECURE=1 to
# accept an unauthenticated run on a trusted network.
set -euo pipefail
role=${1:?usage: multi_host.sh coordinator|sampler|student CONFIG [NAME]}
config=${2:?missing CONFIG}
: "${COORD:?set COORD to the coordinator host's address}"
SAMPLER=${SAMPLER:-$COORD}
args=(--set "coordinator.host=\"$COORD\"" --set "coordinator.sampler_host=\"$SAMPLER\"")
if [ -n "${KEYS:-}" ]; then
  args+=(--set "coordinator.keys=\"$KEYS\"")
elif [ "${INSECURE:-0}" = 1 ]; then
  args+=(--set coordinator.allow_insecure=true)
fi
case "$role" in
  coordinator|sampler) args+=(--set 'coordinator.bind="0.0.0.0"') ;;
esac
case "$role" in
  coordinator) exec gped coordinator "$config" "${args[@]}" ;;
  sampler) exec gped sampler "$config" "${args[@]}" ;;
  student) exec gped student "$config" --name "${3:?missing student NAME}" "${args[@]}" ;;
  *) echo "error: unknown role $role (coordinator, sampler or student)" >&2; exit 2 ;;
esac
