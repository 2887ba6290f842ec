"""Import TF Serving's protos without starting TensorFlow, for one-shot clients.

`tensorflow_serving.apis.*_pb2` import TensorFlow's generated protos
(`tensorflow.core.framework.tensor_pb2`, ...), and importing any `tensorflow.` submodule runs
`tensorflow/__init__.py` first: ~4 s and the whole runtime, for a process that sends one
request (`recsys-cvae query`). Registering `tensorflow` as a bare namespace over the installed
package's folder lets those proto modules import as plain files.

Only for processes that never use TensorFlow itself: after this, `import tensorflow` gives the
bare namespace. Library code (`serving.client`) does not call it; the CLI's `query` does.
"""

from __future__ import annotations

import importlib.util
import sys
import types


def use_tensorflow_protos_only() -> None:
    """Makes `tensorflow` a namespace of its files, unless TensorFlow is already imported
    (then its protos are there anyway) or not installed (the import error says so later)."""
    if "tensorflow" in sys.modules:
        return
    spec = importlib.util.find_spec("tensorflow")
    if spec is None or not spec.submodule_search_locations:
        return
    namespace = types.ModuleType("tensorflow", "TensorFlow's files, without its runtime")
    namespace.__path__ = list(spec.submodule_search_locations)
    sys.modules["tensorflow"] = namespace
