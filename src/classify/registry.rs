//! Finding, loading and caching classifiers by id: a directory under the classifiers folder (an
//! embedding head or a Hugging Face checkpoint), or a Hugging Face repo id. Loaded classifiers live
//! in a small LRU cache, like the seed's `lru_cache(maxsize=3)`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use serde_json::Value;

use super::head::{self, LinearHead, META_FILE};
use super::tune::Adapter;
use super::{Classifier, ClassifyError, HeadClassifier, TransformerClassifier};
use crate::inference::source::{self, HubOptions, ModelFiles};
use crate::inference::{
    BatchConfig, Batcher, EmbeddingService, SequenceClassifier, SequenceModel, Slot,
};

#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Folder of named classifiers (`models/classifiers`).
    pub dir: PathBuf,
    /// Loaded classifiers kept in memory.
    pub capacity: usize,
    /// Batching settings for each transformer classifier's pool (its name is filled in).
    pub batch: BatchConfig,
    pub hub: HubOptions,
    /// Accept Hugging Face repo ids from clients (downloaded on first use).
    pub hub_ids: bool,
}

/// What `GET /api/classifiers` shows of a classifier.
#[derive(Debug, Clone)]
pub struct ClassifierInfo {
    pub name: String,
    pub kind: String,
    pub labels: Vec<String>,
    pub embedding_model: Option<String>,
    pub metrics: Option<Value>,
    pub loaded: bool,
}

pub struct Classifiers {
    config: RegistryConfig,
    /// The served embedding model, shared with heads trained on it.
    embeddings: Arc<Slot<EmbeddingService>>,
    /// Most recently used last.
    cache: Mutex<Vec<(String, Arc<dyn Classifier>)>>,
    /// One load at a time: two requests for the same new model load it once.
    loading: tokio::sync::Mutex<()>,
}

impl Classifiers {
    pub fn new(config: RegistryConfig, embeddings: Arc<Slot<EmbeddingService>>) -> Self {
        Self {
            config,
            embeddings,
            cache: Mutex::new(Vec::new()),
            loading: tokio::sync::Mutex::new(()),
        }
    }

    fn cached(&self, id: &str) -> Option<Arc<dyn Classifier>> {
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        let at = cache.iter().position(|(key, _)| key == id)?;
        let entry = cache.remove(at);
        let found = entry.1.clone();
        cache.push(entry);
        Some(found)
    }

    fn insert(&self, id: &str, classifier: Arc<dyn Classifier>) {
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        cache.retain(|(key, _)| key != id);
        while cache.len() >= self.config.capacity.max(1) {
            let (evicted, _) = cache.remove(0);
            tracing::info!(classifier = %evicted, "evicted from the classifier cache");
        }
        cache.push((id.to_string(), classifier));
    }

    /// The classifier called `id`, loading it (off the runtime) when it is not cached. The load runs
    /// in a task of its own: a client that gives up does not cancel it half-way, and the next
    /// request finds the classifier ready.
    pub async fn get(self: &Arc<Self>, id: &str) -> Result<Arc<dyn Classifier>, ClassifyError> {
        if let Some(found) = self.cached(id) {
            return Ok(found);
        }
        let (registry, key) = (self.clone(), id.to_string());
        tokio::spawn(async move { registry.load_once(&key).await })
            .await
            .map_err(|e| ClassifyError::Invalid(format!("loader task failed: {e}")))?
    }

    async fn load_once(&self, id: &str) -> Result<Arc<dyn Classifier>, ClassifyError> {
        let _one_at_a_time = self.loading.lock().await;
        if let Some(found) = self.cached(id) {
            return Ok(found);
        }
        let started = std::time::Instant::now();
        let classifier = self.load(id).await?;
        tracing::info!(
            classifier = %id,
            kind = classifier.kind(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "classifier loaded"
        );
        self.insert(id, classifier.clone());
        Ok(classifier)
    }

    async fn load(&self, id: &str) -> Result<Arc<dyn Classifier>, ClassifyError> {
        let unknown =
            |why: String| ClassifyError::NotFound(format!("Unknown classifier '{id}': {why}"));
        if !valid_id(id) {
            return Err(unknown(
                "expected a name under the classifiers folder or a Hugging Face repo id (owner/name)"
                    .into(),
            ));
        }
        if !id.contains('/') {
            let dir = self.config.dir.join(id);
            if dir.join(META_FILE).is_file() {
                return self.load_head(&dir).await;
            }
            if dir.join("config.json").is_file() {
                let files =
                    source::resolve_dir(&dir).map_err(|e| ClassifyError::Invalid(e.to_string()))?;
                return self.load_transformer(id, files).await;
            }
            return Err(unknown(format!(
                "there is no {} (the default `sentiment` classifier is made by models/fetch)",
                dir.display()
            )));
        }
        if !self.config.hub_ids {
            return Err(unknown(
                "Hugging Face repo ids are turned off on this server (--hub-model-ids)".into(),
            ));
        }
        // config.json first: a repo that is not a classifier costs no weights download.
        let config = source::hub_file(id, "config.json", &self.config.hub)
            .await
            .map_err(|e| unknown(e.to_string()))?;
        crate::inference::read_classifier_config(&config)
            .map_err(|e| ClassifyError::Invalid(e.to_string()))?;
        let files = source::resolve_hub(id, &self.config.hub)
            .await
            .map_err(|e| unknown(e.to_string()))?;
        self.load_transformer(id, files).await
    }

    async fn load_head(&self, dir: &Path) -> Result<Arc<dyn Classifier>, ClassifyError> {
        let files = dir.to_path_buf();
        let (meta, head, adapter) = tokio::task::spawn_blocking(move || {
            Ok::<_, ClassifyError>((
                head::read_meta(&files)?,
                LinearHead::load(&files)?,
                Adapter::load(&files)?,
            ))
        })
        .await
        .map_err(|e| ClassifyError::Invalid(format!("loader task failed: {e}")))?
        // A broken folder is the classifier's fault, not the server's: 422, not 500.
        .map_err(|e| ClassifyError::Invalid(format!("{}: {e}", dir.display())))?;
        if head.labels() != meta.labels.len() {
            return Err(ClassifyError::Invalid(format!(
                "{}: {} labels but {} head rows",
                dir.display(),
                meta.labels.len(),
                head.labels()
            )));
        }
        let mut batch = self.config.batch.clone();
        batch.name = format!(
            "{}-head",
            dir.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("classifier")
        );
        // Its own pool over the served model's weights when it reads that model: classification
        // then cannot fill the queue of /api/embed, nor the other way round.
        let served = source::model_name(&meta.embedding_model) == self.embeddings.name();
        let base = if served {
            self.embeddings.get()?
        } else {
            let files = source::resolve(&meta.embedding_model, &self.config.hub)
                .await
                .map_err(|e| ClassifyError::Invalid(e.to_string()))?;
            Arc::new(
                EmbeddingService::load(files, batch.clone())
                    .await
                    .map_err(|e| ClassifyError::Inference(e.into()))?,
            )
        };
        let pool_err = |e: crate::inference::ModelError| ClassifyError::Inference(e.into());
        let embeddings = match adapter {
            // Fine-tuned top layers over the base model's other tensors (shared, not copied).
            Some(adapter) => {
                let bert = base.model().as_bert().ok_or_else(|| {
                    ClassifyError::Invalid(format!(
                        "{}: tuned layers need a BERT-family embedding model",
                        dir.display()
                    ))
                })?;
                let tuned = adapter
                    .apply(bert.encoder())
                    .map_err(|e| ClassifyError::Invalid(format!("{}: {e}", dir.display())))?;
                Arc::new(
                    EmbeddingService::with_model(
                        Arc::new(bert.with_encoder(tuned)),
                        base.max_tokens(),
                        batch,
                    )
                    .map_err(pool_err)?,
                )
            }
            None if served => Arc::new(base.with_own_pool(batch).map_err(pool_err)?),
            None => base,
        };
        if embeddings.dims() != head.dims {
            return Err(ClassifyError::Invalid(format!(
                "{}: the head reads {} dimensions but {} produces {}",
                dir.display(),
                head.dims,
                embeddings.name(),
                embeddings.dims()
            )));
        }
        Ok(Arc::new(HeadClassifier {
            head,
            meta,
            embeddings,
        }))
    }

    async fn load_transformer(
        &self,
        id: &str,
        files: ModelFiles,
    ) -> Result<Arc<dyn Classifier>, ClassifyError> {
        let model = tokio::task::spawn_blocking(move || {
            let model = SequenceClassifier::load(&files)?;
            let warm = model.tokenize("warm up")?;
            model.forward(&[&warm])?;
            Ok::<_, crate::inference::ModelError>(model)
        })
        .await
        .map_err(|e| ClassifyError::Invalid(format!("loader task failed: {e}")))?
        .map_err(|e| ClassifyError::Invalid(e.to_string()))?;
        let labels = model.labels().to_vec();
        let mut batch = self.config.batch.clone();
        batch.name = id.replace('/', "--");
        let batcher = Batcher::spawn(Arc::new(model), batch)?;
        Ok(Arc::new(TransformerClassifier { labels, batcher }))
    }

    /// Every classifier under the folder, plus the loaded ones from the Hub.
    pub fn list(&self) -> Vec<ClassifierInfo> {
        let loaded: Vec<(String, Arc<dyn Classifier>)> = self
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let is_loaded = |name: &str| loaded.iter().any(|(key, _)| key == name);
        let mut infos: Vec<ClassifierInfo> = std::fs::read_dir(&self.config.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().to_str()?.to_string();
                describe_dir(&entry.path(), &name, is_loaded(&name))
            })
            .collect();
        for (name, classifier) in &loaded {
            if !infos.iter().any(|i| &i.name == name) {
                infos.push(ClassifierInfo {
                    name: name.clone(),
                    kind: classifier.kind().into(),
                    labels: classifier.labels().to_vec(),
                    embedding_model: None,
                    metrics: None,
                    loaded: true,
                });
            }
        }
        infos.sort_by(|a, b| a.name.cmp(&b.name));
        infos
    }
}

fn describe_dir(dir: &Path, name: &str, loaded: bool) -> Option<ClassifierInfo> {
    if let Ok(meta) = head::read_meta(dir) {
        return Some(ClassifierInfo {
            name: name.to_string(),
            kind: "embedding-head".into(),
            labels: meta.labels,
            embedding_model: Some(meta.embedding_model),
            metrics: Some(meta.metrics),
            loaded,
        });
    }
    let labels = crate::inference::read_classifier_config(&dir.join("config.json")).ok()?;
    Some(ClassifierInfo {
        name: name.to_string(),
        kind: "transformers".into(),
        labels,
        embedding_model: None,
        metrics: None,
        loaded,
    })
}

/// A classifier folder name: letters, digits, `.`, `_`, `-`, not starting with `.`.
pub fn valid_name(name: &str) -> bool {
    !name.contains('/') && valid_id(name)
}

/// A folder name or `owner/name`: letters, digits, `.`, `_`, `-`; no path tricks.
fn valid_id(id: &str) -> bool {
    let parts: Vec<&str> = id.split('/').collect();
    !id.is_empty()
        && parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        })
}

#[cfg(test)]
mod tests {
    use super::valid_id;

    #[test]
    fn ids_cannot_escape_the_classifiers_folder() {
        for good in [
            "sentiment",
            "my-model_2",
            "distilbert/distilbert-base-uncased-finetuned-sst-2-english",
        ] {
            assert!(valid_id(good), "{good}");
        }
        for bad in [
            "", "..", "../etc", "a/b/c", "/abs", ".hidden", "a b", "a/..", "x/",
        ] {
            assert!(!valid_id(bad), "{bad}");
        }
    }
}
