//! Loading quantised weights for our forward pass: the GGUF with the tensors candle has no fast
//! kernel for requantised, and projections laid out for candle's fastest CPU matmul kernels.

use std::borrow::Cow;
use std::io::Cursor;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Module, Tensor};

use super::LlmError;

/// The GGUF at `path` with the tensors candle has no fast kernel for (Q4_1, Q5_0, Q5_1)
/// requantised to Q8_0, as an in-memory GGUF: on SmolLM2 that took decoding from ≈25 to ≈73
/// tokens/s with the same greedy output (../shared/FINDINGS.md).
pub fn requantised_gguf(path: &Path) -> Result<(Content, Cursor<Vec<u8>>), LlmError> {
    let device = Device::Cpu;
    let load = |e: &dyn std::fmt::Display| LlmError::Load(format!("{}: {e}", path.display()));
    let mut file = std::fs::File::open(path).map_err(|e| load(&e))?;
    let content = Content::read(&mut file).map_err(|e| load(&e))?;
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors = Vec::with_capacity(names.len());
    for name in names {
        let tensor = content
            .tensor(&mut file, name, &device)
            .map_err(|e| load(&e))?;
        let tensor = match tensor.dtype() {
            GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 => {
                QTensor::quantize(&tensor.dequantize(&device)?, GgmlDType::Q8_0)?
            }
            _ => tensor,
        };
        tensors.push((name.clone(), tensor));
    }
    let metadata: Vec<(&str, &Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut rewritten = Cursor::new(Vec::new());
    gguf_file::write(&mut rewritten, &metadata, &refs)?;
    drop(tensors);
    rewritten.set_position(0);
    let content = Content::read(&mut rewritten)?;
    Ok((content, rewritten))
}

/// candle's fast x86 kernels for Q8_0 (weights repacked in 16-row tiles, activations quantised
/// per 256 values, AVX-512 VNNI) only take inputs whose width is a multiple of 256. SmolLM2's width
/// is 576: padding it to 768 with zero weights does a third more arithmetic yet runs 4–10× faster
/// than the generic Q8_0 dot products, and reuses each weight tile for every row of a batch
/// (measured on this machine, one thread: [4, 576]×[576, 3072] 591 µs, [4, 768]×[768, 3072] 53 µs).
const FAST_WIDTH: usize = 256;

/// Which matmul kernels the weights are laid out for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// Q8_0 weights padded to a multiple of [`FAST_WIDTH`] for candle's tiled VNNI kernels. Their
    /// activations are quantised per 256 values rather than per 32, so the logits differ a little
    /// from the reference (tests/llm_llama.rs measures by how much).
    Fast,
    /// The kernels candle's `quantized_llama` uses: bit-identical logits on short prompts.
    Reference,
}

/// A projection whose output columns are several weight matrices side by side (q|k|v, gate|up):
/// one matmul instead of three means one pass of the thread pool's barrier instead of three.
pub(crate) struct Linear {
    matmul: QMatMul,
    /// Input width, and the padded width the matmul takes.
    k: usize,
    padded: usize,
    out: usize,
}

impl Linear {
    /// Stacks the rows of `parts` (`[out_i, in]` each) into one `[Σ out_i, in]` matrix. Rows are
    /// whole quantisation blocks, so stacking is concatenating their bytes; padding a Q8_0 row is
    /// appending zero blocks (scale 0).
    pub(crate) fn stacked(parts: Vec<QTensor>, kernels: Kernels) -> Result<Self, LlmError> {
        let dtype = parts[0].dtype();
        let (_, k) = parts[0].shape().dims2()?;
        let padded = if dtype == GgmlDType::Q8_0 && kernels == Kernels::Fast {
            k.next_multiple_of(FAST_WIDTH)
        } else {
            k
        };
        let row = k / dtype.block_size() * dtype.type_size();
        let pad = vec![0u8; (padded - k) / dtype.block_size() * dtype.type_size()];
        let mut out = 0;
        let mut bytes = Vec::new();
        for part in &parts {
            let (n, pk) = part.shape().dims2()?;
            if part.dtype() != dtype || pk != k {
                return Err(LlmError::Load("projections of mixed types".into()));
            }
            out += n;
            for r in part.data()?.chunks_exact(row) {
                bytes.extend_from_slice(r);
                bytes.extend_from_slice(&pad);
            }
        }
        let storage = QStorage::from_data(Cow::Owned(bytes), &Device::Cpu, dtype)?;
        let matmul = QMatMul::from_qtensor(QTensor::new(storage, (out, padded))?)?;
        Ok(Self {
            matmul,
            k,
            padded,
            out,
        })
    }

    /// `[rows, k]` → `[rows, out]`, row-major.
    pub(crate) fn forward(&self, x: &[f32], rows: usize) -> Result<Vec<f32>, LlmError> {
        let x = if self.padded == self.k {
            Tensor::from_slice(x, (rows, self.k), &Device::Cpu)?
        } else {
            let mut p = vec![0f32; rows * self.padded];
            for (dst, src) in p.chunks_exact_mut(self.padded).zip(x.chunks_exact(self.k)) {
                dst[..self.k].copy_from_slice(src);
            }
            Tensor::from_vec(p, (rows, self.padded), &Device::Cpu)?
        };
        let y = self.matmul.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
        debug_assert_eq!(y.len(), rows * self.out);
        Ok(y)
    }
}
