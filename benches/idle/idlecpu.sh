#!/usr/bin/env bash
# idlecpu.sh SECS BIN...: each BIN as an idle 2-shard server at once; CPU seconds used over SECS
SECS=$1; shift
pids=(); dirs=()
for b in "$@"; do d=$(mktemp -d); $b --shards 2 --stats-interval 1 --listen 127.0.0.1:0 --admin 127.0.0.1:0 --data-dir $d > $d/out 2>&1 & pids+=($!); dirs+=($d); done
sleep 2
tick=$(getconf CLK_TCK)
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
s=(); for p in "${pids[@]}"; do s+=($(cpu $p)); done
sleep $SECS
i=0; for b in "$@"; do p=${pids[$i]}; e=$(cpu $p); echo "$b: $(echo "scale=3; ($e - ${s[$i]}) / $tick" | bc) s CPU in $SECS s"; kill -TERM $p; i=$((i+1)); done
wait
