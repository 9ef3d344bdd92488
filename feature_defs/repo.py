"""Entry point for the ``feast`` CLI only (``feast apply``, ``feast plan``, ``feast feature-views list``).

The platform itself applies programmatically (``recsys features build``); this file lets an
operator use Feast's own tooling on the same declarations. ``.feastignore`` hides every other
module of this folder, so ``feast apply`` imports just this one. Generate the config first
(``recsys features build`` writes it), then, from the project root::

    .venv/bin/feast -c feature_defs -f var/features/feature_store.yaml apply

Feast collects module-level objects, so they are bound to names below. The project root is put
on ``sys.path`` because Feast imports this file as a top-level module from inside this folder.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from core.config import load_settings  # noqa: E402
from feature_defs.definitions import feast_objects  # noqa: E402

_settings = load_settings(root=os.environ.get("RECSYS_PATHS__ROOT", _ROOT))


def _objects() -> dict[str, object]:
    from pipelines.features import category_vocab, feature_paths

    paths = feature_paths(_settings)
    objs = feast_objects(tables_dir=paths.tables_dir, category_vocab=category_vocab(paths))
    return {f"{type(o).__name__.lower()}_{o.name}": o for o in objs}


globals().update(_objects())
