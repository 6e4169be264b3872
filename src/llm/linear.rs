//! Loading a GGUF's projections for our kernels ([`super::kernels`]): Q4_0, Q4_1 and Q8_0 tensors
//! are used as stored; Q4_K's 4-bit weights are kept as they are and only regrouped into Q4_1
//! blocks (each 32-weight sub-block's scale and minimum become one block's f16 `d` and `m`); any
//! other type is converted to Q8_0 once at load.

use std::io::{Read, Seek};
use std::sync::{Arc, OnceLock};

use candle_core::Device;
use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::Content;

use super::LlmError;
use super::kernels::{Format, Isa, QActs, QMatrix, matmul_cols};

/// How projections run: the kernels' instruction set, and the threads the columns are split over.
pub(crate) struct Compute {
    pub isa: Isa,
    threads: usize,
    /// The threads of a caller that has none of its own (tests, benches), started on first use.
    /// The chat engine runs its passes in a pool built on its own thread ([`Self::pool_here`]).
    pool: OnceLock<rayon::ThreadPool>,
}

impl Compute {
    pub(crate) fn new(isa: Isa, threads: usize) -> Self {
        Self {
            isa,
            threads: threads.max(1),
            pool: OnceLock::new(),
        }
    }

    pub(crate) fn threads(&self) -> usize {
        self.threads
    }

    fn builder(&self) -> rayon::ThreadPoolBuilder {
        rayon::ThreadPoolBuilder::new()
            .num_threads(self.threads)
            .thread_name(|i| format!("chat-compute-{i}"))
    }

    /// A pool of the compute threads whose first thread is the calling one, from now on and for
    /// as long as the pool lives (`None` with one thread: the passes run here anyway). The passes
    /// this thread runs then start where they are called, and return with no thread to wake:
    /// otherwise each one is handed to a pool thread and this one sleeps until it is done, and
    /// after a pause, waking it on a core gone idle took about a millisecond.
    pub(crate) fn pool_here(&self) -> Option<rayon::ThreadPool> {
        if self.threads == 1 {
            return None;
        }
        self.builder()
            .use_current_thread()
            .build()
            .inspect_err(
                |e| tracing::warn!(error = %e, "no compute pool on the chat engine's thread"),
            )
            .ok()
    }

    /// Runs `f` among the compute threads, so that the splits inside it start without waking a
    /// sleeping thread: here when this thread is one of a pool of that many (the engine's,
    /// [`Self::pool_here`]) or there is one thread, else on the pool of this `Compute`'s own.
    pub(crate) fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let here =
            rayon::current_thread_index().is_some() && rayon::current_num_threads() == self.threads;
        if self.threads == 1 || here {
            return f();
        }
        self.pool
            .get_or_init(|| {
                self.builder()
                    .build()
                    .expect("start the chat compute threads")
            })
            .install(f)
    }

    /// Runs `work` on every task, spread over the compute threads; each thread keeps one scratch
    /// value from `scratch` for all the tasks it runs.
    pub(crate) fn each<T: Send, S>(
        &self,
        tasks: Vec<T>,
        scratch: impl Fn() -> S + Send + Sync,
        work: impl Fn(&mut S, T) + Send + Sync,
    ) {
        if self.threads > 1 && tasks.len() > 1 {
            self.run(|| {
                use rayon::prelude::*;
                tasks.into_par_iter().for_each_init(&scratch, &work)
            })
        } else {
            let mut s = scratch();
            tasks.into_iter().for_each(|t| work(&mut s, t));
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
        None if t.dtype() == GgmlDType::Q4K => {
            let blocks = q4k_as_q4_1(&t.data()?).ok_or_else(|| load(&"truncated Q4_K data"))?;
            Ok(QMatrix::new(Format::Q4_1, n, k, blocks)?)
        }
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

/// Bytes of a Q4_K super-block: f16 `d` and `dmin`, twelve bytes of 6-bit scales and minimums
/// for its eight sub-blocks, then 128 bytes of 4-bit weights.
const Q4K_BYTES: usize = 144;

/// Q4_K super-blocks of 256 weights as Q4_1 blocks of 32, the same 4-bit weights: sub-block `j`
/// reads `d·scale_j·q − dmin·min_j`, which is a Q4_1 block with `d = d·scale_j` and
/// `m = −dmin·min_j` (rounded to f16, a relative 2⁻¹² at most, far below the 4-bit step). `None`
/// when the data is not whole super-blocks.
fn q4k_as_q4_1(data: &[u8]) -> Option<Vec<u8>> {
    if !data.len().is_multiple_of(Q4K_BYTES) {
        return None;
    }
    let f16 = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
    let mut out = Vec::with_capacity(data.len() / Q4K_BYTES * 8 * 20);
    for sb in data.chunks_exact(Q4K_BYTES) {
        let (d, dmin, scales, qs) = (f16(&sb[0..2]), f16(&sb[2..4]), &sb[4..16], &sb[16..]);
        for j in 0..8 {
            // The 6-bit scale and minimum of sub-block j (ggml's `get_scale_min_k4`).
            let (sc, m) = if j < 4 {
                (scales[j] & 63, scales[j + 4] & 63)
            } else {
                (
                    (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4),
                    (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
                )
            };
            out.extend(half::f16::from_f32(d * f32::from(sc)).to_le_bytes());
            out.extend(half::f16::from_f32(-dmin * f32::from(m)).to_le_bytes());
            // Sub-blocks 2i and 2i+1 share 32 bytes: low nibbles, then high ones. A Q4_1 block
            // holds weight l in the low nibble of byte l and weight l+16 in its high nibble.
            let chunk = &qs[(j / 2) * 32..(j / 2) * 32 + 32];
            let q = |l: usize| {
                if j % 2 == 0 {
                    chunk[l] & 0xF
                } else {
                    chunk[l] >> 4
                }
            };
            out.extend((0..16).map(|l| q(l) | (q(l + 16) << 4)));
        }
    }
    Some(out)
}

/// A projection whose output columns may be several weight matrices side by side (q|k|v,
/// gate|up): one call quantises the activations once for all of them. Neighbours of one format
/// are stacked into one matrix; a GGUF that mixes formats within a projection (Q4_K_M's q and k
/// in Q4_K, v in Q6_K) keeps one matrix per format, each run on its own kernel.
pub(crate) struct Linear {
    parts: Vec<Arc<QMatrix>>,
}

/// Columns below which a projection is not split between threads: the hand-off (a few µs) would
/// cost more than the work.
const MIN_SPLIT_COLUMNS: usize = 256;

impl Linear {
    pub(crate) fn new(weights: Arc<QMatrix>) -> Self {
        Self {
            parts: vec![weights],
        }
    }

    pub(crate) fn stacked(parts: Vec<QMatrix>) -> Result<Self, LlmError> {
        let mut groups: Vec<Vec<QMatrix>> = Vec::new();
        for part in parts {
            match groups.last_mut() {
                Some(group) if group[0].format() == part.format() => group.push(part),
                _ => groups.push(vec![part]),
            }
        }
        let parts = groups
            .into_iter()
            .map(|g| Ok(Arc::new(QMatrix::stack(g)?)))
            .collect::<Result<_, LlmError>>()?;
        Ok(Self { parts })
    }

    /// `[rows, k]` → `[rows, out]`, row-major. The columns are split between the compute threads;
    /// each element is computed the same way whatever the split (see [`super::kernels`]).
    pub(crate) fn forward(&self, compute: &Compute, x: &[f32], rows: usize) -> Vec<f32> {
        let acts = QActs::quantize(x, rows, self.parts[0].cols());
        if let [w] = self.parts.as_slice() {
            return project(compute, w, &acts, rows);
        }
        let n: usize = self.parts.iter().map(|w| w.rows()).sum();
        let mut out = vec![0f32; rows * n];
        let mut at = 0;
        for w in &self.parts {
            let part = project(compute, w, &acts, rows);
            let width = w.rows();
            for r in 0..rows {
                out[r * n + at..r * n + at + width]
                    .copy_from_slice(&part[r * width..(r + 1) * width]);
            }
            at += width;
        }
        out
    }

    pub(crate) fn bytes(&self) -> usize {
        self.parts.iter().map(|w| w.bytes()).sum()
    }
}

/// `acts` times the columns of `w`: `[rows, w.rows()]`, split between the compute threads.
fn project(compute: &Compute, w: &QMatrix, acts: &QActs, rows: usize) -> Vec<f32> {
    let n = w.rows();
    let mut out = vec![0f32; rows * n];
    let threads = compute.threads();
    if threads > 1 && n >= MIN_SPLIT_COLUMNS * 2 {
        // Contiguous column ranges, a multiple of 16 wide, one per thread.
        let per = n.div_ceil(threads).next_multiple_of(16);
        let ranges: Vec<std::ops::Range<usize>> = (0..n)
            .step_by(per)
            .map(|start| start..(start + per).min(n))
            .collect();
        let parts: Vec<Vec<f32>> = compute.run(|| {
            use rayon::prelude::*;
            ranges
                .par_iter()
                .map(|cols| {
                    let mut part = vec![0f32; rows * cols.len()];
                    matmul_cols(compute.isa, w, acts, cols.clone(), &mut part);
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
    } else {
        matmul_cols(compute.isa, w, acts, 0..n, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    use super::*;

    /// A Q4_K tensor regrouped as Q4_1 holds the same weights as candle dequantises them, within
    /// the f16 rounding of the sub-block scales.
    #[test]
    fn q4k_regrouped_as_q4_1_keeps_its_weights() {
        let (n, k) = (8, 512);
        let values: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919 % 1009) as f32 / 1009.0 - 0.4) * (1.0 + (i % 13) as f32))
            .collect();
        let t = Tensor::from_vec(values, (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::Q4K).unwrap();
        let expected: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let blocks = q4k_as_q4_1(&q.data().unwrap()).unwrap();
        let m = QMatrix::new(Format::Q4_1, n, k, blocks).unwrap();
        let scale = expected.iter().fold(0f32, |a, v| a.max(v.abs()));
        let mut row = vec![0f32; k];
        for j in 0..n {
            m.dequantize_row(j, &mut row);
            for (got, want) in row.iter().zip(&expected[j * k..(j + 1) * k]) {
                assert!(
                    (got - want).abs() <= scale * 2e-3,
                    "row {j}: {got} vs {want}"
                );
            }
        }
        assert!(q4k_as_q4_1(&[0u8; 100]).is_none());
    }

    /// A thread that took the compute pool (`pool_here`) runs its passes itself, and the columns
    /// come out the same as on the `Compute`'s own threads and on one thread.
    #[test]
    fn the_pool_owner_runs_its_passes_where_it_calls_them() {
        let (n, k, rows) = (MIN_SPLIT_COLUMNS * 2 + 48, 64, 3);
        let values: Vec<f32> = (0..n * k)
            .map(|i| (i * 7919 % 1009) as f32 / 1009.0 - 0.5)
            .collect();
        let w = Linear::new(Arc::new(QMatrix::quantize_q8_0(&values, n, k).unwrap()));
        let x: Vec<f32> = (0..rows * k)
            .map(|i| (i % 17) as f32 / 17.0 - 0.3)
            .collect();
        let isa = Isa::detect();
        let alone = w.forward(&Compute::new(isa, 1), &x, rows);

        let compute = Compute::new(isa, 2);
        let caller = std::thread::current().id();
        let ran_on = compute.run(|| std::thread::current().id());
        assert_ne!(
            ran_on, caller,
            "without a pool of its own, the pass goes to a compute thread"
        );
        assert_eq!(w.forward(&compute, &x, rows), alone);

        std::thread::scope(|s| {
            s.spawn(|| {
                let owner = std::thread::current().id();
                let _pool = compute.pool_here().expect("a pool on this thread");
                assert_eq!(compute.run(|| std::thread::current().id()), owner);
                assert_eq!(rayon::current_num_threads(), 2);
                assert_eq!(w.forward(&compute, &x, rows), alone);
            });
        });
    }
}
