#!/usr/bin/env python3
"""docs/api.yaml and the management API's routes are the same: api_doc_test.py FERRY API_YAML.

The routes come from the server's own table (`ferry debug api-routes`); the document must be
OpenAPI 3 and list exactly those (METHOD, PATH) pairs, each with a summary and responses."""
import subprocess
import sys

import yaml

ferry, doc_path = sys.argv[1], sys.argv[2]
out = subprocess.run([ferry, "debug", "api-routes"], capture_output=True, text=True, check=True).stdout
served = {tuple(line.split(" ", 1)) for line in out.splitlines() if line.strip()}
with open(doc_path) as f:
    doc = yaml.safe_load(f)
ok = str(doc.get("openapi", "")).startswith("3.")
documented = set()
for path, item in doc.get("paths", {}).items():
    for method, op in item.items():
        if method in ("get", "post", "put", "delete", "patch"):
            documented.add((method.upper(), path))
            if not op.get("summary") or not op.get("responses"):
                print(f"{method.upper()} {path}: no summary or responses in {doc_path}")
                ok = False
for m, p in sorted(served - documented):
    print(f"served but not in {doc_path}: {m} {p}")
for m, p in sorted(documented - served):
    print(f"in {doc_path} but not served: {m} {p}")
ok = ok and served == documented and len(served) > 0
print(f"{len(served)} routes served, {len(documented)} documented: {'same' if ok else 'DIFFERENT'}")
sys.exit(0 if ok else 1)
