"""Checks a SavedModel export against expected outputs, the way a server would load it.

Why a separate program: TF Serving loads an export with nothing but TensorFlow. Running the
check in a fresh interpreter that never imports `recsys_cvae` proves the export needs no
model code, no custom ops and no Python functions. Every signature runs twice: through
`tf.saved_model.load` (TF2, as this project's Beam handlers, `beam_jobs.signature_inference`
and `beam_jobs.model_handler`, load it; Beam's stock TF handlers go through Keras and cannot)
and through the TF1 session loader fed by the SignatureDef's tensor names (how
`tensorflow_model_server` runs a SignatureDef).
`recsys_cvae.export.verify_export` writes the cases file and runs

    python -m serving.verify_export --export-dir W/export/3 --cases cases.json

Cases file (JSON):

    {"top_k": K, "rtol": 1e-4, "atol": 1e-4,
     "signatures": {"<name>": {"inputs": {"<input>": nested lists},
                               "expected": {"<output>": nested lists},
                               "reference_scores": [{item_id: score}, ...]}}}

String outputs (item ids) must match exactly, except that two items may trade places when
their expected scores are equal within tolerance (`reference_scores` holds each row's best
items and scores); numeric outputs must be allclose. Exit status 0 prints a one-line JSON
summary on stdout; anything else prints one line `verify_export: error: <reason>` on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import tensorflow as tf
from tensorflow.python.framework import op_def_registry

# Ops that call back into Python: stock TF Serving cannot run them.
PYTHON_OPS = frozenset({"PyFunc", "PyFuncStateless", "EagerPyFunc"})


class VerificationError(Exception):
    """The export does not produce what the cases file expects."""


def graph_op_types(concrete_function) -> set[str]:
    """Every op type in a concrete function's graph, including its function library."""
    graph_def = concrete_function.graph.as_graph_def()
    ops = {node.op for node in graph_def.node}
    for function in graph_def.library.function:
        ops.update(node.op for node in function.node_def)
    return ops


def check_export(export_dir: str, cases: dict) -> dict:
    """Runs every signature in `cases` through both loaders and compares; returns a summary.

    1. TF2: `tf.saved_model.load` and the signature's concrete function (as our Beam
       handlers and `serving.server` call it).
    2. TF1: `tf.compat.v1.saved_model.loader.load` into a `tf.compat.v1.Session`, feeding and
       fetching the SignatureDef's tensor names (as `tensorflow_model_server` runs it). The
       graph must hold only op types registered by core TensorFlow (this process imports
       nothing else), none of them calling back into Python.

    Raises VerificationError naming the loader, signature, output and row of the first mismatch.
    """
    loaded = tf.saved_model.load(export_dir)
    max_diff, rows = 0.0, 0
    for name, case in cases["signatures"].items():
        if name not in loaded.signatures:
            raise VerificationError(
                f"signature {name!r} missing; the export has {sorted(loaded.signatures)}"
            )
        signature = loaded.signatures[name]
        python_ops = graph_op_types(signature) & PYTHON_OPS
        if python_ops:
            raise VerificationError(f"signature {name!r} uses Python ops {sorted(python_ops)}")
        outputs = signature(**_input_tensors(name, signature, case["inputs"]))
        got = {key: value.numpy() for key, value in outputs.items()}
        max_diff = max(max_diff, _compare_outputs(name, got, case, cases))
        rows += len(next(iter(case["expected"].values())))
    session_diff, op_types = check_with_session(export_dir, cases)
    return {
        "export_dir": export_dir,
        "signatures": sorted(cases["signatures"]),
        "rows": rows,
        "max_abs_diff": max(max_diff, session_diff),
        "session_loader": {"max_abs_diff": session_diff, "op_types": len(op_types)},
    }


def check_with_session(export_dir: str, cases: dict) -> tuple[float, set[str]]:
    """Every signature of `cases` through the TF1 loader and a Session, as TF Serving runs it.

    Inputs are fed by the SignatureDef's tensor names (e.g. `recommend_item_ids:0`) and
    outputs fetched by theirs, so this exercises exactly the SignatureDef map a server reads,
    not the Python-side concrete functions. Returns (largest numeric difference, op types).
    """
    with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph) as session:
        try:
            meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], export_dir)
        except Exception as error:  # noqa: BLE001  (report any loader failure in one line)
            reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            raise VerificationError(f"session loader: cannot load {export_dir}: {reason}") from None
        op_types = meta_graph_op_types(meta_graph)
        unregistered = sorted(op for op in op_types if op_def_registry.get(op) is None)
        python_ops = sorted(op_types & PYTHON_OPS)
        if unregistered or python_ops:
            raise VerificationError(
                f"session loader: non-core ops {unregistered + python_ops} in the graph"
            )
        max_diff = 0.0
        for name, case in cases["signatures"].items():
            if name not in meta_graph.signature_def:
                raise VerificationError(
                    f"session loader: signature {name!r} missing; the SignatureDefs are "
                    f"{sorted(meta_graph.signature_def)}"
                )
            signature_def = meta_graph.signature_def[name]
            if set(signature_def.inputs) != set(case["inputs"]):
                raise VerificationError(
                    f"session loader: signature {name!r} takes inputs "
                    f"{sorted(signature_def.inputs)}, the cases have {sorted(case['inputs'])}"
                )
            feed = {
                info.name: np.asarray(
                    case["inputs"][key], dtype=tf.dtypes.as_dtype(info.dtype).as_numpy_dtype)
                for key, info in signature_def.inputs.items()
            }
            fetch = {key: info.name for key, info in signature_def.outputs.items()}
            got = session.run(fetch, feed_dict=feed)
            max_diff = max(max_diff, _compare_outputs(f"session {name}", got, case, cases))
    return max_diff, op_types


def meta_graph_op_types(meta_graph) -> set[str]:
    """Every op type of a MetaGraphDef: its graph and all functions of its library."""
    ops = {node.op for node in meta_graph.graph_def.node}
    for function in meta_graph.graph_def.library.function:
        ops.update(node.op for node in function.node_def)
    return ops


def _compare_outputs(name: str, got: dict[str, np.ndarray], case: dict, cases: dict) -> float:
    """Checks one signature's outputs against the case; returns the largest numeric diff."""
    rtol, atol = float(cases.get("rtol", 1e-4)), float(cases.get("atol", 1e-4))
    expected = case["expected"]
    if set(got) != set(expected):
        raise VerificationError(
            f"signature {name!r} outputs {sorted(got)}, expected {sorted(expected)}"
        )
    max_diff = 0.0
    for key, want in expected.items():
        value = np.asarray(got[key])
        if value.dtype == object:
            _compare_ranking(name, key, value, case, int(cases["top_k"]), rtol, atol)
        else:
            max_diff = max(max_diff, _compare_numbers(
                name, key, value, np.asarray(want), rtol, atol))
    return max_diff


def _input_tensors(name: str, signature, inputs: dict) -> dict[str, tf.Tensor]:
    """JSON lists -> tensors of the dtypes the signature declares; names must match exactly."""
    specs = signature.structured_input_signature[1]
    if set(specs) != set(inputs):
        raise VerificationError(
            f"signature {name!r} takes inputs {sorted(specs)}, the cases have {sorted(inputs)}"
        )
    return {key: tf.constant(inputs[key], dtype=spec.dtype) for key, spec in specs.items()}


def _compare_numbers(name: str, key: str, got: np.ndarray, want: np.ndarray,
                     rtol: float, atol: float) -> float:
    if got.shape != want.shape:
        raise VerificationError(f"{name}.{key}: shape {got.shape}, expected {want.shape}")
    close = np.isclose(got, want, rtol=rtol, atol=atol)
    if not close.all():
        where = tuple(int(i) for i in np.argwhere(~close)[0])
        raise VerificationError(
            f"{name}.{key}[{', '.join(map(str, where))}] is {got[where]}, expected {want[where]}"
        )
    finite = np.isfinite(want) & np.isfinite(got)
    return float(np.abs(got[finite] - want[finite]).max()) if finite.any() else 0.0


def _compare_ranking(name: str, key: str, got: np.ndarray, case: dict, top_k: int,
                     rtol: float, atol: float) -> None:
    """Item ids must match position by position, up to swaps between tied scores."""
    want = case["expected"][key]
    want_scores = case["expected"].get("scores")
    reference = case.get("reference_scores")
    width = len(want[0]) if want and want_scores is None else top_k  # sample: its own width
    if got.shape != (len(want), width):
        raise VerificationError(
            f"{name}.{key}: shape {got.shape}, expected ({len(want)}, {width})"
        )
    for row, (got_row, want_row) in enumerate(zip(got, want)):
        for col, (got_id, want_id) in enumerate(zip(got_row, want_row)):
            got_id = got_id.decode("utf-8")
            if got_id == want_id:
                continue
            # A float tie may swap two items: both must score what this rank expects.
            tied = reference is not None and want_scores is not None and all(
                item in reference[row]
                and np.isclose(reference[row][item], want_scores[row][col], rtol=rtol, atol=atol)
                for item in (got_id, want_id)
            )
            if not tied:
                raise VerificationError(
                    f"{name}.{key}: row {row} rank {col} is {got_id!r}, expected {want_id!r}"
                )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--export-dir", required=True, help="a SavedModel version directory")
    parser.add_argument("--cases", required=True, help="JSON file of inputs and expectations")
    args = parser.parse_args(argv)
    try:
        with open(args.cases) as f:
            cases = json.load(f)
        summary = check_export(args.export_dir, cases)
        if "recsys_cvae" in sys.modules:
            raise VerificationError("recsys_cvae was imported; the export must not need it")
    except (VerificationError, OSError, KeyError, ValueError, tf.errors.OpError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        print(f"verify_export: error: {type(error).__name__}: {reason}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
