//! Logit parity with Python `transformers` for each Hugging Face family, on the tiny random
//! checkpoints that tests/fixtures/make_tiny_classifiers.py made (expected logits saved beside them).

use aitier::inference::source::resolve_dir;
use aitier::inference::{SequenceClassifier, SequenceModel, Tokenized};
use serde_json::Value;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/classifiers");

fn check(family: &str) {
    let dir = std::path::Path::new(FIXTURES).join(format!("tiny-{family}"));
    let expected: Value =
        serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
    let model = SequenceClassifier::load(&resolve_dir(&dir).unwrap()).unwrap();
    assert_eq!(model.labels(), ["negative", "neutral", "positive"]);
    let texts: Vec<&str> = expected["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let tokenized: Vec<Tokenized> = texts.iter().map(|t| model.tokenize(t).unwrap()).collect();
    for (t, ids) in tokenized
        .iter()
        .zip(expected["input_ids"].as_array().unwrap())
    {
        let ids: Vec<u32> = serde_json::from_value(ids.clone()).unwrap();
        assert_eq!(t.ids, ids, "{family}: token ids differ");
    }
    let want: Vec<Vec<f32>> = serde_json::from_value(expected["logits"].clone()).unwrap();
    // One at a time, and all together (padding and packing must not change a thing).
    let alone: Vec<Vec<f32>> = tokenized
        .iter()
        .map(|t| model.forward(&[t]).unwrap().remove(0))
        .collect();
    let together = model
        .forward(&tokenized.iter().collect::<Vec<_>>())
        .unwrap();
    for got in [alone, together] {
        for (text, (g, w)) in texts.iter().zip(got.iter().zip(&want)) {
            let worst = g
                .iter()
                .zip(w)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-4, "{family}: {text:?}: {g:?} vs {w:?}");
        }
    }
}

#[test]
fn bert_logits_match_transformers() {
    check("bert");
}

#[test]
fn roberta_logits_match_transformers() {
    check("roberta");
}

#[test]
fn distilbert_logits_match_transformers() {
    check("distilbert");
}

#[test]
fn mpnet_logits_match_transformers() {
    // Its last text is 175 tokens: keys 8+ and 128+ tokens away read the bias's logarithmic and
    // last buckets.
    check("mpnet");
}
