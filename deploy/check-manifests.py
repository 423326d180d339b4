#!/usr/bin/env python3
"""Check that deploy/ is self-consistent: the YAML parses, the Agones fields use values the
Agones schema accepts, and the numbers that must agree across files do (shards = CPUs, seats =
shards x connections, drain grace < termination grace, autoscaler bounds, dashboard JSON).

    python3 deploy/check-manifests.py      # needs PyYAML (pip install pyyaml)

It does not talk to a cluster; `kubectl apply --dry-run=server` against a cluster with Agones
installed is the complete check.
"""

import json
import pathlib
import sys

import yaml

DEPLOY = pathlib.Path(__file__).resolve().parent
problems = []


def check(cond, what):
    if not cond:
        problems.append(what)


def load(rel):
    docs = list(yaml.safe_load_all((DEPLOY / rel).read_text()))
    check(len(docs) == 1, f"{rel}: expected one document, found {len(docs)}")
    return docs[0]


def env_of(container):
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def port_of(addr):
    return int(addr.rsplit(":", 1)[1])


def cpu_cores(q):
    q = str(q)
    return int(q[:-1]) / 1000 if q.endswith("m") else float(q)


fleet = load("agones/fleet.yaml")
fas = load("agones/fleetautoscaler.yaml")
gsa = load("agones/allocation.yaml")
load("agones/networkpolicy.yaml")
load("prometheus/podmonitor.yaml")

# Fleet: fields and enums as in the Agones reference (agones.dev/v1).
check(fleet["apiVersion"] == "agones.dev/v1" and fleet["kind"] == "Fleet", "fleet: kind")
check(fleet["spec"].get("scheduling") in ("Packed", "Distributed"), "fleet: scheduling")
for p in fleet["spec"].get("priorities", []):
    check(p["type"] in ("Counter", "List"), f"fleet priority type {p['type']}")
    check(p["order"] in ("Ascending", "Descending"), f"fleet priority order {p['order']}")
gs = fleet["spec"]["template"]["spec"]
pod = gs["template"]["spec"]
containers = {c["name"]: c for c in pod["containers"]}
check(gs["container"] in containers, "fleet: spec.container names no container")
for p in gs["ports"]:
    check(p["portPolicy"] in ("Dynamic", "Static", "Passthrough"), f"port policy {p['portPolicy']}")
    check(p["protocol"] in ("UDP", "TCP", "TCPUDP"), f"port protocol {p['protocol']}")
    check(p.get("container", gs["container"]) in containers, f"port {p['name']}: container")
health = gs["health"]
for k in ("initialDelaySeconds", "periodSeconds", "failureThreshold"):
    check(isinstance(health[k], int) and health[k] >= 0, f"health.{k}")
# The server sends Health every 2 s: a period must hold at least two pings.
check(health["periodSeconds"] >= 4, "health.periodSeconds < 2 x the 2 s Health interval")
for key, c in gs["counters"].items():
    check(isinstance(c["count"], int) and isinstance(c["capacity"], int), f"counter {key}")
for key, lst in gs["lists"].items():
    check(lst["capacity"] <= 1000, f"list {key}: capacity above the Agones maximum of 1000")
    check(isinstance(lst.get("values", []), list), f"list {key}: values")
for key in ("players", "rooms"):
    check(key in gs["counters"], f"fleet: counter {key} missing")
check("rooms" in gs["lists"], "fleet: list rooms missing")

# The game container and the numbers that must agree.
ts = containers[gs["container"]]
env = env_of(ts)
shards = int(env["TICKSHARD_SHARDS"])
req, lim = ts["resources"]["requests"], ts["resources"]["limits"]
check(cpu_cores(req["cpu"]) == shards, "CPU request != TICKSHARD_SHARDS")
check(req == lim, "requests != limits (not Guaranteed QoS)")
game = next(p for p in gs["ports"] if p["name"] == "game")
check(game["containerPort"] == port_of(env["TICKSHARD_LISTEN"]), "game port != TICKSHARD_LISTEN")
check(game["protocol"] == "UDP", "game port is not UDP")
admin_port = port_of(env["TICKSHARD_ADMIN"])
check(not any(p["containerPort"] == admin_port for p in gs["ports"]),
      "admin port is published through Agones (host port)")
admin = next(p for p in ts["ports"] if p["name"] == "admin")
check(admin["containerPort"] == admin_port and "hostPort" not in admin, "admin container port")
probe_port = port_of(env["TICKSHARD_PROBE"])
check(not any(p["containerPort"] == probe_port for p in gs["ports"]),
      "probe port is published through Agones (host port)")
probe_decl = next(p for p in ts["ports"] if p["name"] == "probe")
check(probe_decl["containerPort"] == probe_port and "hostPort" not in probe_decl,
      "probe container port")
for probe in ("livenessProbe", "readinessProbe"):
    check(ts[probe]["httpGet"]["port"] == "probe", f"{probe} not on the probe port")
check(pod["terminationGracePeriodSeconds"] > int(env["TICKSHARD_DRAIN_GRACE"]),
      "terminationGracePeriodSeconds <= TICKSHARD_DRAIN_GRACE")
seats = shards * int(env["TICKSHARD_MAX_CONNECTIONS"])
check(gs["counters"]["players"]["capacity"] == seats, "players capacity != shards x connections")
rooms = seats // int(env["TICKSHARD_ROOM_CAPACITY"])
check(gs["counters"]["rooms"]["capacity"] == rooms, "rooms capacity != seats / room capacity")
check(gs["lists"]["rooms"]["capacity"] == rooms, "rooms list capacity != rooms counter capacity")
check("TICKSHARD_ADMIN_TOKEN" in env and env["TICKSHARD_ADMIN_TOKEN"] is None,
      "admin token must come from a Secret")

# FleetAutoscaler: Counter policy rules from the Agones reference.
check(fas["apiVersion"] == "autoscaling.agones.dev/v1", "autoscaler apiVersion")
check(fas["spec"]["fleetName"] == fleet["metadata"]["name"], "autoscaler fleetName")
pol = fas["spec"]["policy"]
check(pol["type"] == "Counter", "autoscaler policy type")
c = pol["counter"]
check(c["key"] in gs["counters"], "autoscaler key is not a Fleet counter")
check(isinstance(c["bufferSize"], int) and c["bufferSize"] > 0, "bufferSize")
check(c["minCapacity"] >= c["bufferSize"], "minCapacity < bufferSize")
check(c["minCapacity"] < c["maxCapacity"], "minCapacity >= maxCapacity")
check(c["maxCapacity"] >= c["bufferSize"], "maxCapacity < bufferSize")

# GameServerAllocation: the selectors name the Fleet and real counters.
check(gsa["apiVersion"] == "allocation.agones.dev/v1", "allocation apiVersion")
for s in gsa["spec"]["selectors"]:
    check(s["matchLabels"]["agones.dev/fleet"] == fleet["metadata"]["name"], "selector fleet")
    check(s.get("gameServerState", "Ready") in ("Ready", "Allocated"), "gameServerState")
    for key in s.get("counters", {}):
        check(key in gs["counters"], f"allocation counter {key} not in the Fleet")

# The dashboard is valid JSON and asks only for tickshard metrics.
dash = json.loads((DEPLOY / "grafana/tickshard-dashboard.json").read_text())
exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
check(exprs and all("tickshard_" in e for e in exprs), "dashboard: a query without tickshard_")

if problems:
    print("deploy/ check failed:", *problems, sep="\n  ")
    sys.exit(1)
print("deploy/ manifests consistent")
