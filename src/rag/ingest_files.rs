//! Files for `aitier ingest`: .txt and .md files, folders walked recursively, each one document
//! titled by its first Markdown heading or its file name.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::{Map, Value};

use super::{NewText, Rag};
use crate::store::Inserted;

fn wanted(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("txt") || e.eq_ignore_ascii_case("md"))
}

/// The .txt and .md files under `paths`, sorted, each once. A path that does not exist is an error.
pub fn collect(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut pending: Vec<PathBuf> = paths.to_vec();
    while let Some(path) = pending.pop() {
        let meta =
            std::fs::metadata(&path).with_context(|| format!("cannot read {}", path.display()))?;
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path)
                .with_context(|| format!("cannot list {}", path.display()))?
            {
                pending.push(entry?.path());
            }
        } else if wanted(&path) {
            files.push(path);
        }
    }
    files.sort();
    files.dedup();
    Ok(files)
}

/// The first `# ` heading of a Markdown text, else the file name without extension.
fn title(path: &Path, content: &str) -> String {
    content
        .lines()
        .find_map(|l| l.strip_prefix("# "))
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| {
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
}

pub async fn ingest_file(rag: &Rag, path: &Path, collection: &str) -> anyhow::Result<Inserted> {
    let content = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {} as UTF-8 text", path.display()))?;
    if content.contains('\0') {
        anyhow::bail!("{} contains NUL characters", path.display());
    }
    let mut metadata = Map::new();
    metadata.insert(
        "path".into(),
        Value::String(path.to_string_lossy().into_owned()),
    );
    Ok(rag
        .ingest(NewText {
            collection: collection.to_string(),
            title: title(path, &content),
            source: Some(path.to_string_lossy().into_owned()),
            content,
            metadata,
        })
        .await?)
}
