//! A BERT encoder tuned for CPU batches: the token-wise layers (projections, feed-forward, layer norms)
//! run on the batch's real tokens packed end to end, so padding costs nothing there; only attention
//! sees a padded view. Q, K and V are one fused projection, and GELU uses a vectorisable erf.

use candle_core::{CpuStorage, CustomOp1, Layout, Module, Shape, Tensor};
use candle_nn::{LayerNorm, Linear, VarBuilder, layer_norm, linear};
use candle_transformers::models::bert::{Config, HiddenAct};
use rayon::prelude::*;

struct Layer {
    qkv: Linear,
    attention_out: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

pub struct Encoder {
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    embedding_norm: LayerNorm,
    layers: Vec<Layer>,
    heads: usize,
    head_dim: usize,
    act: HiddenAct,
}

/// The sequences of one forward pass, as token ids with their type ids.
pub struct Batch<'a> {
    pub ids: Vec<&'a [u32]>,
    pub type_ids: Vec<&'a [u32]>,
}

impl Encoder {
    pub fn load(vb: VarBuilder, config: &Config) -> candle_core::Result<Self> {
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else {
            vb
        };
        let h = config.hidden_size;
        let eps = config.layer_norm_eps;
        let emb = vb.pp("embeddings");
        let table = |name: &str, rows: usize| emb.pp(name).get((rows, h), "weight");
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let l = vb.pp(format!("encoder.layer.{i}"));
                let attn = l.pp("attention");
                let part = |name: &str| linear(h, h, attn.pp("self").pp(name));
                let (q, k, v) = (part("query")?, part("key")?, part("value")?);
                let weight = Tensor::cat(&[q.weight(), k.weight(), v.weight()], 0)?;
                let bias = Tensor::cat(
                    &[q.bias().unwrap(), k.bias().unwrap(), v.bias().unwrap()],
                    0,
                )?;
                Ok(Layer {
                    qkv: Linear::new(weight, Some(bias)),
                    attention_out: linear(h, h, attn.pp("output.dense"))?,
                    attention_norm: layer_norm(h, eps, attn.pp("output.LayerNorm"))?,
                    intermediate: linear(h, config.intermediate_size, l.pp("intermediate.dense"))?,
                    output: linear(config.intermediate_size, h, l.pp("output.dense"))?,
                    output_norm: layer_norm(h, eps, l.pp("output.LayerNorm"))?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            word: table("word_embeddings", config.vocab_size)?,
            position: table("position_embeddings", config.max_position_embeddings)?,
            token_type: table("token_type_embeddings", config.type_vocab_size)?,
            embedding_norm: layer_norm(h, eps, emb.pp("LayerNorm"))?,
            layers,
            heads: config.num_attention_heads,
            head_dim: h / config.num_attention_heads,
            act: config.hidden_act,
        })
    }

    /// The last hidden state of every real token, packed: `[total tokens, hidden]`, sequence after
    /// sequence in batch order.
    pub fn forward(&self, batch: &Batch) -> candle_core::Result<Tensor> {
        let device = self.word.device();
        let lens: Vec<usize> = batch.ids.iter().map(|s| s.len()).collect();
        let (n, longest) = (lens.len(), lens.iter().copied().max().unwrap_or(1));
        let total: usize = lens.iter().sum();

        let ids: Vec<u32> = batch.ids.iter().flat_map(|s| s.iter().copied()).collect();
        let types: Vec<u32> = batch
            .type_ids
            .iter()
            .flat_map(|s| s.iter().copied())
            .collect();
        let positions: Vec<u32> = lens.iter().flat_map(|&l| 0..l as u32).collect();
        // Padded slot (b, p) reads packed token offset_b + p, or token 0 when p is padding (masked).
        let mut to_padded = vec![0u32; n * longest];
        let mut to_packed = Vec::with_capacity(total);
        let mut mask = vec![f32::MIN; n * longest];
        let mut offset = 0;
        for (b, &len) in lens.iter().enumerate() {
            for p in 0..len {
                to_padded[b * longest + p] = (offset + p) as u32;
                to_packed.push((b * longest + p) as u32);
                mask[b * longest + p] = 0.0;
            }
            offset += len;
        }
        let to_padded = Tensor::from_vec(to_padded, n * longest, device)?;
        let to_packed = Tensor::from_vec(to_packed, total, device)?;
        let mask = Tensor::from_vec(mask, (n, 1, 1, longest), device)?;

        let embedded = (self
            .word
            .embedding(&Tensor::from_vec(ids, total, device)?)?
            + self
                .position
                .embedding(&Tensor::from_vec(positions, total, device)?)?)?
            + self
                .token_type
                .embedding(&Tensor::from_vec(types, total, device)?)?;
        let mut x = self.embedding_norm.forward(&embedded?)?;
        let h = self.heads * self.head_dim;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        for layer in &self.layers {
            let qkv = layer
                .qkv
                .forward(&x)?
                .index_select(&to_padded, 0)?
                .reshape((n, longest, 3, self.heads, self.head_dim))?;
            let part = |i: usize| {
                qkv.narrow(2, i, 1)?
                    .squeeze(2)?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let (q, k, v) = (part(0)?, part(1)?, part(2)?);
            let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&mask)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let context = probs
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((n * longest, h))?
                .index_select(&to_packed, 0)?;
            let attended = layer.attention_out.forward(&context)?;
            x = layer.attention_norm.forward(&(attended + &x)?)?;
            let hidden = layer.intermediate.forward(&x)?;
            let hidden = match self.act {
                HiddenAct::Gelu => hidden.apply_op1_no_bwd(&GeluErf)?,
                HiddenAct::GeluApproximate => hidden.gelu()?,
                HiddenAct::Relu => hidden.relu()?,
            };
            x = layer
                .output_norm
                .forward(&(layer.output.forward(&hidden)? + &x)?)?;
        }
        Ok(x)
    }
}

/// Mean of each sequence's token states: `[sequences, hidden]` from packed `[tokens, hidden]`.
pub fn mean_pool(packed: &Tensor, lens: &[usize]) -> candle_core::Result<Tensor> {
    let total: usize = lens.iter().sum();
    let mut weights = vec![0f32; lens.len() * total];
    let mut offset = 0;
    for (b, &len) in lens.iter().enumerate() {
        weights[b * total + offset..b * total + offset + len].fill(1.0 / len as f32);
        offset += len;
    }
    Tensor::from_vec(weights, (lens.len(), total), packed.device())?.matmul(packed)
}

/// The first token's state of each sequence (`[CLS]` pooling).
pub fn first_token(packed: &Tensor, lens: &[usize]) -> candle_core::Result<Tensor> {
    let starts: Vec<u32> = lens
        .iter()
        .scan(0u32, |offset, &len| {
            let start = *offset;
            *offset += len as u32;
            Some(start)
        })
        .collect();
    let n = starts.len();
    packed.index_select(&Tensor::from_vec(starts, n, packed.device())?, 0)
}

/// GELU with the exact erf form, computed with a rational approximation of erf that is accurate to
/// float precision and, unlike libm's `erff`, vectorises.
struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf-vectorised"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(data), Some((start, end))) = (storage, layout.contiguous_offsets())
        else {
            candle_core::bail!("gelu-erf-vectorised wants a contiguous f32 tensor");
        };
        let src = &data[start..end];
        let mut out = vec![0f32; src.len()];
        // pulp compiles the loop for the best instruction set this CPU has (AVX-512 or AVX2 with
        // FMA), chosen at run time, so that it vectorises and `mul_add` is one instruction.
        let arch = pulp::Arch::new();
        out.par_chunks_mut(16 * 1024)
            .zip(src.par_chunks(16 * 1024))
            .for_each(|(out, src)| {
                arch.dispatch(|| {
                    for (o, &x) in out.iter_mut().zip(src) {
                        *o = 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
                    }
                })
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// erf as a ratio of an odd and an even polynomial on [-4, 4] (outside it erf is ±1 in f32); the
/// coefficients are those of Eigen's and XLA's float erf.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2.mul_add(-2.726_142_3e-10, 2.770_681_4e-8);
    p = x2.mul_add(p, -2.101_024e-6);
    p = x2.mul_add(p, -5.692_506_4e-5);
    p = x2.mul_add(p, -7.349_906e-4);
    p = x2.mul_add(p, -2.954_6e-3);
    p = x2.mul_add(p, -1.609_603_3e-2);
    let mut q = x2.mul_add(-1.456_607_2e-5, -2.133_740_6e-4);
    q = x2.mul_add(q, -1.682_827e-3);
    q = x2.mul_add(q, -7.373_329e-3);
    q = x2.mul_add(q, -1.426_474e-2);
    x * p / q
}

#[cfg(test)]
mod tests {
    use super::*;

    /// erf in double precision from its Maclaurin series,
    /// 2/sqrt(pi) * sum_n (-1)^n x^(2n+1) / (n! (2n+1)), accurate enough for |x| <= 4.
    fn erf_reference(x: f64) -> f64 {
        let mut sum = 0.0;
        let mut term = x;
        for n in 0..200 {
            let add = term / (2 * n + 1) as f64;
            sum += add;
            term *= -x * x / (n + 1) as f64;
            if add.abs() < 1e-17 {
                break;
            }
        }
        (2.0 / std::f64::consts::PI.sqrt() * sum).clamp(-1.0, 1.0)
    }

    #[test]
    fn the_vectorised_erf_matches_the_exact_one() {
        let mut worst = 0f64;
        for i in -5000..=5000 {
            let x = i as f64 / 1000.0;
            let err = (erf(x as f32) as f64 - erf_reference(x.clamp(-4.0, 4.0))).abs();
            worst = worst.max(err);
        }
        assert!(worst < 2e-6, "worst error {worst}");
    }
}
