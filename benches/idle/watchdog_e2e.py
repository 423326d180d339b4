# watchdog_e2e.py BIN N SECS: N idle 4-shard servers with a spinning process per core for SECS;
# prints each server's first /healthz 503, then SIGTERMs each and prints exit time, status and
# its warning and error log lines. With a build whose shards stall, shows the watchdog at work.
import subprocess, time, json, urllib.request, os, sys, signal, multiprocessing, tempfile
binp = sys.argv[1]; nserv = int(sys.argv[2]); secs = float(sys.argv[3])
def hog():
    while True: pass
hogs = [multiprocessing.Process(target=hog) for _ in range(2)]
for h in hogs: h.start()
servers = []
for i in range(nserv):
    d = tempfile.mkdtemp()
    p = subprocess.Popen([binp, "--shards", "4", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--data-dir", d, "--stats-interval", "1", "--log-format", "json"],
        stdout=subprocess.PIPE, stderr=open(d + "/log", "w"), env={**os.environ, "RUST_LOG": "info"})
    line = p.stdout.readline().decode()
    admin = [w for w in line.split() if w.startswith("admin=")][0][6:]
    servers.append((p, admin, d))
t0 = time.time(); first503 = {}
while time.time() - t0 < secs:
    time.sleep(0.5)
    for i, (p, admin, d) in enumerate(servers):
        try:
            urllib.request.urlopen(f"http://{admin}/healthz", timeout=2)
        except urllib.error.HTTPError as e:
            if i not in first503:
                first503[i] = (round(time.time() - t0, 1), e.code, e.read().decode())
for h in hogs: h.terminate()
print("first 503 per server:", first503)
for i, (p, admin, d) in enumerate(servers):
    t = time.time(); p.send_signal(signal.SIGTERM)
    try:
        rc = p.wait(timeout=15)
    except subprocess.TimeoutExpired:
        rc = "no exit in 15 s"; p.kill()
    took = round(time.time() - t, 2)
    errs = [json.loads(l) for l in open(d + "/log") if '"ERROR"' in l or '"WARN"' in l]
    print(f"server {i}: SIGTERM exit {took}s status {rc}")
    for e in errs:
        f = e["fields"]; print("   ", e["level"], f.get("message"), {k: v for k, v in f.items() if k != "message"})
