#!/usr/bin/env python3
"""Evaluate deploy/admission-policy.yaml's CEL on sample pods, without an API server.

    python3 -m venv /tmp/celvenv && /tmp/celvenv/bin/pip install cel-python pyyaml
    /tmp/celvenv/bin/python deploy/check-admission-policy.py

cel-python (a pure-Python CEL) stands in for the API server's cel-go: the Kubernetes strings extension's
split/join are supplied below, and the API server's type checking and cost limits are not reproduced, so
confirm on a cluster once with `kubectl apply --dry-run=server -f deploy/admission-policy.yaml`.
Exits non-zero if a case disagrees. tests/it/admission.rs runs it when cel-python is importable (it says how
to get it otherwise); cel-python is no dependency of the project.
"""
import os
import sys

import celpy
import yaml
from celpy import celtypes

POLICY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "admission-policy.yaml")
GOOD = "reg.example/platform/committer@sha256:" + "a" * 64
SUBST = {
    "${COMMITTER_IMAGE}": "reg.example/platform/committer",
    "${IMAGE_DIGEST}": "sha256:" + "a" * 64,
    "${COMMITTER_NAMESPACE}": "committer-system",
}


def fill(expr):
    for k, v in SUBST.items():
        expr = expr.replace(k, v)
    return expr


# The Kubernetes CEL strings extension, which cel-python lacks.
def split(s, sep):
    return celtypes.ListType([celtypes.StringType(x) for x in str(s).split(str(sep))])


def join(items, sep=celtypes.StringType("")):
    return celtypes.StringType(str(sep).join(str(x) for x in items))


# The Kubernetes lists library's indexOf and the strings extension's substring.
def index_of(items, x):
    if isinstance(items, str):
        return celtypes.IntType(str(items).find(str(x)))
    for i, y in enumerate(items):
        if y == x:
            return celtypes.IntType(i)
    return celtypes.IntType(-1)


def substring(s, start, end=None):
    s = str(s)
    return celtypes.StringType(s[int(start):] if end is None else s[int(start):int(end)])


ENV = celpy.Environment()


def evaluate(expr, activation):
    program = ENV.program(ENV.compile(fill(expr)), functions={"split": split, "join": join, "indexOf": index_of, "substring": substring})
    return program.evaluate(activation)


def admit(spec, pod, namespace):
    """Returns (the containerd hostPaths found, [(validation passed, message)])."""
    act = {"object": celpy.json_to_cel(pod), "request": celpy.json_to_cel({"namespace": namespace})}
    variables = {}
    for v in spec["variables"]:
        act["variables"] = celtypes.MapType({celtypes.StringType(k): x for k, x in variables.items()})
        variables[v["name"]] = evaluate(v["expression"], act)
    act["variables"] = celtypes.MapType({celtypes.StringType(k): x for k, x in variables.items()})
    results = []
    for val in spec["validations"]:
        ok = bool(evaluate(val["expression"], act))
        results.append((ok, "" if ok else str(evaluate(val["messageExpression"], act))))
    return [str(p) for p in variables["containerdPaths"]], results


COMMIT = ["commit", "--pod", "default/sandbox", "--image", "reg.example/snap:v1"]


def pod(paths, images, ephemeral=None, init=None, command=None, args=COMMIT, env=None, readonly=False):
    """Every hostPath is mounted at its own path in every container (read-only with `readonly`), the emptyDir
    at /tmp."""
    def container(name, image):
        c = {"name": name, "image": image}
        if command is not None:
            c["command"] = command
        if args is not None:
            c["args"] = args
        if env is not None:
            c["env"] = env
        c["volumeMounts"] = [dict({"name": f"v{i}", "mountPath": p}, **({"readOnly": True} if readonly else {}))
                             for i, p in enumerate(paths)] + [
            {"name": "scratch", "mountPath": "/tmp"}
        ]
        return c

    spec = {
        "containers": [container(f"c{i}", im) for i, im in enumerate(images)],
        "volumes": [{"name": f"v{i}", "hostPath": {"path": p}} for i, p in enumerate(paths)]
        + [{"name": "scratch", "emptyDir": {}}],
    }
    if ephemeral:
        spec["ephemeralContainers"] = [container("debug", ephemeral)]
    if init:
        spec["initContainers"] = [container("init", init)]
    return {"spec": spec}


def job_pod():
    """deploy/commit-job.yaml filled with sample values: its pod template."""
    values = dict(SUBST, **{
        "${JOB_NAMESPACE}": "committer-system", "${JOB_NAME}": "commit-1", "${NODE}": "node-1",
        "${POD_NAMESPACE}": "default", "${POD_NAME}": "sandbox", "${CONTAINER_NAME}": "main",
        "${PUSH_SECRET}": "push", "${TARGET}": "reg.example/snap:v1",
    })
    with open(os.path.join(os.path.dirname(POLICY), "commit-job.yaml")) as f:
        text = f.read()
    for k, v in values.items():
        text = text.replace(k, v)
    return {"spec": yaml.safe_load(text)["spec"]["template"]["spec"]}


SOCK = "/run/containerd/containerd.sock"
# deploy/commit-job.yaml's args (its file flags: a Secret and the termination log).
JOB_ARGS = COMMIT + [
    "--registry-config", "/var/run/secrets/committer/registry/config.json",
    "--result-file", "/dev/termination-log",
    "--address", SOCK,
]
SNAPS = "/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs"
# name, pod, namespace, [image rule passes, namespace rule passes, command rule passes, file flags rule passes]
CASES = [
    ("the commit Job", pod([SOCK, SNAPS], [GOOD]), "committer-system", [True, True, True, True]),
    ("the Job repeating the entrypoint", pod([SOCK], [GOOD], command=["/committer"]), "committer-system", [True, True, True, True]),
    ("the Job in another namespace", pod([SOCK], [GOOD]), "default", [True, False, True, True]),
    ("another image with the socket", pod([SOCK], ["busybox"]), "committer-system", [False, True, True, True]),
    ("the committer by tag", pod([SOCK], ["reg.example/platform/committer:0.1.0"]), "committer-system", [False, True, True, True]),
    ("hostPath /", pod(["/"], ["busybox"]), "default", [False, False, True, True]),
    ("hostPath //run//containerd/./", pod(["//run//containerd/./"], ["busybox"]), "default", [False, False, True, True]),
    ("hostPath /var/run", pod(["/var/run"], ["busybox"]), "default", [False, False, True, True]),
    ("hostPath /run/", pod(["/run/"], ["busybox"]), "default", [False, False, True, True]),
    ("hostPath /var (holds /var/lib/containerd)", pod(["/var"], ["busybox"]), "default", [False, False, True, True]),
    ("hostPath /proc/1/root (the host's /)", pod(["/proc/1/root"], ["busybox"]), "default", [False, False, True, True]),
    ("hostPath /proc/self/root/run/containerd", pod(["/proc/self/root/run/containerd"], ["busybox"]), "default", [False, False, True, True]),
    ("hostPath /proc//1/./cwd", pod(["/proc//1/./cwd"], ["busybox"]), "default", [False, False, True, True]),
    ("hostPath /proc/1/root, by the committer", pod(["/proc/1/root"], [GOOD]), "committer-system", [True, True, True, True]),
    ("unrelated hostPaths", pod(["/var/log", "/run/containerd-other", "/etc/ssl", "/procfs"], ["busybox"]), "default", [True, True, True, True]),
    ("no volumes", {"spec": {"containers": [{"name": "c", "image": "busybox"}]}}, "default", [True, True, True, True]),
    ("an ephemeral debug container", pod([SOCK], [GOOD], ephemeral="busybox"), "committer-system", [False, True, True, True]),
    ("an init container", pod(["/run/containerd"], [GOOD], init="busybox"), "committer-system", [False, True, True, True]),
    ("the committer with another command", pod([SOCK], [GOOD], command=["/bin/sh", "-c"]), "committer-system", [True, True, False, True]),
    ("the committer told to diff into a file", pod([SOCK], [GOOD], args=["diff", "--output", "/host/x"]), "committer-system", [True, True, False, True]),
    ("the committer with no args", pod([SOCK], [GOOD], args=None), "committer-system", [True, True, False, True]),
    ("the committer with no args, no hostPath", pod([], [GOOD], args=None), "default", [True, True, True, True]),
    ("the Job's own file flags", pod([SOCK, SNAPS], [GOOD], args=JOB_ARGS), "committer-system", [True, True, True, True]),
    ("--spool-dir on the Job's emptyDir", pod([SOCK], [GOOD], args=COMMIT + ["--spool-dir=/tmp/spool"]), "committer-system", [True, True, True, True]),
    ("--result-file into the socket's directory", pod([SOCK], [GOOD], args=COMMIT + ["--result-file", "/run/containerd/containerd.sock/r"]), "committer-system", [True, True, True, False]),
    ("--spool-dir= into the snapshots", pod([SNAPS], [GOOD], args=COMMIT + ["--spool-dir=" + SNAPS + "/x"]), "committer-system", [True, True, True, False]),
    ("--spool-dir spelled //var/lib/containerd/./", pod(["/var/lib/containerd"], [GOOD], args=COMMIT + ["--spool-dir", "//var/lib/containerd/./"]), "committer-system", [True, True, True, False]),
    ("--registry-config through ..", pod([SOCK], [GOOD], args=COMMIT + ["--registry-config", "/tmp/../run/containerd/x"]), "committer-system", [True, True, True, False]),
    ("--registry-config relative", pod([SOCK], [GOOD], args=COMMIT + ["--registry-config", "run/containerd/x"]), "committer-system", [True, True, True, False]),
    ("--certs-dir under a mounted /proc/1/root", pod(["/proc/1/root"], [GOOD], args=COMMIT + ["--certs-dir", "/proc/1/root/etc"]), "committer-system", [True, True, True, False]),
    ("--certs-dir on a read-only certs.d mount", pod([SOCK, "/etc/containerd/certs.d"], [GOOD], readonly=True, args=COMMIT + ["--certs-dir", "/etc/containerd/certs.d"]), "committer-system", [True, True, True, True]),
    ("--registry-config on a read-only hostPath mount", pod([SOCK, "/etc/containerd/certs.d"], [GOOD], readonly=True, args=COMMIT + ["--registry-config", "/etc/containerd/certs.d/c.json"]), "committer-system", [True, True, True, False]),
    ("--result-file with no value", pod([SOCK], [GOOD], args=COMMIT + ["--result-file"]), "committer-system", [True, True, True, False]),
    ("TMPDIR inside a hostPath mount", pod(["/run/containerd"], [GOOD], env=[{"name": "TMPDIR", "value": "/run/containerd/tmp"}]), "committer-system", [True, True, True, False]),
    ("deploy/commit-job.yaml as shipped", job_pod(), "committer-system", [True, True, True, True]),
    ("TMPDIR on the emptyDir", pod([SOCK], [GOOD], env=[{"name": "TMPDIR", "value": "/tmp"}]), "committer-system", [True, True, True, True]),
]


def main():
    with open(POLICY) as f:
        spec = next(yaml.safe_load_all(f))["spec"]
    failed = 0
    for name, p, namespace, want in CASES:
        paths, results = admit(spec, p, namespace)
        got = [ok for ok, _ in results]
        failed += got != want
        print("ok " if got == want else "BAD", name, paths, got)
        for ok, message in results:
            if not ok:
                print("      ", message)
    print(f"{len(CASES) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
