"""The OpenAPI 3.1 document of the daemon's API (served at ``GET /v1/openapi.json``).

Written by hand beside the routes in cove.daemon.server; a test checks that
every route the server answers is here and that the document is valid.
"""

from __future__ import annotations

from typing import Any

from cove import __version__

JSON = dict[str, Any]

_PROBLEM = {
    "description": "An RFC 7807 problem document",
    "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
}
_ENCLAVE = {
    "description": "The enclave",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Enclave"}}},
}
_REF = {
    "name": "ref",
    "in": "path",
    "required": True,
    "description": "a name, an id or a unique id prefix",
    "schema": {"type": "string"},
}


def _op(
    summary: str, ok: JSON, params: list[JSON] | None = None, body: JSON | None = None, status: str = "200"
) -> JSON:
    op: JSON = {"summary": summary, "responses": {status: ok, "4XX": _PROBLEM, "5XX": _PROBLEM}}
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return op


def _query(name: str, kind: str, description: str) -> JSON:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": {"type": kind}}


def _json(description: str, schema: JSON) -> JSON:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def document() -> JSON:
    enclave_list = _json("Enclaves, newest first", {"type": "array", "items": {"$ref": "#/components/schemas/Enclave"}})
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Cove daemon API",
            "version": __version__,
            "description": "The node service's API over its unix socket (docs/formats/daemon-api.md).",
        },
        "paths": {
            "/v1/version": {
                "get": _op(
                    "Version of the daemon and of the API",
                    _json(
                        "Versions",
                        {"type": "object", "properties": {"version": {"type": "string"}, "api": {"type": "string"}}},
                    ),
                )
            },
            "/v1/openapi.json": {"get": _op("This document", _json("OpenAPI", {"type": "object"}))},
            "/v1/enclaves": {
                "get": _op(
                    "List enclaves (running ones unless all)",
                    enclave_list,
                    [_query("all", "boolean", "include exited enclaves")],
                ),
                "post": _op(
                    "Import the instance's image if needed, then start an enclave. With `Connection: Upgrade` and "
                    "`Upgrade: cove-attach/1` (`cove run`) the answer is 101 and the connection carries frames "
                    "from the daemon: the started Enclave, its output, then the ended Enclave once it has been "
                    "removed (docs/formats/daemon-api.md); refusals are still problems",
                    _ENCLAVE,
                    None,
                    {"$ref": "#/components/schemas/Create"},
                    "201",
                ),
            },
            "/v1/enclaves/{ref}": {
                "get": _op("Inspect an enclave", _ENCLAVE, [_REF]),
                "delete": _op(
                    "Remove an ended enclave (force: stop it first)",
                    _ENCLAVE,
                    [_REF, _query("force", "boolean", "stop a running enclave first")],
                ),
            },
            "/v1/enclaves/{ref}/stop": {
                "post": _op(
                    "SIGTERM, then SIGKILL after timeout seconds; no restart follows",
                    _ENCLAVE,
                    [_REF, _query("timeout", "number", "seconds before SIGKILL (default 10)")],
                )
            },
            "/v1/enclaves/{ref}/kill": {
                "post": _op(
                    "Send a signal to the enclave's program",
                    _ENCLAVE,
                    [_REF, _query("signal", "string", "a name (TERM, SIGKILL) or number; default KILL")],
                )
            },
            "/v1/enclaves/{ref}/wait": {"post": _op("Wait for the enclave to end", _ENCLAVE, [_REF])},
            "/v1/enclaves/{ref}/exec": {
                "post": _op(
                    "Run a program in the running enclave (its namespaces, seccomp filter, limits, user, environment). "
                    "With `Connection: Upgrade` and `Upgrade: cove-exec/1` the answer is 101 and the connection "
                    "carries frames both ways (stdin, window size; stdout, stderr, exit code: docs/formats/daemon-api.md); "
                    "stdin, tty, rows and cols apply only then; timeout only without it",
                    _json(
                        "Its exit code and output (the first and last bytes of each, dropped ones counted)",
                        {
                            "type": "object",
                            "properties": {
                                "exit_code": {"type": "integer"},
                                "stdout": {"type": "string"},
                                "stderr": {"type": "string"},
                                "stdout_dropped": {"type": "integer"},
                                "stderr_dropped": {"type": "integer"},
                                "timed_out": {"type": "boolean"},
                            },
                        },
                    ),
                    [_REF],
                    {
                        "type": "object",
                        "required": ["argv"],
                        "properties": {
                            "argv": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                            "stdin": {"type": "boolean"},
                            "tty": {"type": "boolean"},
                            "rows": {"type": "integer", "minimum": 0, "maximum": 65535},
                            "cols": {"type": "integer", "minimum": 0, "maximum": 65535},
                            "timeout": {"type": "number", "exclusiveMinimum": 0, "maximum": 86400},
                        },
                    },
                )
            },
            "/v1/enclaves/{ref}/logs": {
                "get": _op(
                    "The program's output (stdout and stderr, as written)",
                    {"description": "Log bytes, chunked", "content": {"application/octet-stream": {}}},
                    [
                        _REF,
                        _query("follow", "boolean", "keep streaming until the enclave ends"),
                        _query("tail", "integer", "only the last N lines"),
                    ],
                )
            },
            "/v1/images": {
                "get": _op(
                    "Images in the store",
                    _json("Images", {"type": "array", "items": {"$ref": "#/components/schemas/Image"}}),
                )
            },
            "/v1/images/{id}": {
                "delete": _op(
                    "Remove an image no enclave uses, then collect unreferenced content",
                    _json("What was freed", {"type": "object"}),
                    [
                        {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}},
                        _query("force", "boolean", "even if ended enclaves still name it"),
                    ],
                )
            },
            "/v1/images/prune": {
                "post": _op("Collect unreferenced content", _json("What was freed", {"type": "object"}))
            },
            "/v1/events": {
                "get": _op(
                    "Lifecycle events as JSON lines",
                    {"description": "application/x-ndjson, chunked", "content": {"application/x-ndjson": {}}},
                    [
                        _query("since", "integer", "only events after this sequence number"),
                        _query("follow", "boolean", "keep streaming (default true)"),
                    ],
                )
            },
        },
        "components": {
            "schemas": {
                "Problem": {
                    "type": "object",
                    "required": ["type", "title", "status", "exit_code"],
                    "properties": {
                        "type": {"type": "string"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                        "instance": {"type": "string"},
                        "kind": {"type": "string"},
                        "exit_code": {"type": "integer", "description": "the exit code of docs/cli.md"},
                    },
                },
                "Create": {
                    "type": "object",
                    "required": ["instance", "program"],
                    "properties": {
                        "instance": {"type": "string", "description": "absolute path of the instance folder"},
                        "program": {"type": "string"},
                        "args": {"type": "array", "items": {"type": "string"}},
                        "name": {"type": ["string", "null"]},
                        "backend": {"type": ["string", "null"]},
                        "restart": {"type": "string", "description": "no, on-failure, on-failure:N or always"},
                        "signer": {"type": ["string", "null"], "description": "64 hex digits"},
                        "env": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                            "description": "the client's environment; only [env] passthrough names are used",
                        },
                    },
                },
                "Enclave": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string"},
                        "name": {"type": "string"},
                        "image": {"type": "string"},
                        "measurement": {"type": "string"},
                        "signer": {"type": "string"},
                        "backend": {"type": "string"},
                        "program": {"type": "string"},
                        "args": {"type": "array", "items": {"type": "string"}},
                        "instance": {"type": "string"},
                        "created": {"type": "number"},
                        "restart": {"type": "string"},
                        "state": {"type": "string", "enum": ["created", "starting", "running", "restarting", "exited"]},
                        "exit_code": {"type": ["integer", "null"]},
                        "error": {"type": ["string", "null"]},
                        "started": {"type": ["number", "null"]},
                        "finished": {"type": ["number", "null"]},
                        "uptime": {"type": ["number", "null"]},
                        "restarts": {"type": "integer"},
                        "supervisor_pid": {"type": ["integer", "null"]},
                        "enclave_pid": {"type": ["integer", "null"]},
                    },
                },
                "Image": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string"},
                        "name": {"type": "string"},
                        "measurement": {"type": "string"},
                        "signer": {"type": "string"},
                        "files": {"type": "integer"},
                        "bytes": {"type": "integer"},
                        "imported": {"type": "number"},
                        "enclaves": {"type": "integer"},
                    },
                },
            }
        },
    }
