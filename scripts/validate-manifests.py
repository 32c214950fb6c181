#!/usr/bin/env python3
"""Checks every built-in object in manifests/ and examples/ against the Kubernetes API
schemas of the version we install on (kubernetes-validate, strict: unknown fields are
errors). Files a kustomization uses as patches are partial objects and are skipped; our
own kinds (HSMDevice, HSMSecret) are checked against the CRD by the Rust tests.

Usage: scripts/validate-manifests.py [KUBERNETES_VERSION]   (default 1.36)
"""

import pathlib
import sys

import kubernetes_validate
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUR_GROUP = "hsmsecrets.io/"


def patch_files():
    patches = set()
    for kustomization in ROOT.glob("manifests/**/kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text()) or {}
        for patch in spec.get("patches", []) + spec.get("patchesStrategicMerge", []):
            path = patch.get("path") if isinstance(patch, dict) else patch
            if path:
                patches.add((kustomization.parent / path).resolve())
    return patches


def main():
    version = sys.argv[1] if len(sys.argv) > 1 else "1.36"
    skip = patch_files()
    files = sorted(
        p
        for p in list(ROOT.glob("manifests/**/*.yaml")) + list(ROOT.glob("examples/*.yaml"))
        if p.name != "kustomization.yaml" and p.resolve() not in skip
    )
    checked = failed = 0
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            if str(doc.get("apiVersion", "")).startswith(OUR_GROUP):
                continue
            what = f"{path.relative_to(ROOT)}: {doc.get('kind')} {doc.get('metadata', {}).get('name')}"
            try:
                kubernetes_validate.validate(doc, version, strict=True)
                checked += 1
            except kubernetes_validate.ValidationError as e:
                failed += 1
                print(f"FAIL {what}: {e.message} at {'.'.join(map(str, e.path))}")
            except Exception as e:  # a missing schema is a failure too: nothing was checked
                failed += 1
                print(f"FAIL {what}: {e}")
    print(f"kubernetes-validate {version}: {checked} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
