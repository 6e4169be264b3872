//! Where a model's files come from: a local directory, or a Hugging Face repo id through the Hub cache.

use std::path::{Path, PathBuf};

use hf_hub::api::tokio::ApiBuilder;
use hf_hub::{Cache, Repo};

use crate::secret::Secret;

/// The files of a transformer checkpoint that aitier reads.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub config: PathBuf,
    pub tokenizer: PathBuf,
    pub weights: Weights,
    /// sentence-transformers' `1_Pooling/config.json`, when the model has one.
    pub pooling: Option<PathBuf>,
    /// sentence-transformers' `sentence_bert_config.json` (its `max_seq_length`), when present.
    pub sentence_config: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub enum Weights {
    Safetensors(PathBuf),
    PyTorch(PathBuf),
}

/// How to reach the Hub for models given by repo id.
#[derive(Debug, Clone, Default)]
pub struct HubOptions {
    pub cache_dir: Option<PathBuf>,
    pub token: Option<Secret>,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("model directory {dir} has no {file}")]
    MissingFile { dir: PathBuf, file: &'static str },
    #[error(
        "model '{model}' is not a local directory and could not be fetched from the Hugging Face Hub ({cause}). \
         Run `models/fetch` for the default models, or pass a local directory holding config.json, \
         tokenizer.json and model.safetensors"
    )]
    Unreachable { model: String, cause: String },
}

const OPTIONAL: [&str; 2] = ["1_Pooling/config.json", "sentence_bert_config.json"];

/// The name a model reference is served under: its last path segment
/// (`models/all-MiniLM-L6-v2` and `sentence-transformers/all-MiniLM-L6-v2` are `all-MiniLM-L6-v2`).
pub fn model_name(reference: &str) -> String {
    let trimmed = reference.trim_end_matches('/');
    trimmed.rsplit('/').next().unwrap_or(trimmed).to_string()
}

/// Resolves a model reference: an existing directory is used as is; anything else is a Hub repo id,
/// looked up in the local Hub cache first and downloaded only when missing there.
pub async fn resolve(reference: &str, hub: &HubOptions) -> Result<ModelFiles, SourceError> {
    let dir = Path::new(reference);
    if dir.is_dir() {
        return resolve_dir(dir);
    }
    resolve_hub(reference, hub).await
}

/// Resolves a Hub repo id only (never a local path): the Hub cache first, then a download.
pub async fn resolve_hub(reference: &str, hub: &HubOptions) -> Result<ModelFiles, SourceError> {
    let cache = cache(hub);
    let cached = cache.repo(Repo::model(reference.to_string()));
    if let Some(files) = assemble(|f| cached.get(f), |f| cached.get(f)) {
        return Ok(files);
    }
    download(reference, hub).await
}

/// The files of a local model directory.
pub fn resolve_dir(dir: &Path) -> Result<ModelFiles, SourceError> {
    let existing = |f: &str| Some(dir.join(f)).filter(|p| p.is_file());
    let missing = |file| SourceError::MissingFile {
        dir: dir.to_path_buf(),
        file,
    };
    let config = existing("config.json").ok_or_else(|| missing("config.json"))?;
    let tokenizer = existing("tokenizer.json").ok_or_else(|| missing("tokenizer.json"))?;
    let weights = existing("model.safetensors")
        .map(Weights::Safetensors)
        .or_else(|| existing("pytorch_model.bin").map(Weights::PyTorch))
        .ok_or_else(|| missing("model.safetensors (or pytorch_model.bin)"))?;
    Ok(ModelFiles {
        config,
        tokenizer,
        weights,
        pooling: existing(OPTIONAL[0]),
        sentence_config: existing(OPTIONAL[1]),
    })
}

/// Builds the file set from a lookup; `None` when a required file is absent.
fn assemble(
    required: impl Fn(&str) -> Option<PathBuf>,
    optional: impl Fn(&str) -> Option<PathBuf>,
) -> Option<ModelFiles> {
    Some(ModelFiles {
        config: required("config.json")?,
        tokenizer: required("tokenizer.json")?,
        weights: required("model.safetensors")
            .map(Weights::Safetensors)
            .or_else(|| required("pytorch_model.bin").map(Weights::PyTorch))?,
        pooling: optional(OPTIONAL[0]),
        sentence_config: optional(OPTIONAL[1]),
    })
}

/// One file of a Hub repo: from the cache, else downloaded.
pub async fn hub_file(model: &str, file: &str, hub: &HubOptions) -> Result<PathBuf, SourceError> {
    let cache = cache(hub);
    if let Some(path) = cache.repo(Repo::model(model.to_string())).get(file) {
        return Ok(path);
    }
    let api = api(hub).map_err(|cause| SourceError::Unreachable {
        model: model.to_string(),
        cause,
    })?;
    api.model(model.to_string())
        .get(file)
        .await
        .map_err(|e| SourceError::Unreachable {
            model: model.to_string(),
            cause: e.to_string(),
        })
}

/// The local Hub cache: the configured directory, else hf-hub's default.
fn cache(hub: &HubOptions) -> Cache {
    hub.cache_dir
        .clone()
        .map(Cache::new)
        .unwrap_or_else(Cache::from_env)
}

fn api(hub: &HubOptions) -> Result<hf_hub::api::tokio::Api, String> {
    let mut builder = ApiBuilder::from_env().with_progress(false);
    if let Some(dir) = &hub.cache_dir {
        builder = builder.with_cache_dir(dir.clone());
    }
    if let Some(token) = &hub.token {
        builder = builder.with_token(Some(token.expose().to_string()));
    }
    builder.build().map_err(|e| e.to_string())
}

async fn download(model: &str, hub: &HubOptions) -> Result<ModelFiles, SourceError> {
    let unreachable = |cause: String| SourceError::Unreachable {
        model: model.to_string(),
        cause,
    };
    let api = api(hub).map_err(unreachable)?;
    let repo = api.model(model.to_string());
    let config = repo
        .get("config.json")
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let tokenizer = repo
        .get("tokenizer.json")
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let weights = match repo.get("model.safetensors").await {
        Ok(path) => Weights::Safetensors(path),
        Err(_) => Weights::PyTorch(
            repo.get("pytorch_model.bin")
                .await
                .map_err(|e| unreachable(e.to_string()))?,
        ),
    };
    let mut optional = Vec::new();
    for file in OPTIONAL {
        optional.push(repo.get(file).await.ok());
    }
    let sentence_config = optional.pop().flatten();
    let pooling = optional.pop().flatten();
    Ok(ModelFiles {
        config,
        tokenizer,
        weights,
        pooling,
        sentence_config,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_unknown_model_names_itself_and_says_how_to_supply_it() {
        let hub = HubOptions {
            cache_dir: Some(std::env::temp_dir().join("aitier-empty-hf-cache")),
            token: None,
        };
        let err = resolve("no-such-owner/no-such-model", &hub)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("no-such-owner/no-such-model"), "{err}");
        assert!(err.contains("models/fetch"), "{err}");
    }

    #[test]
    fn a_directory_without_weights_is_reported() {
        let dir = std::env::temp_dir().join("aitier-no-weights");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
        let err = resolve_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("model.safetensors"), "{err}");
    }
}
