"""Write the PyTorchJob and JobSet JSON schemas in this folder from PyPI packages' models.

    python -m venv /tmp/gen && /tmp/gen/bin/pip install kubeflow-training==1.9.4 \\
        kubeflow-trainer-api==2.3.0 kubernetes-validate==1.37.0
    /tmp/gen/bin/python scripts/k8s/schemas/generate.py

Not run by the tests (they read the committed JSON). The custom resources' own fields come
from the packages' generated model classes (types, required fields, descriptions); every
Kubernetes built-in type they embed (PodTemplateSpec, JobTemplateSpec, ObjectMeta, ...) is a
``$ref`` into kubernetes-validate's OpenAPI definitions, resolved at validation time. What the
models do not carry and this script adds is listed in README.md beside it.
"""

from __future__ import annotations

import inspect
import json
import re
import typing
from pathlib import Path

import importlib_resources

HERE = Path(__file__).resolve().parent
K8S_DEFS = "https://kubernetes.io/api/_definitions.json"
K8S_VERSION = "1.31.0"  # which kubernetes-validate definitions names are checked against


def k8s_definitions() -> dict:
    root = importlib_resources.files("kubernetes_validate") / "kubernetes-json-schema"
    path = root / f"v{K8S_VERSION}-local-strict" / "_definitions.json"
    return json.loads(path.read_text())["$defs"]


DEFS = k8s_definitions()


def k8s_ref(name: str) -> dict:
    """$ref for a Kubernetes type: ``IoK8sApiCoreV1PodSpec`` (pydantic models),
    ``V1PodTemplateSpec`` (kubernetes client), ``K8sIoApiAutoscalingV2MetricSpec``, ``Quantity``."""
    if name == "Quantity":
        name = "IoK8sApimachineryPkgApiResourceQuantity"
    if name.startswith("K8sIoApi"):
        name = "IoK8sApi" + name[len("K8sIoApi"):]
    if name.startswith("IoK8s"):
        found = [k for k in DEFS if k.replace(".", "").lower() == name.lower()]
    else:
        m = re.fullmatch(r"(V\d+(?:alpha\d+|beta\d+)?)(\w+)", name)
        suffix = f".{m.group(1).lower()}.{m.group(2)}" if m else None
        found = [k for k in DEFS if suffix and k.endswith(suffix)]
    if len(found) != 1:
        raise KeyError(f"{name}: {len(found)} Kubernetes definitions match ({found[:4]})")
    return {"$ref": f"{K8S_DEFS}#/$defs/{found[0]}"}


def enum_from(description: str) -> list[str] | None:
    """Values a description lists: 'One of A, B and C.' / 'Valid values are A, B, C.'"""
    m = re.search(r"(?:One of|Valid values are) ([A-Za-z, ]+?)(?:\.| Default)", description)
    if not m:
        return None
    return [v for v in re.split(r",\s*|\s+and\s+", m.group(1).strip()) if v]


def pattern_from(description: str) -> str | None:
    m = re.search(r'must match the regular expression "(\^[^"]+\$)"', description)
    return m.group(1) if m else None


def annotate(schema: dict, description: str) -> dict:
    if description:
        schema = {**schema, "description": description}
        values = enum_from(description)
        if values and schema.get("type") == "string":
            schema["enum"] = values
        pattern = pattern_from(description)
        if pattern and schema.get("type") == "string":
            schema["pattern"] = pattern
    return schema


# ------------------------------------------------- kubeflow-training (swagger models)


def swagger_schema(type_name: str, defs: dict, models) -> dict:
    scalars = {"str": "string", "int": "integer", "bool": "boolean", "float": "number"}
    if type_name in scalars:
        return {"type": scalars[type_name]}
    if type_name == "object":
        return {}
    m = re.fullmatch(r"list\[(.+)\]", type_name)
    if m:
        return {"type": "array", "items": swagger_schema(m.group(1), defs, models)}
    m = re.fullmatch(r"dict\(str, (.+)\)", type_name)
    if m:
        return {"type": "object",
                "additionalProperties": swagger_schema(m.group(1), defs, models)}
    if type_name.startswith("KubeflowOrgV1") and hasattr(models, type_name):
        key = "kubeflow.org.v1." + type_name[len("KubeflowOrgV1"):]
        if key not in defs:
            defs[key] = {}  # placeholder against recursion
            defs[key] = swagger_model(getattr(models, type_name), defs, models)
        return {"$ref": f"#/$defs/{key}"}
    return k8s_ref(type_name)


def swagger_model(cls, defs: dict, models) -> dict:
    props, required = {}, []
    for attr, type_name in cls.openapi_types.items():
        json_name = cls.attribute_map[attr]
        prop = getattr(cls, attr)
        doc = inspect.getdoc(prop.fget) or ""
        lines = [ln for ln in doc.splitlines()[1:] if ln.strip() and not ln.startswith(":")]
        description = " ".join(ln.replace("# noqa: E501", "").strip() for ln in lines)
        props[json_name] = annotate(swagger_schema(type_name, defs, models), description)
        if "must not be `None`" in inspect.getsource(prop.fset):
            required.append(json_name)
    schema = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema


def pytorchjob_schema() -> dict:
    import kubeflow.training as kt
    from kubeflow.training import models

    defs: dict = {}
    spec = swagger_schema("KubeflowOrgV1PyTorchJobSpec", defs, models)
    return top_level("kubeflow.org/v1", "PyTorchJob", spec, defs, source={
        "package": "kubeflow-training", "version": kt.__version__,
        "models": "kubeflow.training.models.KubeflowOrgV1PyTorchJob and the classes it names",
    })


# ------------------------------------------------- kubeflow-trainer-api (pydantic models)


def pydantic_schema(annotation, defs: dict) -> dict:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return pydantic_schema(inner[0], defs)
    if origin is typing.Annotated:
        return pydantic_schema(args[0], defs)
    if origin is list:
        return {"type": "array", "items": pydantic_schema(args[0], defs)}
    if origin is dict:
        return {"type": "object", "additionalProperties": pydantic_schema(args[1], defs)}
    scalars = {str: "string", int: "integer", bool: "boolean", float: "number"}
    if annotation in scalars:
        return {"type": scalars[annotation]}
    if annotation is typing.Any or annotation is object:
        return {}
    name = annotation.__name__
    if name.startswith("JobsetV1alpha2"):
        key = "jobset.x-k8s.io.v1alpha2." + name[len("JobsetV1alpha2"):]
        if key not in defs:
            defs[key] = {}
            defs[key] = pydantic_model(annotation, defs)
        return {"$ref": f"#/$defs/{key}"}
    return k8s_ref(name)


def pydantic_model(cls, defs: dict) -> dict:
    props, required = {}, []
    for field in cls.model_fields.values():
        name = field.alias or next(k for k, v in cls.model_fields.items() if v is field)
        props[name] = annotate(pydantic_schema(field.annotation, defs), field.description or "")
        if field.is_required():
            required.append(name)
    schema = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema


def jobset_schema() -> dict:
    from importlib.metadata import version

    from kubeflow_trainer_api.models import JobsetV1alpha2JobSetSpec

    defs: dict = {}
    spec = pydantic_schema(JobsetV1alpha2JobSetSpec, defs)
    return top_level("jobset.x-k8s.io/v1alpha2", "JobSet", spec, defs, source={
        "package": "kubeflow-trainer-api", "version": version("kubeflow-trainer-api"),
        "models": "kubeflow_trainer_api.models.JobsetV1alpha2JobSet and the classes it names",
    })


def top_level(api_version: str, kind: str, spec: dict, defs: dict, source: dict) -> dict:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"urn:nemo-checkpointless:schema:{kind.lower()}:{api_version}",
        "title": f"{kind} ({api_version}), without status",
        "x-generated-from": {**source, "kubernetes-definitions":
                             f"kubernetes-validate v{K8S_VERSION}-local-strict/_definitions.json",
                             "generator": "scripts/k8s/schemas/generate.py"},
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": k8s_ref("IoK8sApimachineryPkgApisMetaV1ObjectMeta"),
            "spec": spec,
        },
        "$defs": dict(sorted(defs.items())),
    }


def main() -> None:
    for name, schema in [("pytorchjob.kubeflow.org_v1.json", pytorchjob_schema()),
                         ("jobset.x-k8s.io_v1alpha2.json", jobset_schema())]:
        path = HERE / name
        path.write_text(json.dumps(schema, indent=1, sort_keys=False) + "\n")
        print(f"wrote {path} ({len(schema['$defs'])} definitions)")


if __name__ == "__main__":
    main()
