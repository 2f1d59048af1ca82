"""Build the FAISS index of a model version from the database: read its embeddings (db/),
build and switch to the index (models/index), record the build (db/)."""

from __future__ import annotations

from pathlib import Path

from db.indexes import embedding_chunks, record_index_build
from db.schema import utcnow
from flickd.core.settings import Settings
from flickd.core.storage import INDEX, storage_for
from models.index import VectorIndex, write_versioned
from models.index.files import Target


def build_from_database(
    settings: Settings,
    model_version_id: int,
    directory: Target | None = None,
    *,
    chunk_rows: int = 5_000,
) -> Path | str:
    """Index every embedding of ``model_version_id``, switch ``directory`` to it and record
    the build as the active one. Rows added during the build wait for the next build: the
    passes read embeddings up to the id that was highest when the build started; serving
    replicas add them to their delta meanwhile (``flickd/services/freshness.py``). Crops of
    delisted products and retired images are left out. The directory defaults to the
    ``index/`` folder of the storage."""
    if directory is None:
        directory = storage_for(settings).at(INDEX)
    started = utcnow()
    embeddings = embedding_chunks(settings, model_version_id, chunk_rows=chunk_rows)
    index = VectorIndex.build(
        embeddings.chunks, embeddings.dim, n_total=embeddings.n, model_version_id=model_version_id
    )
    # What the index holds, for the reconciler's drift check: embeddings up to this id, as
    # the catalog was at this time.
    index.params.update(top_embedding_id=embeddings.top_id, catalog_as_of=started.isoformat())
    path = write_versioned(index, directory, scratch=settings.data_dir / "scratch")
    record_index_build(
        settings,
        model_version_id,
        path=str(path),
        index_type=index.index_type,
        n_vectors=index.ntotal,
        params=index.params,
    )
    return path
