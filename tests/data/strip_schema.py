"""Writes the test data under tests/data/ from upstream files: the openAPIV3Schema of a CRD, or a Helm
chart's values.schema.json, as compact JSON without `description` annotations (they are most of the size).

    python tests/data/strip_schema.py CRD.yaml > tests/data/crds/KIND.json
    python tests/data/strip_schema.py values.schema.json > tests/data/production-stack/values.schema.json

Sources, versions and licences: tests/data/crds/SOURCES.md, tests/data/production-stack/SOURCES.md.
"""

import json
import sys
from typing import Any

import yaml

_NAME_MAPS = {"properties", "patternProperties", "definitions", "$defs", "dependentSchemas"}


def strip(schema: Any) -> Any:
    """`schema` without `description` keywords; a property that happens to be named `description` stays."""
    if isinstance(schema, list):
        return [strip(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in _NAME_MAPS and isinstance(value, dict):
            out[key] = {name: strip(sub) for name, sub in value.items()}
        elif key != "description":
            out[key] = strip(value)
    return out


def schema_of(document: dict[str, Any]) -> dict[str, Any]:
    """The storage version's openAPIV3Schema of a CustomResourceDefinition; any other document as is."""
    if document.get("kind") != "CustomResourceDefinition":
        return document
    [version] = [v for v in document["spec"]["versions"] if v.get("storage")]
    return version["schema"]["openAPIV3Schema"]


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        document = yaml.safe_load(f)  # JSON is YAML too
    json.dump(strip(schema_of(document)), sys.stdout, separators=(",", ":"), sort_keys=True)
    sys.stdout.write("\n")
