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
    /// Accuracy on the rows labelled positive or negative, a `neutral` answer counting wrong (when
    /// the labels include both): what a user sorting reviews into good and bad sees.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub polar_accuracy: Option<f64>,
    /// Expected calibration error: the gap between the top score and the accuracy, averaged
    /// over ten score bins weighted by their rows. 0.05 means a score of 0.8 is right about 75–85%
    /// of the time.
    pub calibration_error: f64,
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
        let right = rows.iter().filter(|(t, p)| argmax(p, &all) == *t).count();
        right as f64 / rows.len().max(1) as f64
    });
    let mut bins = [(0usize, 0f64, 0usize); 10];
    for (&t, p) in truth.iter().zip(probabilities) {
        let top = argmax(p, &all);
        let score = f64::from(p.get(top).copied().unwrap_or(0.0));
        let bin = &mut bins[((score * 10.0) as usize).min(9)];
        bin.0 += 1;
        bin.1 += score;
        bin.2 += usize::from(top == t);
    }
    let calibration_error = bins
        .iter()
        .filter(|b| b.0 > 0)
        .map(|&(_, scores, right)| (scores - right as f64).abs() / n as f64)
        .sum();
    Metrics {
        examples: truth.len(),
        accuracy: correct as f64 / n as f64,
        macro_f1: f1,
        confusion,
        polar_accuracy,
        calibration_error,
    }
}

/// Prints metrics as a short report with the confusion matrix.
pub fn print_metrics(title: &str, labels: &[String], m: &Metrics) {
    println!(
        "{title}: {} examples, accuracy {:.3}, macro-F1 {:.3}{}, calibration error {:.3}",
        m.examples,
        m.accuracy,
        m.macro_f1,
        m.polar_accuracy
            .map(|p| format!(", positive-vs-negative accuracy {p:.3} (neutral counts wrong)"))
            .unwrap_or_default(),
        m.calibration_error
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
