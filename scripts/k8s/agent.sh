# shellcheck shell=bash
# The container command of every pod that scripts/k8s/render.py writes, run as
#   tini -- bash -c "<this file>" ncl-launch OVERRIDE...
# (tini, the image's ENTRYPOINT, is PID 1). Starts one ncl-launch agent: a node agent for
# node rank $NODE_RANK (JobSet's job index; PyTorchJob's $RANK), or a standby agent when
# NCL_STANDBY=1. SIGTERM and SIGUSR1 go to the agent, which checkpoints and exits 143 (the
# manifests' preStop hook sends SIGUSR1; the kubelet's SIGTERM follows). A node pod whose
# node rank a standby took over while it was gone (the agent refuses with "was taken over
# by a standby node") becomes a standby itself: the job gets its spare back.
set -u
log=/tmp/ncl-agent.log
child=0
signalled=0
# shellcheck disable=SC2317,SC2329  # forward: called from the traps below
forward() {
    signalled=1
    if ((child > 0)); then kill -"$1" "$child" 2>/dev/null || true; fi
}
trap 'forward TERM' TERM
trap 'forward USR1' USR1

run() { # run the agent in the background, so that this shell can pass signals on
    "$@" 2> >(tee -a "$log" >&2) &
    child=$!
    local code
    while :; do
        signalled=0
        wait "$child"
        code=$?
        # a trapped signal interrupts the wait (status 128+n) whether or not the agent has
        # exited yet: wait again for the agent's own exit status
        ((signalled && code > 128)) || break
    done
    child=0
    return "$code"
}

read -r -a launch <<<"$NCL_LAUNCH"
common=(--nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" --spares "$NCL_SPARES"
    --peers "$NCL_PEERS")
# where standbys serve once they take a node over: a node pod restarted with NCL_PEERS as
# first rendered finds through them the shards a standby moved
if [[ -n ${NCL_STANDBY_PEERS:-} ]]; then common+=(--standby-peers "$NCL_STANDBY_PEERS"); fi
entry=("$NCL_ENTRY_SCRIPT" "recipe=$RECIPE" "$NCL_RUN_DIR_KEY=$NCL_RUN_DIR" "$@")
self=$(hostname)${NCL_SUBDOMAIN:+.$NCL_SUBDOMAIN}
standby=("${launch[@]}" --standby "${common[@]}" --standby-host "$self"
    --standby-port "$NCL_PORT" "${entry[@]}")

mkdir -p "$NCL_RUN_DIR"
if [[ ${NCL_STANDBY:-0} == 1 ]]; then
    run "${standby[@]}"
    exit $?
fi
run "${launch[@]}" "${common[@]}" --node-rank "${NODE_RANK:-${RANK:?}}" "${entry[@]}"
code=$?
if ((code == 1)) && grep -q "was taken over by a standby node" "$log"; then
    echo "[pod] node rank ${NODE_RANK:-$RANK} is served by a former standby: this pod" \
        "becomes a standby agent" >&2
    run "${standby[@]}"
    code=$?
fi
exit "$code"
