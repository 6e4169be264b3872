//! Loading a GGUF's projections for our kernels ([`super::kernels`]): Q4_0, Q4_1 and Q8_0 tensors
//! are used as stored; any other type is converted to Q8_0 once at load.

use std::io::{Read, Seek};
use std::sync::Arc;

use candle_core::Device;
use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::Content;

use super::LlmError;
use super::kernels::{Format, Isa, QActs, QMatrix, matmul_cols};

/// How projections run: the kernels' instruction set, and the threads the columns are split over.
pub(crate) struct Compute {
    pub isa: Isa,
    /// `None`: on the calling thread alone.
    pool: Option<rayon::ThreadPool>,
}

impl Compute {
    pub(crate) fn new(isa: Isa, threads: usize) -> Self {
        let pool = (threads > 1).then(|| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(|i| format!("chat-compute-{i}"))
                .build()
                .expect("start the chat compute threads")
        });
        Self { isa, pool }
    }

    pub(crate) fn threads(&self) -> usize {
        self.pool.as_ref().map_or(1, |p| p.current_num_threads())
    }

    /// Runs `f` on one of the compute threads (on this one when there are none): the splits
    /// inside it then start without waking a sleeping thread.
    pub(crate) fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(pool) => pool.install(f),
            None => f(),
        }
    }

    /// Runs `work` on every task, spread over the compute threads; each thread keeps one scratch
    /// value from `scratch` for all the tasks it runs.
    pub(crate) fn each<T: Send, S>(
        &self,
        tasks: Vec<T>,
        scratch: impl Fn() -> S + Send + Sync,
        work: impl Fn(&mut S, T) + Send + Sync,
    ) {
        match &self.pool {
            Some(pool) if tasks.len() > 1 => pool.install(|| {
                use rayon::prelude::*;
                tasks.into_par_iter().for_each_init(&scratch, &work)
            }),
            _ => {
                let mut s = scratch();
                tasks.into_iter().for_each(|t| work(&mut s, t));
            }
        }
    }
}

/// The tensor `name` of the GGUF as a matrix our kernels take.
pub(crate) fn load_matrix<R: Read + Seek>(
    ct: &Content,
    r: &mut R,
    name: &str,
) -> Result<QMatrix, LlmError> {
    let load = |e: &dyn std::fmt::Display| LlmError::Load(format!("{name}: {e}"));
    let t = ct.tensor(r, name, &Device::Cpu).map_err(|e| load(&e))?;
    let (n, k) = t.shape().dims2().map_err(|e| load(&e))?;
    let format = match t.dtype() {
        GgmlDType::Q4_0 => Some(Format::Q4_0),
        GgmlDType::Q4_1 => Some(Format::Q4_1),
        GgmlDType::Q8_0 => Some(Format::Q8_0),
        _ => None,
    };
    match format {
        Some(format) => Ok(QMatrix::new(format, n, k, t.data()?.into_owned())?),
        None => {
            tracing::info!(tensor = name, dtype = ?t.dtype(), "converted to Q8_0 (no kernel for its type)");
            let values = t
                .dequantize(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            Ok(QMatrix::quantize_q8_0(&values, n, k)?)
        }
    }
}

/// A projection whose output columns may be several weight matrices side by side (q|k|v,
/// gate|up): one call quantises the activations once for all of them.
pub(crate) struct Linear {
    weights: Arc<QMatrix>,
}

/// Columns below which a projection is not split between threads: the hand-off (a few µs) would
/// cost more than the work.
const MIN_SPLIT_COLUMNS: usize = 256;

impl Linear {
    pub(crate) fn new(weights: Arc<QMatrix>) -> Self {
        Self { weights }
    }

    pub(crate) fn stacked(parts: Vec<QMatrix>) -> Result<Self, LlmError> {
        Ok(Self::new(Arc::new(QMatrix::stack(parts)?)))
    }

    /// `[rows, k]` → `[rows, out]`, row-major. The columns are split between the compute threads;
    /// each element is computed the same way whatever the split (see [`super::kernels`]).
    pub(crate) fn forward(&self, compute: &Compute, x: &[f32], rows: usize) -> Vec<f32> {
        let w = &self.weights;
        let acts = QActs::quantize(x, rows, w.cols());
        let n = w.rows();
        let mut out = vec![0f32; rows * n];
        let threads = compute.threads();
        match &compute.pool {
            Some(pool) if n >= MIN_SPLIT_COLUMNS * 2 => {
                // Contiguous column ranges, a multiple of 16 wide, one per thread.
                let per = n.div_ceil(threads).next_multiple_of(16);
                let ranges: Vec<std::ops::Range<usize>> = (0..n)
                    .step_by(per)
                    .map(|start| start..(start + per).min(n))
                    .collect();
                let parts: Vec<Vec<f32>> = pool.install(|| {
                    use rayon::prelude::*;
                    ranges
                        .par_iter()
                        .map(|cols| {
                            let mut part = vec![0f32; rows * cols.len()];
                            matmul_cols(compute.isa, w, &acts, cols.clone(), &mut part);
                            part
                        })
                        .collect()
                });
                for (cols, part) in ranges.iter().zip(&parts) {
                    let width = cols.len();
                    for r in 0..rows {
                        out[r * n + cols.start..r * n + cols.end]
                            .copy_from_slice(&part[r * width..(r + 1) * width]);
                    }
                }
            }
            _ => matmul_cols(compute.isa, w, &acts, 0..n, &mut out),
        }
        out
    }

    pub(crate) fn bytes(&self) -> usize {
        self.weights.bytes()
    }
}
