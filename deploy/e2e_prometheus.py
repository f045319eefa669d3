#!/usr/bin/env python3
"""End-to-end check of Courier's monitoring: a real Prometheus scrapes a real cluster.

Starts three `courier node` processes and a `courier gateway` on loopback (port 0 everywhere), each with
only the PKI files its Kubernetes Secret holds; a real Prometheus server on loopback scraping them every
second with the shipped alert rules; a demo device; and pushes through the gateway. Then it checks, through
Prometheus's HTTP API, that the delivered-notification counter and the Raft leader series arrived, that
every query of the Grafana dashboard is valid PromQL, that every process's /metrics passes
`promtool check metrics`, and that killing a node fires CourierNodeDown. Everything it starts is stopped
when it ends, whatever happens; it gives up on any wait after a deadline and exits non-zero.

Usage: e2e_prometheus.py --courier PATH [--prometheus PATH] [--promtool PATH]
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

DEPLOY = Path(__file__).resolve().parent
RULES = DEPLOY / "prometheus" / "rules" / "courier.rules.yml"
DASHBOARD = DEPLOY / "grafana" / "courier.json"
# Exactly what the Secrets hold (README, "Deploying on Kubernetes").
NODE_SECRET_FILES = [
    "cluster-ca.pem",
    "device-ca.pem",
    "device-ca.key",
    "node-1.pem",
    "node-1.key",
    "node-2.pem",
    "node-2.key",
    "node-3.pem",
    "node-3.key",
    "token-keys.json",
    "provider.json",
]
GATEWAY_SECRET_FILES = ["cluster-ca.pem", "gateway.pem", "gateway.key"]
TOPIC = "com.example.e2e"
PUSHES = 5


class Failure(Exception):
    pass


def log(message):
    print(f"e2e: {message}", flush=True)


def wait_for(what, condition, timeout, interval=0.25):
    """Polls `condition` until it returns something truthy; raises Failure after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            result = condition()
            if result:
                return result
        except (OSError, urllib.error.URLError, ValueError, KeyError) as error:
            last_error = error
        time.sleep(interval)
    raise Failure(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_error})" if last_error else ""))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url, timeout=3):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.read().decode()


def status_of(url):
    try:
        return http_get(url)[0]
    except urllib.error.HTTPError as error:
        return error.code


class Processes:
    """Every child started, so that all of them are stopped at the end."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.children = {}

    def start(self, name, argv):
        out = open(self.workdir / f"{name}.out", "w")
        err = open(self.workdir / f"{name}.err", "w")
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True)
        lines = []
        ready = threading.Condition()

        def pump():
            for line in child.stdout:
                out.write(line)
                out.flush()
                with ready:
                    lines.append(line)
                    ready.notify_all()

        threading.Thread(target=pump, daemon=True).start()
        self.children[name] = (child, lines, ready)
        return child

    def json_line(self, name, event, timeout=30):
        """The first JSON line with {"event": event} that `name` printed."""
        child, lines, ready = self.children[name]
        deadline = time.monotonic() + timeout
        seen = 0
        with ready:
            while True:
                for line in lines[seen:]:
                    seen += 1
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue
                    if record.get("event") == event:
                        return record
                if child.poll() is not None:
                    raise Failure(f"{name} exited ({child.returncode}) before printing {event!r}; see {self.workdir}/{name}.err")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Failure(f"{name} printed no {event!r} line within {timeout}s")
                ready.wait(min(left, 0.5))

    def count_events(self, name, event):
        _, lines, ready = self.children[name]
        with ready:
            return sum(1 for line in lines if f'"event":"{event}"' in line.replace(" ", ""))

    def kill(self, name):
        child = self.children[name][0]
        child.send_signal(signal.SIGKILL)
        child.wait(10)

    def stop_all(self):
        for name, (child, _, _) in self.children.items():
            if child.poll() is None:
                child.terminate()
        for name, (child, _, _) in self.children.items():
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(5)


class Prometheus:
    def __init__(self, base):
        self.base = base

    def api(self, path, **params):
        url = f"{self.base}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            _, body = http_get(url)
        except urllib.error.HTTPError as error:
            body = error.read().decode()
        reply = json.loads(body)
        if reply.get("status") != "success":
            raise Failure(f"Prometheus refused {path} {params}: {reply.get('error')}")
        return reply["data"]

    def query(self, expr):
        return self.api("query", query=expr)["result"]


def dashboard_queries():
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"].replace("$__rate_interval", "1m").replace("$__interval", "15s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--courier", required=True)
    parser.add_argument("--prometheus", default=shutil.which("prometheus") or "prometheus")
    parser.add_argument("--promtool", default=shutil.which("promtool") or "promtool")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    courier = str(Path(args.courier).resolve())

    workdir = Path(tempfile.mkdtemp(prefix="courier-e2e-"))
    procs = Processes(workdir)
    checks = 0
    started = time.monotonic()
    try:
        pki = workdir / "pki"
        subprocess.run([courier, "pki", "init", "--dir", str(pki), "--nodes", "3"], check=True, capture_output=True)
        node_pki, gateway_pki = workdir / "node-pki", workdir / "gateway-pki"
        for target, files in ((node_pki, NODE_SECRET_FILES), (gateway_pki, GATEWAY_SECRET_FILES)):
            target.mkdir()
            for name in files:
                shutil.copy(pki / name, target / name)

        loopback = "127.0.0.1:0"
        nodes = {}
        for node_id in (1, 2, 3):
            argv = [courier, "node", "--node-id", str(node_id), "--pki-dir", str(node_pki),
                    "--data-dir", str(workdir / f"data-{node_id}"), "--device-addr", loopback,
                    "--cluster-addr", loopback, "--node-metrics-addr", loopback, "--open-enrolment"]
            if node_id > 1:
                argv += ["--join", nodes[1]["cluster_addr"]]
            procs.start(f"node-{node_id}", argv)
            nodes[node_id] = procs.json_line(f"node-{node_id}", "listening")
        procs.start("gateway", [courier, "gateway", "--pki-dir", str(gateway_pki),
                                "--node-addr", ",".join(n["cluster_addr"] for n in nodes.values()),
                                "--provider-addr", loopback, "--gateway-metrics-addr", loopback])
        gateway = procs.json_line("gateway", "listening")
        metrics = {f"node-{i}": n["metrics_addr"] for i, n in nodes.items()} | {"gateway": gateway["metrics_addr"]}
        for name, addr in metrics.items():
            wait_for(f"{name} /readyz", lambda addr=addr: status_of(f"http://{addr}/readyz") == 200, 30)
            if status_of(f"http://{addr}/healthz") != 200:
                raise Failure(f"{name} /healthz is not 200")
        checks += 1
        log(f"cluster ready: 3 nodes + gateway, every /readyz and /healthz answers 200 ({time.monotonic() - started:.1f}s)")

        port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {RULES}\n"
            "scrape_configs:\n"
            "  - job_name: courier-nodes\n    static_configs:\n"
            f"      - targets: {json.dumps([n['metrics_addr'] for n in nodes.values()])}\n"
            "  - job_name: courier-gateways\n    static_configs:\n"
            f"      - targets: {json.dumps([gateway['metrics_addr']])}\n"
        )
        procs.start("prometheus", [args.prometheus, f"--config.file={config}",
                                   f"--storage.tsdb.path={workdir / 'tsdb'}",
                                   f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"])
        base = f"http://127.0.0.1:{port}"
        wait_for("Prometheus /-/ready", lambda: status_of(f"{base}/-/ready") == 200, 30)
        prom = Prometheus(base)

        procs.start("device", [courier, "device", "--dir", str(pki), "--topic", TOPIC,
                               "--node", nodes[1]["device_addr"]])
        registered = procs.json_line("device", "registered")
        for n in range(PUSHES):
            sent = subprocess.run([courier, "send", "--dir", str(pki), "--topic", TOPIC,
                                   "--gateway", gateway["provider_addr"], "--token", registered["token"],
                                   json.dumps({"aps": {"alert": f"e2e {n}"}})],
                                  capture_output=True, text=True, timeout=30)
            if sent.returncode != 0:
                raise Failure(f"courier send failed: {sent.stdout} {sent.stderr}")
        wait_for(f"{PUSHES} notifications on the device",
                 lambda: procs.count_events("device", "notification") >= PUSHES, 20)
        checks += 1
        log(f"{PUSHES} pushes sent through the gateway and received by the device")

        for name, addr in metrics.items():
            _, text = http_get(f"http://{addr}/metrics")
            lint = subprocess.run([args.promtool, "check", "metrics"], input=text, capture_output=True, text=True)
            if lint.returncode != 0:
                raise Failure(f"promtool check metrics failed for {name}:\n{lint.stdout}{lint.stderr}")
        checks += 1
        log("promtool check metrics passes for every node's and the gateway's /metrics")

        def delivered():
            result = prom.query("sum(courier_node_notifications_delivered_total)")
            return result and float(result[0]["value"][1]) >= PUSHES

        wait_for("the delivered counter in Prometheus", delivered, 30)
        leaders = wait_for("courier_raft_leader_id from all three nodes",
                           lambda: (r := prom.query("courier_raft_leader_id >= 1")) and len(r) == 3 and r, 30)
        leader_ids = {r["value"][1] for r in leaders}
        if len(leader_ids) != 1:
            raise Failure(f"nodes disagree on the leader: {leaders}")
        # The gateway is scraped on its own schedule: its latest sample may predate the pushes by up to one
        # scrape interval even when the nodes' already shows them.
        def accepted():
            result = prom.query("sum(courier_gateway_notifications_accepted_total)")
            return result and float(result[0]["value"][1]) >= PUSHES

        wait_for("the gateway's accepted counter in Prometheus", accepted, 30)
        checks += 1
        log(f"Prometheus has courier_node_notifications_delivered_total >= {PUSHES} and the leader series "
            f"(leader {leader_ids.pop()} seen by all three nodes)")

        panels = 0
        for title, expr in dashboard_queries():
            prom.query(expr)
            panels += 1
        # Recording rules evaluate without error once they have run.
        groups = prom.api("rules")["groups"]
        bad = [r["name"] for g in groups for r in g["rules"] if r.get("health") == "err"]
        if bad:
            raise Failure(f"rules evaluating with errors: {bad}")
        checks += 1
        log(f"all {panels} dashboard queries are valid PromQL; {sum(len(g['rules']) for g in groups)} rules loaded, none in error")

        # Kill a follower: the leader marks it down after --failure-timeout-ms (3 s).
        leader_now = prom.query("courier_raft_is_leader == 1")
        leader_instance = leader_now[0]["metric"]["instance"] if leader_now else None
        victim = next(name for name, addr in metrics.items() if name.startswith("node-") and addr != leader_instance)
        procs.kill(victim)
        killed_at = time.monotonic()
        log(f"killed {victim} (SIGKILL); waiting for CourierNodeDown to fire")

        def firing(alertname):
            return [a for a in prom.api("alerts")["alerts"]
                    if a["labels"].get("alertname") == alertname and a["state"] == "firing"]

        alert = wait_for("CourierNodeDown firing", lambda: firing("CourierNodeDown"), 90, interval=1)
        if firing("CourierNoRaftLeader"):
            raise Failure("CourierNoRaftLeader fired although two of three nodes run")
        checks += 1
        log(f"CourierNodeDown fired {time.monotonic() - killed_at:.0f}s after the kill: {alert[0]['annotations']['summary']}")
        log(f"{checks} passed, 0 failed ({time.monotonic() - started:.0f}s)")
        return 0
    except (Failure, subprocess.SubprocessError, OSError) as error:
        log(f"FAILED: {error}")
        log(f"logs kept in {workdir}")
        args.keep = True
        return 1
    finally:
        procs.stop_all()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
