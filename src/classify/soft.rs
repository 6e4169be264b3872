//! Soft labels: texts with another classifier's probabilities for each label (a teacher's), which
//! fine-tuning learns to reproduce beside the labelled rows (distillation).

use std::path::{Path, PathBuf};

/// A text and the probability of each label, in the labels' order, summing to 1.
#[derive(Debug, Clone)]
pub struct SoftExample {
    pub text: String,
    pub probabilities: Vec<f32>,
}

#[derive(Debug, thiserror::Error)]
pub enum SoftError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Csv { path: PathBuf, source: csv::Error },
    #[error(
        "{path} needs a column '{column}' (the text, then one column per label with its probability); its columns are: {available}"
    )]
    MissingColumn {
        path: PathBuf,
        column: String,
        available: String,
    },
    #[error(
        "{path}, row {row}: the probabilities must be numbers from 0 to 1 that sum to 1 (within 0.01), not {found}"
    )]
    Probabilities {
        path: PathBuf,
        row: usize,
        found: String,
    },
}

/// Reads a CSV with a header row: `text_column` and one column named after each of `labels`
/// holding its probability (as `GET /api/classify/NAME` answers them in `scores`). Rows with an
/// empty text are skipped; probabilities that are not numbers in 0..=1 summing to 1 are refused
/// with their row number (1 is the first row after the header). Each row is renormalised.
pub fn read_soft_csv(
    path: &Path,
    text_column: &str,
    labels: &[String],
) -> Result<Vec<SoftExample>, SoftError> {
    let file = std::fs::File::open(path).map_err(|source| SoftError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let csv_err = |source| SoftError::Csv {
        path: path.to_path_buf(),
        source,
    };
    let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(file);
    let names: Vec<String> = reader
        .byte_headers()
        .map_err(csv_err)?
        .iter()
        .map(|h| String::from_utf8_lossy(h).trim().to_lowercase())
        .collect();
    let column = |wanted: &str| {
        names
            .iter()
            .position(|n| *n == wanted.to_lowercase())
            .ok_or_else(|| SoftError::MissingColumn {
                path: path.to_path_buf(),
                column: wanted.to_string(),
                available: names.join(", "),
            })
    };
    let text_at = column(text_column)?;
    let label_at: Vec<usize> = labels.iter().map(|l| column(l)).collect::<Result<_, _>>()?;
    let mut examples = Vec::new();
    for (row, record) in reader.byte_records().enumerate() {
        let record = record.map_err(csv_err)?;
        let field = |i| String::from_utf8_lossy(record.get(i).unwrap_or_default()).into_owned();
        let text = field(text_at).trim().to_string();
        if text.is_empty() {
            continue;
        }
        let values: Vec<Option<f32>> = label_at
            .iter()
            .map(|&i| field(i).trim().parse::<f32>().ok())
            .collect();
        let valid: Option<Vec<f32>> = values
            .iter()
            .map(|v| v.filter(|p| (0.0..=1.0).contains(p)))
            .collect();
        let sum: f32 = valid.iter().flatten().sum();
        match valid {
            Some(probabilities) if (sum - 1.0).abs() <= 0.01 => examples.push(SoftExample {
                text,
                probabilities: probabilities.iter().map(|p| p / sum).collect(),
            }),
            _ => {
                return Err(SoftError::Probabilities {
                    path: path.to_path_buf(),
                    row: row + 1,
                    found: label_at
                        .iter()
                        .zip(labels)
                        .map(|(&i, l)| format!("{l}={}", field(i).trim()))
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
        }
    }
    Ok(examples)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Vec<String> {
        ["negative", "neutral", "positive"]
            .map(String::from)
            .to_vec()
    }

    fn file(name: &str, body: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("aitier-soft-{name}.csv"));
        std::fs::write(&path, body).unwrap();
        path
    }

    #[test]
    fn reads_each_labels_probability_in_the_labels_order() {
        let path = file(
            "ok",
            "Positive,text,negative,neutral\n0.7,Great!,0.1,0.2\n0.2,,0.4,0.4\n0.5,Fine.,0.0,0.5\n",
        );
        let rows = read_soft_csv(&path, "text", &labels()).unwrap();
        assert_eq!(rows.len(), 2, "the row without a text is skipped");
        assert_eq!(rows[0].text, "Great!");
        assert_eq!(rows[0].probabilities, vec![0.1, 0.2, 0.7]);
        assert_eq!(rows[1].probabilities, vec![0.0, 0.5, 0.5]);
    }

    #[test]
    fn a_missing_label_column_is_named() {
        let path = file("missing", "text,negative,positive\nGreat!,0.1,0.9\n");
        let err = read_soft_csv(&path, "text", &labels())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("'neutral'") && err.contains("text, negative, positive"),
            "{err}"
        );
    }

    #[test]
    fn probabilities_that_are_not_a_distribution_are_refused_with_their_row() {
        for (name, row) in [
            ("sum", "Bad.,0.5,0.5,0.5"),
            ("negative", "Bad.,-0.5,0.5,1.0"),
            ("text", "Bad.,high,0.5,0.5"),
            ("nan", "Bad.,NaN,0.5,0.5"),
        ] {
            let path = file(
                name,
                &format!("text,negative,neutral,positive\nGood.,0,0,1\n{row}\n"),
            );
            let err = read_soft_csv(&path, "text", &labels())
                .unwrap_err()
                .to_string();
            assert!(err.contains("row 2"), "{name}: {err}");
        }
    }
}
