#!/usr/bin/env python3
"""Evaluate deploy/admission-policy.yaml's CEL on sample pods, without an API server.

    python3 -m venv /tmp/celvenv && /tmp/celvenv/bin/pip install cel-python pyyaml
    /tmp/celvenv/bin/python deploy/check-admission-policy.py

cel-python (a pure-Python CEL) stands in for the API server's cel-go: the Kubernetes strings extension's
split/join are supplied below, and the API server's type checking and cost limits are not reproduced, so
confirm on a cluster once with `kubectl apply --dry-run=server -f deploy/admission-policy.yaml`.
Exits non-zero if a case disagrees. Not part of scripts/test.sh (cel-python is no dependency of the project).
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


ENV = celpy.Environment()


def evaluate(expr, activation):
    program = ENV.program(ENV.compile(fill(expr)), functions={"split": split, "join": join})
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


def pod(paths, images, ephemeral=None, init=None, command=None, args=COMMIT):
    def container(name, image):
        c = {"name": name, "image": image}
        if command is not None:
            c["command"] = command
        if args is not None:
            c["args"] = args
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


SOCK = "/run/containerd/containerd.sock"
SNAPS = "/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs"
# name, pod, namespace, [image rule passes, namespace rule passes, command rule passes]
CASES = [
    ("the commit Job", pod([SOCK, SNAPS], [GOOD]), "committer-system", [True, True, True]),
    ("the Job repeating the entrypoint", pod([SOCK], [GOOD], command=["/committer"]), "committer-system", [True, True, True]),
    ("the Job in another namespace", pod([SOCK], [GOOD]), "default", [True, False, True]),
    ("another image with the socket", pod([SOCK], ["busybox"]), "committer-system", [False, True, True]),
    ("the committer by tag", pod([SOCK], ["reg.example/platform/committer:0.1.0"]), "committer-system", [False, True, True]),
    ("hostPath /", pod(["/"], ["busybox"]), "default", [False, False, True]),
    ("hostPath //run//containerd/./", pod(["//run//containerd/./"], ["busybox"]), "default", [False, False, True]),
    ("hostPath /var/run", pod(["/var/run"], ["busybox"]), "default", [False, False, True]),
    ("hostPath /run/", pod(["/run/"], ["busybox"]), "default", [False, False, True]),
    ("hostPath /var (holds /var/lib/containerd)", pod(["/var"], ["busybox"]), "default", [False, False, True]),
    ("hostPath /proc/1/root (the host's /)", pod(["/proc/1/root"], ["busybox"]), "default", [False, False, True]),
    ("hostPath /proc/self/root/run/containerd", pod(["/proc/self/root/run/containerd"], ["busybox"]), "default", [False, False, True]),
    ("hostPath /proc//1/./cwd", pod(["/proc//1/./cwd"], ["busybox"]), "default", [False, False, True]),
    ("hostPath /proc/1/root, by the committer", pod(["/proc/1/root"], [GOOD]), "committer-system", [True, True, True]),
    ("unrelated hostPaths", pod(["/var/log", "/run/containerd-other", "/etc/ssl", "/procfs"], ["busybox"]), "default", [True, True, True]),
    ("no volumes", {"spec": {"containers": [{"name": "c", "image": "busybox"}]}}, "default", [True, True, True]),
    ("an ephemeral debug container", pod([SOCK], [GOOD], ephemeral="busybox"), "committer-system", [False, True, True]),
    ("an init container", pod(["/run/containerd"], [GOOD], init="busybox"), "committer-system", [False, True, True]),
    ("the committer with another command", pod([SOCK], [GOOD], command=["/bin/sh", "-c"]), "committer-system", [True, True, False]),
    ("the committer told to diff into a file", pod([SOCK], [GOOD], args=["diff", "--output", "/host/x"]), "committer-system", [True, True, False]),
    ("the committer with no args", pod([SOCK], [GOOD], args=None), "committer-system", [True, True, False]),
    ("the committer with no args, no hostPath", pod([], [GOOD], args=None), "default", [True, True, True]),
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
