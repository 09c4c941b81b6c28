"""Consistency checks of the rendered Kubernetes manifests against the
switchyard config they carry (run by scripts/deploy-check.sh after the schema
validation; needs PyYAML, from the kubernetes-validate environment).

    manifests.py RENDERED.yaml SCALEDOBJECTS_OUT.json

Checks what no schema knows: every enabled destination has a sink Deployment
and no sink runs for one that is not enabled (the router would route events
nobody delivers); each consumer role's ScaledObject watches the consumer
group and topic switchyard really uses and stops at the partition count;
every ${VAR} in the config is a key of the Secret the pods load; probes,
ports, static membership, resources, security context and grace period.
Writes the ScaledObjects as JSON for the KEDA schema check.
"""

import json
import re
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
# The Kafka scaler's metadata keys (KEDA docs, scalers/apache-kafka, 2.17).
KAFKA_SCALER_KEYS = {
    "bootstrapServers", "consumerGroup", "topic", "lagThreshold",
    "activationLagThreshold", "offsetResetPolicy", "allowIdleConsumers",
    "scaleToZeroOnInvalidOffset", "excludePersistentLag", "limitToPartitionsWithLag",
    "ensureEvenDistributionOfPartitions", "version", "partitionLimitation", "sasl",
    "saslTokenProvider", "tls", "unsafeSsl", "awsRegion",
}
ENV_REF = re.compile(r"\$\{([^}]*)\}")

problems = []


def problem(where, message):
    problems.append(f"{where}: {message}")


def shutdown_deadline_secs():
    """SHUTDOWN_DEADLINE in src/run.rs: the grace period must outlast it."""
    text = (ROOT / "src/run.rs").read_text()
    m = re.search(r"SHUTDOWN_DEADLINE: Duration = Duration::from_secs\((\d+)\)", text)
    if not m:
        problem("src/run.rs", "SHUTDOWN_DEADLINE not found; update scripts/deploy-check/manifests.py")
        return 30
    return int(m.group(1))


def env_refs(value, out):
    if isinstance(value, str):
        out.update(ENV_REF.findall(value))
    elif isinstance(value, dict):
        for v in value.values():
            env_refs(v, out)
    elif isinstance(value, list):
        for v in value:
            env_refs(v, out)
    return out


def port_of(addr):
    return int(addr.rsplit(":", 1)[1])


def flag(args, name):
    """The values of --name=V / --name V in a container's args."""
    out = []
    for i, a in enumerate(args):
        if a.startswith(f"--{name}="):
            out.append(a.split("=", 1)[1])
        elif a == f"--{name}" and i + 1 < len(args):
            out.append(args[i + 1])
    return out


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def main(rendered, keda_out):
    docs = [d for d in yaml.safe_load_all(Path(rendered).read_text()) if d]
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)

    maps = [c for c in by_kind.get("ConfigMap", []) if "switchyard.toml" in c.get("data", {})]
    if len(maps) != 1:
        problem("manifests", f"expected one ConfigMap with switchyard.toml, found {len(maps)}")
        return
    cmap = maps[0]
    cfg = tomllib.loads(cmap["data"]["switchyard.toml"])
    topics = cfg.get("topics", {})
    prefix = topics.get("prefix", "switchyard")
    canonical = topics.get("canonical", "events.canonical")
    partitions = topics.get("partitions", 6)
    brokers = cfg.get("kafka", {}).get("brokers")
    metrics_port = port_of(cfg.get("metrics", {}).get("listen", "127.0.0.1:9464"))
    ingest_port = port_of(cfg.get("ingest", {}).get("listen", "127.0.0.1:8080"))
    enabled = {n for n, d in cfg.get("destinations", {}).items() if d.get("enabled", True)}
    if not brokers:
        problem("switchyard.toml", "kafka.brokers is not set (the pods would start the embedded, non-durable broker)")
    if not metrics_port or cfg.get("metrics", {}).get("listen", "").startswith("127."):
        problem("switchyard.toml", "metrics.listen must listen on the pod IP (0.0.0.0) for probes and Prometheus")

    secrets = {s["metadata"]["name"]: set(s.get("stringData", {})) | set(s.get("data", {}))
               for s in by_kind.get("Secret", [])}
    needed = env_refs(cfg, set())

    scaled = {so["spec"]["scaleTargetRef"]["name"]: so for so in by_kind.get("ScaledObject", [])}
    pdbs = by_kind.get("PodDisruptionBudget", [])
    deadline = shutdown_deadline_secs()
    sinks, routers = {}, 0

    for dep in by_kind.get("Deployment", []):
        name = dep["metadata"]["name"]
        where = f"Deployment {name}"
        pod = dep["spec"]["template"]
        spec = pod["spec"]
        labels = pod["metadata"].get("labels", {})
        containers = [c for c in spec["containers"] if c["name"] == "switchyard"]
        if len(containers) != 1:
            problem(where, "needs exactly one container named switchyard")
            continue
        c = containers[0]
        args = c.get("args", [])
        if args[:1] != ["run"]:
            problem(where, f"args must start with `run`, got {args}")
        roles = flag(args, "role")
        role = roles[0] if len(roles) == 1 else None
        if role not in ("router", "ingest", "sink"):
            problem(where, f"needs one --role of router, ingest or sink (a Deployment per role), got {roles}")
            continue

        # Config: the ConfigMap mounted where --config points.
        config_path = (flag(args, "config") or [""])[0]
        mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        ok = any(v.get("configMap", {}).get("name") == cmap["metadata"]["name"]
                 and config_path == f"{mounts.get(n, '').rstrip('/')}/switchyard.toml"
                 for n, v in volumes.items())
        if not ok:
            problem(where, f"--config {config_path!r} is not switchyard.toml of ConfigMap {cmap['metadata']['name']} mounted there")

        # Secrets: every ${VAR} of the config, through envFrom.
        env = {e["name"]: e for e in c.get("env", [])}
        have = set(env)
        for ef in c.get("envFrom", []):
            ref = ef.get("secretRef", {}).get("name")
            if ref is not None:
                if ref not in secrets:
                    problem(where, f"envFrom names Secret {ref}, which is not in the manifests")
                have |= secrets.get(ref, set())
        for var in sorted(needed - have):
            problem(where, f"config needs ${{{var}}}, but no env var or Secret key gives it (switchyard would refuse to start)")

        # Static membership from the pod name.
        inst = env.get("SWITCHYARD_INSTANCE_ID", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        if inst != "metadata.name":
            problem(where, "SWITCHYARD_INSTANCE_ID must come from the pod name (fieldRef metadata.name)")

        # Probes on the metrics listener.
        ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = c.get(probe, {}).get("httpGet", {})
            port = ports.get(get.get("port"), get.get("port"))
            if get.get("path") != path or port != metrics_port:
                problem(where, f"{probe} must GET {path} on the metrics port {metrics_port}, got {get}")
        res = c.get("resources", {})
        for kind in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in res.get(kind, {}):
                    problem(where, f"resources.{kind}.{r} is missing")
        psc, csc = spec.get("securityContext", {}), c.get("securityContext", {})
        if not (psc.get("runAsNonRoot") or csc.get("runAsNonRoot")):
            problem(where, "runAsNonRoot is not set")
        if csc.get("allowPrivilegeEscalation") is not False or csc.get("readOnlyRootFilesystem") is not True:
            problem(where, "container must set allowPrivilegeEscalation: false and readOnlyRootFilesystem: true")
        grace = spec.get("terminationGracePeriodSeconds", 30)
        if grace < deadline + 15:
            problem(where, f"terminationGracePeriodSeconds {grace} leaves no room after the {deadline} s shutdown deadline and the producer flush (want >= {deadline + 15})")
        if not any(selects(p["spec"]["selector"], labels) for p in pdbs):
            problem(where, "no PodDisruptionBudget selects its pods")

        if role == "ingest":
            if ports.get("http") != ingest_port:
                problem(where, f"port `http` must be ingest.listen's {ingest_port}")
            if not any(selects({"matchLabels": s["spec"].get("selector", {})}, labels)
                       and any(p.get("targetPort") in ("http", ingest_port) for p in s["spec"]["ports"])
                       for s in by_kind.get("Service", [])):
                problem(where, "no Service sends to its `http` port")
            continue

        # Consumer roles: one group each, scaled by KEDA on that group's lag.
        if role == "router":
            routers += 1
            group, topic = f"{prefix}-router", canonical
        else:
            dests = flag(args, "destination")
            if len(dests) != 1:
                problem(where, f"a sink Deployment runs exactly one --destination, got {dests}")
                continue
            dest = dests[0]
            if dest in sinks:
                problem(where, f"destination {dest} already has sink Deployment {sinks[dest]}")
            sinks[dest] = name
            group, topic = f"{prefix}-sink-{dest}", f"{prefix}.deliver.{dest}"
        if "replicas" in dep["spec"] and name in scaled:
            problem(where, "sets spec.replicas, which every apply would reset under the ScaledObject")
        so = scaled.get(name)
        if so is None:
            problem(where, "no ScaledObject scales it")
            continue
        where = f"ScaledObject {so['metadata']['name']}"
        s = so["spec"]
        if s.get("maxReplicaCount") != partitions:
            problem(where, f"maxReplicaCount {s.get('maxReplicaCount')} is not topics.partitions {partitions}")
        if s.get("minReplicaCount", 0) < 1:
            problem(where, "minReplicaCount must be at least 1 (KEDA cannot see lag of a group that never committed)")
        kafka = [t for t in s.get("triggers", []) if t.get("type") == "kafka"]
        if len(kafka) != 1:
            problem(where, "needs one trigger of type kafka")
            continue
        md = kafka[0].get("metadata", {})
        for k in sorted(set(md) - KAFKA_SCALER_KEYS):
            problem(where, f"unknown kafka scaler metadata key {k}")
        want = {"bootstrapServers": brokers, "consumerGroup": group, "topic": topic,
                "offsetResetPolicy": "earliest"}
        for k, v in want.items():
            if md.get(k) != v:
                problem(where, f"metadata.{k} is {md.get(k)!r}, switchyard uses {v!r}")
        if not str(md.get("lagThreshold", "")).isdigit():
            problem(where, "metadata.lagThreshold must be a whole number (as a string)")

    if routers != 1:
        problem("manifests", f"expected one router Deployment, found {routers}")
    for d in sorted(enabled - set(sinks)):
        problem("manifests", f"destination {d} is enabled in switchyard.toml but no sink Deployment runs it: the router would route its events and nothing would deliver them")
    for d in sorted(set(sinks) - enabled):
        problem("manifests", f"sink Deployment {sinks[d]} runs destination {d}, which switchyard.toml does not enable")
    for target in sorted(set(scaled) - {d["metadata"]["name"] for d in by_kind.get("Deployment", [])}):
        problem("manifests", f"ScaledObject targets {target}, which is not a Deployment here")

    Path(keda_out).write_text(json.dumps(by_kind.get("ScaledObject", [])))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    for p in problems:
        print(f"deploy-check: {sys.argv[1]}: {p}", file=sys.stderr)
    sys.exit(1 if problems else 0)
