#!/usr/bin/env bash
# Best effort, never fails: make tcmalloc available for CPU rehearsal.
#
# Rehearsal ranks preload tcmalloc (else jemalloc) when the library is on the machine
# (nemo_checkpointless/allocator.py): with glibc's malloc each rank's memory grows from 0.3 to
# 1.4-2.5 GB within two minutes and steps slow from 0.31 s to 0.54 s (tiny_gpt_2opt, 4 ranks).
# Installs Debian's libtcmalloc-minimal4 (1 MB) when running as root with apt-get; otherwise
# says what to install. Training works either way; only its speed and memory differ.
set -u
have() { ldconfig -p 2>/dev/null | grep -qE 'lib(tcmalloc(_minimal)?|jemalloc)\.so'; }
have && exit 0
if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    if apt-get install -y -qq --no-install-recommends libtcmalloc-minimal4 >/dev/null 2>&1 ||
        { apt-get update -qq >/dev/null 2>&1 &&
          apt-get install -y -qq --no-install-recommends libtcmalloc-minimal4 >/dev/null 2>&1; }
    then
        echo "installed libtcmalloc-minimal4 (tcmalloc for CPU rehearsal)"
        exit 0
    fi
fi
echo "note: no tcmalloc or jemalloc on this machine; CPU rehearsal runs on glibc's malloc" \
     "(slower, memory grows). Install libtcmalloc-minimal4 (apt), gperftools-libs (dnf)" \
     "or gperftools (conda) for faster rehearsal." >&2
exit 0
