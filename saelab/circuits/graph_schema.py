"""Checking a graph JSON before anyone else reads it: Neuronpedia's field list as a JSON Schema, plus the
checks a schema cannot express (unique node ids, links between existing nodes, finite weights).

The schema (`schema/graph.schema.json`, draft 2020-12) is written from circuit-tracer's pydantic models
of the file (`circuit_tracer/frontend/graph_models.py`); a file it accepts loads in the viewer. Checking
needs the `jsonschema` package; without it only the structural checks below run.
"""

from __future__ import annotations

import json
import math
from functools import cache
from importlib import resources

from saelab.errors import GraphError

SCHEMA_FILE = "graph.schema.json"
_MAX_REPORTED = 5
_NODE_NUMBERS = ("influence", "activation", "token_prob")


@cache
def graph_schema() -> dict:
    """The JSON Schema of Neuronpedia's graph JSON, as shipped in the package."""
    text = resources.files("saelab.circuits").joinpath("schema", SCHEMA_FILE).read_text(encoding="utf-8")
    return json.loads(text)


def schema_available() -> bool:
    """Whether `jsonschema` is installed (it is a test dependency; the CLI works without it)."""
    try:
        import jsonschema  # noqa: F401
    except ImportError:
        return False
    return True


def schema_errors(document) -> list[str]:
    """Every schema violation of `document`, each as "where: what", sorted by location."""
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(graph_schema())
    found = sorted(validator.iter_errors(document), key=lambda e: [str(p) for p in e.absolute_path])
    return [f"{_where(e.absolute_path)}: {e.message}" for e in found]


def _where(path) -> str:
    return "/".join(str(part) for part in path) or "(top level)"


def structure_errors(document) -> list[str]:
    """What a schema cannot say: node ids are unique, every link joins two nodes, positions are prompt
    tokens, numbers are finite (json.dumps writes NaN and Infinity, which browsers' JSON.parse refuses)."""
    if not isinstance(document, dict):
        return []
    nodes = [n for n in document.get("nodes") or [] if isinstance(n, dict)]
    links = [link for link in document.get("links") or [] if isinstance(link, dict)]
    n_tokens = len((document.get("metadata") or {}).get("prompt_tokens") or [])
    seen, errors = set(), []
    for i, node in enumerate(nodes):
        node_id = node.get("node_id")
        if node_id in seen:
            errors.append(f"nodes/{i}/node_id: the node id {node_id!r} appears more than once")
        seen.add(node_id)
        position = node.get("ctx_idx")
        if isinstance(position, int) and position >= n_tokens:  # the viewer labels nodes by prompt token
            errors.append(f"nodes/{i}/ctx_idx: {position} is past the {n_tokens} prompt tokens")
        for key in _NODE_NUMBERS:
            if isinstance(node.get(key), float) and not math.isfinite(node[key]):
                errors.append(f"nodes/{i}/{key}: {node[key]} is not a finite number")
    for i, link in enumerate(links):
        for end in ("source", "target"):
            if end in link and link[end] not in seen:
                errors.append(f"links/{i}/{end}: {link[end]!r} is not the id of any node")
        weight = link.get("weight")
        if isinstance(weight, float) and not math.isfinite(weight):
            errors.append(f"links/{i}/weight: {weight} is not a finite number")
    return errors


def graph_errors(document) -> list[str]:
    """Schema violations (when `jsonschema` is installed) and structural errors of a graph document."""
    errors = schema_errors(document) if schema_available() else []
    return errors + structure_errors(document)


def validate_graph(document) -> None:
    """Raise GraphError naming the first few problems when `document` is not a valid graph JSON."""
    errors = graph_errors(document)
    if errors:
        shown = "; ".join(errors[:_MAX_REPORTED])
        more = f" (and {len(errors) - _MAX_REPORTED} more)" if len(errors) > _MAX_REPORTED else ""
        raise GraphError(
            f"the graph JSON does not match Neuronpedia's graph format: {shown}{more}. The viewer would "
            "misread it; this is a bug in whatever wrote it."
        )
