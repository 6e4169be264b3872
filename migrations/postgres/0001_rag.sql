-- Retrieval storage on PostgreSQL: collections, documents, chunks with their embedding (pgvector) and
-- full-text vector (tsvector + GIN). The HNSW index is per vector length, a partial expression index
-- `chunks_embedding_<dims>_hnsw` created when a model of that length first writes: an HNSW index
-- needs a fixed length, and the length is the embedding model's.
CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE collections (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    dims INTEGER NOT NULL CHECK (dims > 0),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE documents (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    collection_id BIGINT NOT NULL REFERENCES collections (id) ON DELETE CASCADE,
    title TEXT NOT NULL,
    source TEXT,
    metadata JSONB NOT NULL DEFAULT '{}',
    content_hash TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (collection_id, content_hash)
);

CREATE INDEX documents_metadata ON documents USING GIN (metadata jsonb_path_ops);

CREATE TABLE chunks (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    document_id BIGINT NOT NULL REFERENCES documents (id) ON DELETE CASCADE,
    collection_id BIGINT NOT NULL REFERENCES collections (id) ON DELETE CASCADE,
    ordinal INTEGER NOT NULL,
    text TEXT NOT NULL,
    start_char INTEGER NOT NULL,
    end_char INTEGER NOT NULL,
    dims INTEGER NOT NULL,
    embedding vector NOT NULL,
    tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', text)) STORED,
    UNIQUE (document_id, ordinal),
    -- A vector of another length than its collection's is refused, never stored as garbage.
    CHECK (vector_dims(embedding) = dims)
);

CREATE INDEX chunks_collection ON chunks (collection_id);
CREATE INDEX chunks_tsv ON chunks USING GIN (tsv);
