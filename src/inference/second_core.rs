//! A lone pass on two cores. Each embedding worker runs its passes on one compute thread, which is
//! right under load (every core runs a batch) but leaves a lone request on an idle server using one
//! core of two: the few-rows projections, ≈80% of a short sentence's pass, are compute-bound.
//!
//! While exactly one pass runs in the process, [`dense`] shares each projection's columns with a
//! helper thread that polls for the length of that pass, so a hand-off costs about a microsecond
//! instead of a sleeping thread's wake-up. The columns go in chunks, half of them the pass's and
//! half the helper's, each thread running its own from the lowest up and then, if the other's are
//! not all taken, the other's from the highest down: a helper that starts late, or is starved of
//! its core (chat generating, another process), leaves more chunks to the pass, which then waits at
//! most for the one chunk the helper is running. (Halves fixed in advance had the pass wait for the
//! helper's whole half: on an AMD EPYC Zen 4, 10% of a lone pass's thread.) Each thread's own
//! chunks go up because the kernels ask for the weights after the ones they run: a helper that took
//! the chunks from the last down ran a fifth slower (AVX2 and SSE2 on that Zen 4) than the pass.
//!
//! The helper must poll on the other core, not the pass's. Woken by the pass, it was often put on
//! the pass's own core by the scheduler (the other core asleep), where its polling took slices of
//! the pass: on an AMD EPYC Zen 4 VM (2 cores), a lone 10-word request after a pause helped 0 or
//! 1 of its 24 projections and took 3.2-7.8 ms where a helped pass takes 1.9-2.2. So on Linux a
//! pass keeps the helper off the core it runs on (`placement::keep_off`, one `sched_setaffinity`
//! when that core changes), and the helper yields between polls, so a core it shares with anything
//! else is not held.
//!
//! Every output column is computed by the same kernel in the same order on either thread, so the
//! vectors are the same bits with or without the helper. The unsafe sharing of the slices with the
//! helper lives in this file: the pass waits (or takes the job back) before the slices go.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::thread::Thread;

use aitier_kernels::DenseWeights;

/// Columns below which a projection is not split: the hand-off would cost more than half of it.
const MIN_SPLIT_COLUMNS: usize = 128;
/// Multiply-adds of a chunk of a split projection (whole panels, at least one): at the end of a
/// projection the pass waits for the helper's last chunk, and each chunk costs an atomic claim.
const CHUNK_MACS: usize = 256 * 1024;

const IDLE: u8 = 0;
const POSTED: u8 = 1;
const TAKEN: u8 = 2;
const DONE: u8 = 3;
/// The helper's chunk panicked: the pass runs that chunk itself (and meets the panic there).
const FAILED: u8 = 4;

/// A projection shared by the pass and the helper, in chunks of columns: two [`Share`]s, the
/// pass's (the lower chunks) and the helper's. Raw parts of slices that outlive the job (see
/// [`dense`]).
struct Job<'a> {
    /// The pass's instruction set, for both threads.
    isa: aitier_kernels::Isa,
    /// Made for several calls: SSE2 broadcasts it once per thread, not once per chunk (when it
    /// fits SSE2's scratch, as a lone pass's input does).
    input: aitier_kernels::DenseInput<'a>,
    w: RawWeights,
    bias: *const f32,
    /// Output columns, `bias`'s length.
    n: usize,
    /// `rows × n`, row-major: each chunk's columns are written by the thread that claimed it.
    out: *mut f32,
    /// Columns per chunk (the last may be narrower): whole panels.
    chunk: usize,
    /// The pass's chunks, then the helper's.
    shares: [Share; 2],
    /// The chunk the helper was running when it panicked, for the pass to run again.
    lost: AtomicUsize,
}

impl Job<'_> {
    /// The next chunk for the pass (`helper` false) or the helper: its own share's lowest, else the
    /// other's highest, if any is left.
    fn claim(&self, helper: bool) -> Option<usize> {
        let (own, other) = (
            &self.shares[usize::from(helper)],
            &self.shares[usize::from(!helper)],
        );
        own.take(true).or_else(|| other.take(false))
    }

    /// Chunk `c` into its columns of the output, through `scratch`.
    ///
    /// # Safety
    /// The job's slices must be alive, and chunk `c` claimed by the caller alone.
    unsafe fn run(&self, c: usize, scratch: &mut Vec<f32>) {
        let (j0, j1) = (c * self.chunk, ((c + 1) * self.chunk).min(self.n));
        let cols = j1 - j0;
        // SAFETY: the caller's; the weights and `bias` are only read, by both threads.
        let (w, bias) = unsafe { (self.w.get(), std::slice::from_raw_parts(self.bias, self.n)) };
        let rows = self.input.rows();
        let k = self.input.x().len() / rows;
        scratch.resize(rows * cols, 0.0);
        aitier_kernels::dense_input(
            self.isa,
            self.input,
            w.rows(j0..j1, k),
            Some(&bias[j0..j1]),
            scratch,
        );
        for (r, values) in scratch.chunks_exact(cols).enumerate() {
            // SAFETY: columns `j0..j1` of row `r < rows` lie within the `rows × n` output, and
            // no other thread touches them: the chunk is the caller's alone.
            unsafe {
                std::ptr::copy_nonoverlapping(values.as_ptr(), self.out.add(r * self.n + j0), cols)
            };
        }
    }
}

/// One thread's chunks of a [`Job`], `front..back` packed in one word: that thread takes them
/// from the front, the other thread (done with its own) from the back, each chunk once.
struct Share(AtomicU64);

impl Share {
    fn new(front: usize, back: usize) -> Self {
        assert!(front <= back && back <= u32::MAX as usize);
        Share(AtomicU64::new(((front as u64) << 32) | back as u64))
    }

    /// The lowest chunk left (`front`) or the highest, if any.
    fn take(&self, front: bool) -> Option<usize> {
        let mut now = self.0.load(Ordering::Acquire);
        loop {
            let (lo, hi) = (now >> 32, now & u64::from(u32::MAX));
            if lo >= hi {
                return None;
            }
            let (next, chunk) = match front {
                true => (now + (1 << 32), lo),
                false => (now - 1, hi - 1),
            };
            match self
                .0
                .compare_exchange_weak(now, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(chunk as usize),
                Err(seen) => now = seen,
            }
        }
    }
}

/// A [`DenseWeights`] slice as raw parts.
#[derive(Clone, Copy)]
enum RawWeights {
    F32(*const f32, usize),
    F16(*const half::f16, usize),
    Panels(*const half::f16, usize),
}

impl RawWeights {
    fn new(w: DenseWeights) -> Self {
        match w {
            DenseWeights::F32(w) => RawWeights::F32(w.as_ptr(), w.len()),
            DenseWeights::F16(w) => RawWeights::F16(w.as_ptr(), w.len()),
            DenseWeights::Panels(w) => RawWeights::Panels(w.as_ptr(), w.len()),
        }
    }

    /// # Safety
    /// The slice these parts came from must be alive and not written for `'a`.
    unsafe fn get<'a>(self) -> DenseWeights<'a> {
        // SAFETY: the caller's.
        unsafe {
            match self {
                RawWeights::F32(p, len) => DenseWeights::F32(std::slice::from_raw_parts(p, len)),
                RawWeights::F16(p, len) => DenseWeights::F16(std::slice::from_raw_parts(p, len)),
                RawWeights::Panels(p, len) => {
                    DenseWeights::Panels(std::slice::from_raw_parts(p, len))
                }
            }
        }
    }
}

/// A [`Job`] on the pass's stack, as the helper sees it (its borrows' lifetime erased).
#[derive(Clone, Copy)]
struct Posted(*const Job<'static>);

// SAFETY: a job only travels to the helper while the pass that posted it waits for it to be done
// (or takes it back), so the job and the slices it points into are alive meanwhile; the two
// threads touch disjoint chunks of the output, each claimed once through an atomic share.
unsafe impl Send for Posted {}

struct Helper {
    state: AtomicU8,
    task: Mutex<Option<Posted>>,
    /// Set while a pass may post tasks: the helper spins; cleared, it parks.
    active: AtomicBool,
    thread: Thread,
}

/// Passes running now, in every embedding and classifier pool.
static PASSES: AtomicUsize = AtomicUsize::new(0);
static HELPER: OnceLock<Option<Helper>> = OnceLock::new();

thread_local! {
    /// Whether this thread's pass may use the helper.
    static SPLIT: Cell<bool> = const { Cell::new(false) };
}

/// Projections the helper has run a chunk of since start-up.
static HELPED: AtomicUsize = AtomicUsize::new(0);

/// The cores the helper may run on now, on Linux (for tests): all the process's but the core of
/// the last lone pass.
pub use placement::helper_cores;

/// Projections the helper has run a chunk of since start-up (for tests and logs).
pub fn helped() -> usize {
    HELPED.load(Ordering::Relaxed)
}

fn helper() -> Option<&'static Helper> {
    HELPER
        .get_or_init(|| {
            // No second core, no helper.
            if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
                return None;
            }
            let spawned = std::thread::Builder::new()
                .name("embed-second-core".into())
                .spawn(|| {
                    placement::record();
                    // HELPER is set as soon as the thread that spawned this one returns.
                    loop {
                        match HELPER.get() {
                            Some(Some(helper)) => helper.serve(),
                            Some(None) => return,
                            None => std::thread::yield_now(),
                        }
                    }
                });
            match spawned {
                Ok(handle) => Some(Helper {
                    state: AtomicU8::new(IDLE),
                    task: Mutex::new(None),
                    active: AtomicBool::new(false),
                    thread: handle.thread().clone(),
                }),
                Err(e) => {
                    tracing::warn!(error = %e, "no second-core helper: lone passes use one core");
                    None
                }
            }
        })
        .as_ref()
}

impl Helper {
    fn serve(&self) -> ! {
        loop {
            while !self.active.load(Ordering::Acquire) {
                std::thread::park();
            }
            while self.active.load(Ordering::Acquire) {
                if self
                    .state
                    .compare_exchange(POSTED, TAKEN, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    let task = self
                        .task
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .take();
                    if let Some(Posted(job)) = task {
                        // SAFETY: see `Posted`; the pass waits for DONE or FAILED before the job
                        // goes.
                        let job = unsafe { &*job };
                        let (mut taken, mut scratch) = (0, Vec::new());
                        // A panic here must not leave the pass waiting, nor a chunk unwritten:
                        // it is caught, and the pass runs that chunk itself.
                        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            while let Some(c) = job.claim(true) {
                                taken += 1;
                                job.lost.store(c, Ordering::Relaxed);
                                // SAFETY: claimed by this thread alone (see `Job`).
                                unsafe { job.run(c, &mut scratch) };
                            }
                        }));
                        if run.is_err() {
                            tracing::error!("the second-core helper's projection panicked");
                            self.state.store(FAILED, Ordering::Release);
                            continue;
                        }
                        if taken > 0 {
                            HELPED.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    self.state.store(DONE, Ordering::Release);
                } else {
                    // A system call per poll, which costs less than a projection's hand-off and
                    // leaves the core to any other thread that wants it.
                    std::thread::yield_now();
                }
            }
        }
    }
}

/// Runs one forward pass `f` on this thread, with the helper for its projections when no other
/// pass runs in the process at its start.
pub fn pass<R>(f: impl FnOnce() -> R) -> R {
    /// Restores this thread's state and counts the pass out on every way out, a panic included.
    struct Leave {
        split: bool,
        outer: bool,
    }
    impl Drop for Leave {
        fn drop(&mut self) {
            SPLIT.with(|s| s.set(self.outer));
            if self.split
                && let Some(helper) = helper()
            {
                helper.active.store(false, Ordering::Release);
            }
            PASSES.fetch_sub(1, Ordering::AcqRel);
        }
    }
    let alone = PASSES.fetch_add(1, Ordering::AcqRel) == 0;
    let split = alone && helper().is_some();
    if split && let Some(helper) = helper() {
        placement::keep_off();
        helper.active.store(true, Ordering::Release);
        helper.thread.unpark();
    }
    let outer = SPLIT.with(|s| s.replace(split));
    let _leave = Leave { split, outer };
    f()
}

/// Whether this thread's pass may hand work to the helper now.
pub fn splitting() -> bool {
    SPLIT.with(Cell::get) && PASSES.load(Ordering::Acquire) == 1
}

/// `out = x · wᵀ + bias` ([`aitier_kernels::dense`]), shared with the helper when this thread's
/// pass runs alone (see [`pass`]): in chunks of columns, the lower half the pass's and the upper the
/// helper's, each thread's own taken from the lowest up and then the other's from the highest down,
/// so that neither waits for the other longer than one chunk, even when the helper starts late.
pub fn dense(x: &[f32], rows: usize, w: DenseWeights, bias: &[f32]) -> Vec<f32> {
    let isa = aitier_kernels::Isa::detect();
    let n = bias.len();
    let split = n >= 2 * MIN_SPLIT_COLUMNS && splitting();
    let helper = match helper() {
        Some(h) if split && h.state.load(Ordering::Acquire) == IDLE => h,
        _ => return aitier_kernels::dense_new(isa, x, rows, w, Some(bias)),
    };
    assert!(rows > 0 && x.len().is_multiple_of(rows) && w.len() == n * (x.len() / rows));
    // Whole panels (which row-major weights do not need but do not mind), about `CHUNK_MACS`
    // multiply-adds each. From `AMX_ROWS` rows, two halves: on a CPU with AMX each call packs its
    // input for the tiles again.
    let k = x.len() / rows;
    let panel = aitier_kernels::PANEL;
    let chunk = match rows < aitier_kernels::AMX_ROWS {
        true => (CHUNK_MACS / (rows * k * panel)).max(1) * panel,
        false => n.div_ceil(2).next_multiple_of(panel),
    }
    .min(n);
    let mut out: Vec<f32> = Vec::with_capacity(rows * n);
    let job = Job {
        isa,
        input: aitier_kernels::DenseInput::new(x, rows),
        w: RawWeights::new(w),
        bias: bias.as_ptr(),
        n,
        out: out.as_mut_ptr(),
        chunk,
        // The pass starts first: the odd chunk is its.
        shares: {
            let chunks = n.div_ceil(chunk);
            let half = chunks.div_ceil(2);
            [Share::new(0, half), Share::new(half, chunks)]
        },
        lost: AtomicUsize::new(usize::MAX),
    };
    *helper.task.lock().unwrap_or_else(PoisonError::into_inner) =
        Some(Posted((&raw const job).cast::<Job<'static>>()));
    helper.state.store(POSTED, Ordering::Release);
    /// Until the helper is done with the job or it is taken back, the job and the slices stay
    /// borrowed: this waits on every way out of the function, a panic included.
    struct Wait<'a>(&'a Helper);
    impl Wait<'_> {
        /// The helper is done with the job: `Err` if it panicked (its chunk is then left undone).
        fn finish(&self) -> Result<(), ()> {
            if self
                .0
                .state
                .compare_exchange(POSTED, IDLE, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                self.0
                    .task
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take();
                return Ok(());
            }
            let done = loop {
                match self.0.state.load(Ordering::Acquire) {
                    DONE => break Ok(()),
                    FAILED => break Err(()),
                    _ => std::hint::spin_loop(),
                }
            };
            self.0.state.store(IDLE, Ordering::Release);
            done
        }
    }
    impl Drop for Wait<'_> {
        fn drop(&mut self) {
            // Also after DONE or FAILED (the pass panicked in its own chunk): back to IDLE, or no
            // later projection would use the helper again.
            if self.0.state.load(Ordering::Acquire) != IDLE {
                let _ = self.finish();
            }
        }
    }
    let wait = Wait(helper);
    let mut scratch = Vec::new();
    while let Some(c) = job.claim(false) {
        // SAFETY: claimed by this thread alone; the job and its slices live until `wait` is done.
        unsafe { job.run(c, &mut scratch) };
    }
    if wait.finish().is_err() {
        // SAFETY: the helper has stopped, and its chunk was claimed by no one else.
        unsafe { job.run(job.lost.load(Ordering::Relaxed), &mut scratch) };
    }
    drop(wait);
    // SAFETY: every chunk was claimed and run, by the helper (done, seen through `state`) or by
    // this thread, so each of the `rows × n` values has been written.
    unsafe { out.set_len(rows * n) };
    out
}

/// Where the helper runs: on Linux, anywhere the process may run but the core of the pass that
/// wakes it.
#[cfg(target_os = "linux")]
mod placement {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// The helper's thread id and the cores it may run on, as it started.
    static HELPER: OnceLock<(libc::pid_t, libc::cpu_set_t)> = OnceLock::new();
    /// The core the helper was last kept off (`usize::MAX`: none).
    static KEPT_OFF: AtomicUsize = AtomicUsize::new(usize::MAX);

    /// Called by the helper thread as it starts.
    pub fn record() {
        // SAFETY: `gettid` has no preconditions; `sched_getaffinity` writes at most the size
        // given into the set, which is a plain bit array that may start zeroed.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
                let _ = HELPER.set((libc::gettid(), set));
            }
        }
    }

    /// The cores the helper may run on now (`None` before it has started).
    pub fn helper_cores() -> Option<Vec<usize>> {
        let (tid, _) = HELPER.get()?;
        // SAFETY: as in `record`; `CPU_ISSET` reads the set's own bits.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(*tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0
            {
                return None;
            }
            Some(
                (0..libc::CPU_SETSIZE as usize)
                    .filter(|&c| libc::CPU_ISSET(c, &set))
                    .collect(),
            )
        }
    }

    /// Keeps the helper off the core this thread runs on now (when there is another one left).
    pub fn keep_off() {
        let Some((tid, allowed)) = HELPER.get() else {
            return;
        };
        // SAFETY: no preconditions.
        let Ok(core) = usize::try_from(unsafe { libc::sched_getcpu() }) else {
            return;
        };
        if KEPT_OFF.load(Ordering::Relaxed) == core {
            return;
        }
        let mut set = *allowed;
        // SAFETY: `CPU_CLR` and `CPU_COUNT` touch the set's own bits (`CPU_CLR` ignores a core
        // past its size); `sched_setaffinity` reads a valid set of the size given.
        let done = unsafe {
            libc::CPU_CLR(core, &mut set);
            if libc::CPU_COUNT(&set) == 0 {
                return;
            }
            libc::sched_setaffinity(*tid, std::mem::size_of::<libc::cpu_set_t>(), &set)
        };
        if done == 0 {
            KEPT_OFF.store(core, Ordering::Relaxed);
        }
    }
}

/// Elsewhere the scheduler places the helper.
#[cfg(not(target_os = "linux"))]
mod placement {
    pub fn record() {}
    pub fn keep_off() {}
    pub fn helper_cores() -> Option<Vec<usize>> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::Share;

    #[test]
    fn a_share_gives_each_chunk_once_from_either_end() {
        let share = Share::new(3, 7);
        assert_eq!(share.take(true), Some(3));
        assert_eq!(share.take(false), Some(6));
        assert_eq!(share.take(true), Some(4));
        assert_eq!(share.take(true), Some(5));
        assert_eq!(share.take(false), None);
        assert_eq!(share.take(true), None);
        assert_eq!(Share::new(2, 2).take(true), None);
        // One thread from each end at once: each chunk once, in its thread's order.
        for _ in 0..100 {
            let share = Share::new(0, 2000);
            let (up, down) = std::thread::scope(|s| {
                let take = |front| {
                    let share = &share;
                    s.spawn(move || std::iter::from_fn(|| share.take(front)).collect::<Vec<_>>())
                };
                let (up, down) = (take(true), take(false));
                (up.join().unwrap(), down.join().unwrap())
            });
            assert!(up.is_sorted() && down.iter().rev().is_sorted());
            let mut all: Vec<usize> = up.into_iter().chain(down).collect();
            all.sort();
            assert_eq!(all, (0..2000).collect::<Vec<_>>());
        }
    }
}
