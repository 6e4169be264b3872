//! Quality measures of a classifier on labelled texts: accuracy, macro-F1, the confusion matrix, and
//! positive-vs-negative accuracy for sentiment.

/// Held-out quality of a classifier.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Metrics {
    pub examples: usize,
    pub accuracy: f64,
    pub macro_f1: f64,
    /// Rows are the true labels, columns the predicted ones, in label order.
    pub confusion: Vec<Vec<usize>>,
    /// Accuracy on the positive and negative rows when only those two labels compete (when the
    /// labels include both).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub polar_accuracy: Option<f64>,
}

/// Metrics from true labels and predicted probabilities.
pub fn evaluate(labels: &[String], truth: &[usize], probabilities: &[Vec<f32>]) -> Metrics {
    let k = labels.len();
    let mut confusion = vec![vec![0usize; k]; k];
    let argmax = |p: &[f32], among: &[usize]| {
        among
            .iter()
            .copied()
            .max_by(|&a, &b| p[a].total_cmp(&p[b]))
            .unwrap_or(0)
    };
    let all: Vec<usize> = (0..k).collect();
    for (&t, p) in truth.iter().zip(probabilities) {
        confusion[t][argmax(p, &all)] += 1;
    }
    let n = truth.len().max(1);
    let correct: usize = (0..k).map(|i| confusion[i][i]).sum();
    let f1: f64 = (0..k)
        .map(|i| {
            let tp = confusion[i][i] as f64;
            let predicted: usize = (0..k).map(|t| confusion[t][i]).sum();
            let actual: usize = confusion[i].iter().sum();
            if predicted + actual == 0 {
                0.0
            } else {
                2.0 * tp / (predicted + actual) as f64
            }
        })
        .sum::<f64>()
        / k as f64;
    let find = |name: &str| labels.iter().position(|l| l == name);
    let polar_accuracy = find("positive").zip(find("negative")).map(|(pos, neg)| {
        let rows: Vec<(usize, &Vec<f32>)> = truth
            .iter()
            .copied()
            .zip(probabilities)
            .filter(|(t, _)| *t == pos || *t == neg)
            .collect();
        let right = rows
            .iter()
            .filter(|(t, p)| argmax(p, &[pos, neg]) == *t)
            .count();
        right as f64 / rows.len().max(1) as f64
    });
    Metrics {
        examples: truth.len(),
        accuracy: correct as f64 / n as f64,
        macro_f1: f1,
        confusion,
        polar_accuracy,
    }
}

/// Prints metrics as a short report with the confusion matrix.
pub fn print_metrics(title: &str, labels: &[String], m: &Metrics) {
    println!(
        "{title}: {} examples, accuracy {:.3}, macro-F1 {:.3}{}",
        m.examples,
        m.accuracy,
        m.macro_f1,
        m.polar_accuracy
            .map(|p| format!(", positive-vs-negative accuracy {p:.3}"))
            .unwrap_or_default()
    );
    let width = labels.iter().map(String::len).max().unwrap_or(5).max(5);
    let first = width.max("true \\ predicted".len());
    print!("  {:>first$} |", "true \\ predicted");
    for l in labels {
        print!(" {l:>width$}");
    }
    println!();
    for (l, row) in labels.iter().zip(&m.confusion) {
        print!("  {l:>first$} |");
        for c in row {
            print!(" {c:>width$}");
        }
        println!();
    }
}
