# stuck.py BIN SHARDS HOGS: one idle server with HOGS spinning processes; at the first /healthz
# 503 (a stalled shard), POST /drain and report the exit time, status and warning/error lines.
import subprocess, time, json, urllib.request, os, sys, multiprocessing, tempfile
binp = sys.argv[1]
NH = int(sys.argv[3])
def hog():
    while True: pass
hogs = [multiprocessing.Process(target=hog) for _ in range(NH)]
for h in hogs: h.start()
d = tempfile.mkdtemp()
p = subprocess.Popen([binp, "--shards", sys.argv[2], "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--data-dir", d, "--log-format", "json"], stdout=subprocess.PIPE, stderr=open(d + "/log", "w"), env={**os.environ, "RUST_LOG": "info"})
admin = [w for w in p.stdout.readline().decode().split() if w.startswith("admin=")][0][6:]
t0 = time.time()
while time.time() - t0 < 60:
    time.sleep(0.5)
    try: urllib.request.urlopen(f"http://{admin}/healthz", timeout=2)
    except urllib.error.HTTPError as e:
        print("healthz", e.code, e.read().decode(), "at", round(time.time()-t0,1)); break
for h in hogs: h.terminate()
t = time.time()
urllib.request.urlopen(urllib.request.Request(f"http://{admin}/drain", method="POST", data=b""), timeout=2)
try: rc = p.wait(timeout=40)
except subprocess.TimeoutExpired: rc = "none"; p.kill()
print("POST /drain -> exit", round(time.time()-t, 2), "s, status", rc)
for l in open(d + "/log"):
    if '"ERROR"' in l or '"WARN"' in l:
        j = json.loads(l); print("  ", j["level"], j["fields"].get("message"), j["fields"].get("shard", ""), j["fields"].get("thread", ""))
