"""The OpenAPI document over real HTTP: `/docs` renders it, every field of every schema, every parameter and
every form field has a description and an example, and every problem type is listed with its status."""

from __future__ import annotations

from typing import Any

import httpx
from service_harness import Stack

from service.problems import PROBLEMS


def referenced_object(prop: dict[str, Any], schemas: dict[str, Any]) -> bool:
    """Whether a property is (a nullable or a list of) another object schema, whose own fields carry the
    examples."""
    for variant in [prop, *prop.get("anyOf", [])]:
        target = variant.get("items", variant).get("$ref")
        if target and "properties" in schemas[target.rsplit("/", 1)[-1]]:
            return True
    return False


def test_docs_render_and_every_field_is_described_with_an_example(stack: Stack) -> None:
    docs = httpx.get(f"{stack.url}/docs")
    assert docs.status_code == 200 and "swagger-ui" in docs.text and "/openapi.json" in docs.text
    spec = httpx.get(f"{stack.url}/openapi.json").json()
    schemas = spec["components"]["schemas"]
    lacking = []
    for name, schema in schemas.items():
        for field, prop in schema.get("properties", {}).items():
            if "description" not in prop:
                lacking.append(f"{name}.{field}: description")
            if "examples" not in prop and not referenced_object(prop, schemas):
                lacking.append(f"{name}.{field}: example")
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for parameter in operation.get("parameters", []):
                if "description" not in parameter or "examples" not in parameter["schema"]:
                    lacking.append(f"{method} {path} {parameter['name']}")
            for media, content in operation.get("requestBody", {}).get("content", {}).items():
                for field, prop in content["schema"].get("properties", {}).items():
                    if "description" not in prop or ("examples" not in prop and prop.get("format") != "binary"):
                        lacking.append(f"{method} {path} {media} {field}")
    assert not lacking, lacking
    assert {"Job", "JobPage", "ProblemDetails", "ServiceInfo"} <= set(schemas)
    assert len(spec["paths"]) >= 8


def test_every_problem_type_is_listed_with_its_status(stack: Stack) -> None:
    description = httpx.get(f"{stack.url}/openapi.json").json()["info"]["description"]
    rows = {line.split("|")[1].strip(" `"): line.split("|")[2].strip() for line in description.splitlines()
            if line.startswith("| `urn:")}  # fmt: skip
    assert rows == {problem.uri: str(problem.status) for problem in PROBLEMS.values()}
