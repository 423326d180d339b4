#!/usr/bin/env bash
# usage: idle.sh BIN K SECS : K idle 2-shard servers at once for SECS; prints per-run max gap between stats lines per shard and SIGTERM exit time
BIN=$1; K=$2; SECS=$3
ulimit -l unlimited 2>/dev/null || true
dir=$(mktemp -d)
pids=()
for i in $(seq 1 $K); do
  mkdir -p $dir/$i
  $BIN --shards 2 --stats-interval 1 --listen 127.0.0.1:0 --admin 127.0.0.1:0 --data-dir $dir/$i --log-format json > $dir/$i/out 2>&1 &
  pids+=($!)
done
sleep $SECS
for i in $(seq 1 $K); do
  p=${pids[$((i-1))]}
  t0=$(date +%s.%N); kill -TERM $p
  ( for j in $(seq 1 100); do kill -0 $p 2>/dev/null || break; sleep 0.1; done ) 
  if kill -0 $p 2>/dev/null; then kill -KILL $p; ex=KILLED; else ex=$(echo "$(date +%s.%N) - $t0" | bc); fi
  wait $p 2>/dev/null
  python3 - "$dir/$i/out" "$ex" "$t0" <<'PY'
import json,sys,datetime
f,ex,t0=sys.argv[1],sys.argv[2],float(sys.argv[3])
last={};gap={}
first=None
for line in open(f):
    try: j=json.loads(line)
    except: continue
    if j.get('fields',{}).get('message')!='shard stats': continue
    ts=datetime.datetime.fromisoformat(j['timestamp'].replace('Z','+00:00')).timestamp()
    s=j['fields']['shard']
    if s in last: gap[s]=max(gap.get(s,0),ts-last[s])
    last[s]=ts
for k in last: gap[k]=max(gap.get(k,0), t0-last[k]) if ex=='KILLED' else gap[k]
stall=any(v>2.5 for v in gap.values())
print(("STALL " if stall else "ok    ")+f"run max_gap_s={ {k:round(v,2) for k,v in sorted(gap.items())} } lines={len(last)} sigterm_exit_s={ex}")
PY
done
rm -rf $dir
