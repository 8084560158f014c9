# shellcheck shell=bash disable=SC2154  # cmd, hosts, standbys, spare_hosts: pretrain.sbatch's
# The supervisor loop of scripts/slurm/pretrain.sbatch: starts the agent and standby steps,
# follows standby takeovers, replaces failed nodes, forwards the time-limit signal and
# requeues the job. Sourced by pretrain.sbatch, which sets every parameter and defines
# log, die, step_cmd, standby_cmd, node_ep and peers_now; not run by itself.
#
# Exit codes the supervisor reads from an agent step (srun returns the agent's):
#   0    that node's ranks finished
#   2    usage error, 3 the job cannot recover: the job ends
#   143  the agent checkpointed and stopped after SIGUSR1/SIGTERM (a stop this script asked for)
#   else the node failed (killed, lost, crashed): a standby takes it over, or it is restarted

declare -A pid_of=() host_of=() role_of=() port_of=() # step key -> srun pid, host, node rank or "standby", port
declare -A key_of=()      # node rank -> the step that serves it now
declare -A pending=()     # node rank -> $SECONDS by which a standby should have claimed it
declare -A taken_over=()  # node ranks a standby took over (ncl-launch refuses a scheduler restart of those)
declare -A done_rank=() node_code=()
replacements=0 next_key=0 next_standby=0 stop_signal="" stop_deadline=0
idle_hosts=()
state_dir=$(mktemp -d "${TMPDIR:-/tmp}/ncl-supervise.XXXXXX")
trap 'rm -rf "$state_dir"' EXIT

# Pass a standby's output through and note the node rank it takes over: the agent logs
# "node R lost: this standby takes it over (...)" once it owns node rank R.
standby_filter() {
    local key=$1 line
    while IFS= read -r line; do
        printf '%s\n' "$line" >&2
        if [[ $line =~ node\ ([0-9]+)\ lost:\ this\ standby\ takes\ it\ over ]]; then
            echo "${BASH_REMATCH[1]}" >"$state_dir/claim.$key"
        fi
    done
}

start_agent() {
    local rank=$1 host=$2 key=a$next_key
    next_key=$((next_key + 1))
    node_ep[rank]=$host:$((NCL_PORT + rank))
    step_cmd "$rank" "$host"
    (cd "$NCL_REPO" && exec "${cmd[@]}") &
    pid_of[$key]=$! host_of[$key]=$host role_of[$key]=$rank key_of[$rank]=$key
    log "node rank $rank: agent on $host (srun pid ${pid_of[$key]})"
}

start_standby() {
    local host=$1 key=s$next_key k=$next_standby
    next_key=$((next_key + 1)) next_standby=$((next_standby + 1))
    standby_cmd "$k" "$host"
    (cd "$NCL_REPO" && exec "${cmd[@]}") > >(standby_filter "$key") 2>&1 &
    pid_of[$key]=$! host_of[$key]=$host role_of[$key]=standby port_of[$key]=$((NCL_PORT + NNODES + k))
    log "standby $k: agent on $host (srun pid ${pid_of[$key]}), store port ${port_of[$key]} (listening from its start, serving once it takes a node over)"
}

# Slurm still lets us start steps on this host (not DOWN, DRAINED, FAILED, NOT_RESPONDING)
host_usable() {
    local state
    state=$(scontrol show node "$1" 2>/dev/null | grep -o 'State=[^ ]*' || true)
    [[ -n $state && ! $state =~ DOWN|DRAIN|FAIL|NOT_RESPONDING ]]
}

count_role() { # number of live steps that are standbys ($1 = standby) or node agents ($1 = node)
    local key n=0
    for key in "${!pid_of[@]}"; do
        if [[ $1 == standby && ${role_of[$key]} == standby ]] ||
            [[ $1 == node && ${role_of[$key]} != standby ]]; then
            n=$((n + 1))
        fi
    done
    echo "$n"
}

# a host whose node failed gets a new standby when Slurm still lists it as usable
refill_standby() {
    local host=$1
    if [[ -n $stop_signal ]] || ((replacements >= MAX_REPLACEMENTS)) || ! host_usable "$host"; then
        return 0
    fi
    log "$host is usable: a new standby agent starts there"
    start_standby "$host"
}

check_claims() {
    local f key rank old
    for f in "$state_dir"/claim.*; do
        [[ -e $f ]] || continue
        key=${f##*/claim.}
        rank=$(<"$f")
        rm -f "$f"
        old=${key_of[$rank]:-}
        role_of[$key]=$rank key_of[$rank]=$key taken_over[$rank]=1
        node_ep[rank]=${host_of[$key]}:${port_of[$key]}
        unset "pending[$rank]"
        replacements=$((replacements + 1))
        log "node rank $rank: taken over by the standby on ${host_of[$key]}" \
            "(replacement $replacements of $MAX_REPLACEMENTS)"
        if [[ -n $old && -z ${pid_of[$old]:-} ]]; then
            refill_standby "${host_of[$old]}"
        fi
    done
}

fail() { # $1: exit code, rest: why
    local code=$1
    shift
    log "$*"
    stop_all
    log "job failed (exit code $code)"
    exit "$code"
}

stop_all() { # end every step now (srun answers SIGTERM by killing its tasks)
    local key
    for key in "${!pid_of[@]}"; do
        kill -TERM "${pid_of[$key]}" 2>/dev/null || true
    done
    for key in "${!pid_of[@]}"; do
        wait "${pid_of[$key]}" 2>/dev/null || true
        unset "pid_of[$key]"
    done
}

# node rank $1, whose agent on host $2 failed, starts again under the scheduler
restart_rank() {
    local rank=$1 host=$2 new=""
    if [[ -n ${taken_over[$rank]:-} ]]; then
        fail 1 "node rank $rank is served by a former standby, which ncl-launch does not let the" \
            "scheduler replace, and no standby agent is left (add SPARE_NODES)"
    fi
    if ((rank < STORE_NODES && STORE_NODES == 1)); then
        fail 1 "node rank $rank served the job's only store shard: the job cannot re-form (the" \
            "store's state died with it; see docs/launch.md)"
    fi
    if ((${#idle_hosts[@]} > 0)); then
        new=${idle_hosts[0]}
        idle_hosts=("${idle_hosts[@]:1}")
    elif host_usable "$host"; then
        new=$host
    else
        fail 1 "node rank $rank: no spare node left and $host is unusable"
    fi
    replacements=$((replacements + 1))
    log "node rank $rank: replacement $replacements of $MAX_REPLACEMENTS on $new"
    start_agent "$rank" "$new"
}

# standbys that still hold no node, minus the failures already handed to them
free_standbys() {
    echo $(($(count_role standby) - ${#pending[@]}))
}

on_signal() { # $1: USR1 (time limit near), TERM or INT (stop now)
    local fwd=USR1
    [[ $1 != USR1 ]] && fwd=TERM
    if [[ -n $stop_signal ]]; then
        log "got SIG$1 again: passing SIG$fwd on"
    else
        stop_signal=$1 stop_deadline=$((SECONDS + STOP_WAIT_S))
        log "got SIG$1: every agent checkpoints at the next step boundary and stops" \
            "(SIG$fwd to every step; up to STOP_WAIT_S=${STOP_WAIT_S}s)"
    fi
    scancel --signal="$fwd" "$SLURM_JOB_ID" || log "scancel --signal=$fwd $SLURM_JOB_ID failed"
}

metric_rows() {
    if [[ -f $RUN_DIR/metrics.jsonl ]]; then
        wc -l <"$RUN_DIR/metrics.jsonl"
    else
        echo 0
    fi
}

# a dead step: record it, return the failure ("rank:code:host") in $failure, if any
reap() {
    local key=$1 code=0 role host
    wait "${pid_of[$key]}" || code=$?
    role=${role_of[$key]} host=${host_of[$key]}
    unset "pid_of[$key]"
    failure=""
    if [[ $role == standby ]]; then
        if ((code == 0 || ${#done_rank[@]} == NNODES)) || [[ -n $stop_signal ]]; then
            log "standby on $host exited (code $code)"
        elif ((code == 2)); then
            fail 2 "standby on $host: usage error (exit code 2): the job cannot continue"
        else
            log "standby on $host exited with code $code while holding no node"
            refill_standby "$host"
        fi
    elif [[ ${key_of[$role]} != "$key" ]]; then
        log "node rank $role: its former agent on $host exited (code $code) after the takeover"
        refill_standby "$host"
    elif ((code == 0)); then
        done_rank[$role]=1 node_code[$role]=0
        log "node rank $role: all ranks finished"
    elif [[ -n $stop_signal ]]; then
        node_code[$role]=$code
        log "node rank $role: agent on $host stopped (exit code $code)"
    else
        failure=$role:$code:$host
    fi
}

supervise() {
    local key rank code host item failures dead rows_at_start r
    trap 'on_signal USR1' USR1
    trap 'on_signal TERM' TERM
    trap 'on_signal INT' INT
    rows_at_start=$(metric_rows)
    for ((r = 0; r < NNODES; r++)); do
        start_agent "$r" "${hosts[r]}"
    done
    if ((standbys > 0)); then
        for host in "${spare_hosts[@]}"; do start_standby "$host"; done
    else
        idle_hosts=("${spare_hosts[@]}")
    fi

    while ((${#pid_of[@]} > 0)); do
        sleep "$POLL_S" &
        wait $! || true # a trapped signal interrupts the wait at once
        check_claims
        for rank in "${!pending[@]}"; do
            if ((SECONDS > pending[$rank])) && [[ -z $stop_signal ]]; then
                unset "pending[$rank]"
                log "node rank $rank: no standby took it over within CLAIM_WAIT_S=${CLAIM_WAIT_S}s"
                restart_rank "$rank" "${node_ep[rank]%:*}"
            fi
        done
        if [[ -n $stop_signal ]] && ((SECONDS > stop_deadline)); then
            log "the agents did not stop within STOP_WAIT_S=${STOP_WAIT_S}s: ending their steps"
            stop_all
            break
        fi
        dead=()
        for key in "${!pid_of[@]}"; do
            kill -0 "${pid_of[$key]}" 2>/dev/null || dead+=("$key")
        done
        ((${#dead[@]} == 0)) && continue
        # a failure of every node at once is the job's, not a node's: give them time to show
        failures=()
        for key in "${dead[@]}"; do
            reap "$key"
            [[ -n $failure ]] && failures+=("$failure")
        done
        if ((${#failures[@]} > 0)); then
            sleep "$REPLACE_GRACE_S"
            for key in "${!pid_of[@]}"; do
                if ! kill -0 "${pid_of[$key]}" 2>/dev/null; then
                    reap "$key"
                    [[ -n $failure ]] && failures+=("$failure")
                fi
            done
            check_claims
        fi
        for item in "${failures[@]}"; do
            IFS=: read -r rank code host <<<"$item"
            log "node rank $rank: agent on $host exited with code $code"
            if ((code == 2 || code == 3)); then
                fail "$code" "node rank $rank: the job cannot continue (usage error or unrecoverable)"
            elif [[ -n ${pid_of[${key_of[$rank]}]:-} ]]; then
                continue # a standby took it over meanwhile
            elif (($(count_role node) == 0)); then
                fail "$code" "node rank $rank: no agent is left to rejoin: the job failed"
            elif ((${#done_rank[@]} > 0)); then
                fail "$code" "node rank $rank: other nodes already finished: not replacing it"
            elif ((replacements >= MAX_REPLACEMENTS)); then
                fail "$code" "node rank $rank: MAX_REPLACEMENTS=$MAX_REPLACEMENTS reached"
            elif (($(free_standbys) > 0)); then
                pending[$rank]=$((SECONDS + CLAIM_WAIT_S))
                log "node rank $rank: a standby agent takes it over (waiting up to ${CLAIM_WAIT_S}s)"
            else
                restart_rank "$rank" "$host"
            fi
        done
        if ((${#done_rank[@]} == NNODES)) && (($(count_role standby) > 0)); then
            log "every node rank finished: ending the idle standby agents"
            stop_all
        fi
    done
    finish "$rows_at_start"
}

finish() {
    local rows_at_start=$1 rank code stopped=0 bad=""
    if [[ -z $stop_signal ]]; then
        log "job finished: every node rank completed"
        exit 0
    fi
    for ((rank = 0; rank < NNODES; rank++)); do
        code=${node_code[$rank]:-none}
        if [[ $code == 143 ]]; then
            stopped=$((stopped + 1))
        elif [[ $code != 0 ]]; then
            bad+=" $rank:$code"
        fi
    done
    if ((stopped == 0 && ${#done_rank[@]} == NNODES)); then
        log "job finished: every node rank completed"
        exit 0
    fi
    if [[ -n $bad ]]; then
        log "stopped on SIG$stop_signal, but not every agent confirmed a checkpoint (exit code" \
            "143); node rank:code$bad. Not requeueing: a requeued run could start from an" \
            "older checkpoint than expected, or loop (does this ncl-launch handle SIG$stop_signal?)"
        exit 1
    fi
    log "every agent checkpointed and stopped"
    if [[ $stop_signal != USR1 ]]; then
        exit 143 # preemption or scancel: Slurm requeues (or not) by itself
    elif [[ $REQUEUE != 1 ]]; then
        log "REQUEUE=$REQUEUE: not requeueing; resubmit with the same RUN_DIR to continue"
        exit 143
    elif ((RESTART_COUNT >= MAX_REQUEUES)); then
        log "MAX_REQUEUES=$MAX_REQUEUES reached: not requeueing"
        exit 143
    elif (($(metric_rows) <= rows_at_start)) && [[ -f $RUN_DIR/metrics.jsonl ]]; then
        log "no step was committed in this run ($RUN_DIR/metrics.jsonl still has $rows_at_start" \
            "rows): not requeueing, a requeue would not progress either"
        exit 143
    fi
    log "requeueing job $SLURM_JOB_ID (run $((RESTART_COUNT + 2))): it resumes from the" \
        "checkpoint in $RUN_DIR"
    trap - USR1 TERM INT # the requeue ends this run of the script and its steps
    scontrol requeue "$SLURM_JOB_ID" || {
        log "scontrol requeue failed: resubmit with RUN_DIR=$RUN_DIR to continue"
        exit 143
    }
    exit 0
}
