"""A weight index for pipeline loading, for model folders that come without one.

mlx-lm's ``sharded_load`` in pipeline mode reads ``model.safetensors.index.json`` to find which
weights files hold each rank's layers; small models ship one ``model.safetensors`` and no index,
and would fail with ``FileNotFoundError``. The index is derived from the weights files' headers
instead, and handed over in a private view of the folder (a temporary folder of links to every
file, plus the index), so the user's folder is never written to. The view is needed only while
loading: ``sharded_load`` evaluates every weight before it returns.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Iterator

INDEX = "model.safetensors.index.json"


@contextlib.contextmanager
def indexed_folder(model: Path) -> Iterator[Path]:
    """``model`` itself if it has a weight index, else a view of it that has one."""
    if (model / INDEX).exists():
        yield model
        return
    import mlx.core as mx

    # The same files mlx-lm's ``load_model`` reads; ``mx.load`` is lazy, so only headers are read.
    weight_map = {name: file.name for file in sorted(model.glob("model*.safetensors")) for name in mx.load(str(file))}
    with tempfile.TemporaryDirectory(prefix="llm-server-weights-") as view:
        for entry in model.iterdir():
            (Path(view) / entry.name).symlink_to(entry.resolve())
        (Path(view) / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        yield Path(view)
