#!/usr/bin/env python3
"""Checks the rendered overlays for what the schema cannot see: the promises the README makes.

Reads `kubectl kustomize` output for one overlay on stdin; `--nodes N` is the node count it must have.
Every container runs as non-root with a read-only root filesystem and no capabilities, has probes on the
health endpoints, requests and limits; nodes keep a quorum through disruptions and have time to drain.
"""

import argparse
import sys

import yaml

DRAIN_DEADLINE_SECS = 60


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--hpa", action="store_true", help="gateways must be scaled by a HorizontalPodAutoscaler")
    args = parser.parse_args()
    docs = [d for d in yaml.safe_load_all(sys.stdin) if d]
    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    problems = []

    def expect(condition, message):
        if not condition:
            problems.append(message)

    node = by_kind["StatefulSet"]["courier-node"]
    gateway = by_kind["Deployment"]["courier-gateway"]
    expect(node["spec"]["replicas"] == args.nodes, f"node replicas {node['spec']['replicas']} != {args.nodes}")
    expect(node["spec"]["podManagementPolicy"] == "Parallel", "nodes must start in parallel")
    expect(node["spec"]["serviceName"] == "courier-nodes", "StatefulSet must use the courier-nodes Service")
    expect(by_kind["Service"]["courier-nodes"]["spec"].get("clusterIP") == "None", "courier-nodes must be headless")
    expect(by_kind["Service"]["courier-nodes"]["spec"].get("publishNotReadyAddresses") is True,
           "courier-nodes must publish not-ready pods (peers resolve before they are ready)")
    expect(by_kind["Service"]["courier-device"]["spec"]["type"] == "LoadBalancer", "device Service must be a LoadBalancer")
    expect(node["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data", "nodes need a data PVC")
    grace = node["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    expect(grace > DRAIN_DEADLINE_SECS, f"node terminationGracePeriodSeconds {grace} leaves no room for a {DRAIN_DEADLINE_SECS}s drain")
    pdb = by_kind["PodDisruptionBudget"]["courier-node"]["spec"]
    voters = min(args.nodes, 5)
    allowed = pdb.get("maxUnavailable", args.nodes - pdb.get("minAvailable", 0))
    expect(voters - allowed >= voters // 2 + 1, f"node PDB allows {allowed} down of {voters} voters: quorum lost")
    if args.hpa:
        hpas = by_kind.get("HorizontalPodAutoscaler", {})
        expect(any(h["spec"]["scaleTargetRef"]["name"] == "courier-gateway" for h in hpas.values()), "no gateway HPA")
        expect("replicas" not in gateway["spec"], "an HPA-scaled Deployment must not set replicas")

    for workload in (node, gateway):
        pod = workload["spec"]["template"]["spec"]
        name = workload["metadata"]["name"]
        expect(pod["securityContext"].get("runAsNonRoot") is True, f"{name}: runAsNonRoot")
        expect(pod.get("automountServiceAccountToken") is False, f"{name}: no service account token")
        for container in pod["containers"]:
            where = f"{name}/{container['name']}"
            sc = container.get("securityContext", {})
            expect(sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem")
            expect(sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation")
            expect(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: drop ALL capabilities")
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    expect(resource in resources.get(kind, {}), f"{where}: {kind}.{resource}")
            expect(container["readinessProbe"]["httpGet"]["path"] == "/readyz", f"{where}: readiness on /readyz")
            expect(container["livenessProbe"]["httpGet"]["path"] == "/healthz", f"{where}: liveness on /healthz")

    for problem in problems:
        print(f"manifest check: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
