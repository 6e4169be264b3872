//! A lone pass on two cores. Each embedding worker runs its passes on one compute thread, which is
//! right under load (every core runs a batch) but leaves a lone request on an idle server using one
//! core of two: the few-rows projections, ≈80% of a short sentence's pass, are compute-bound.
//!
//! While exactly one pass runs in the process, [`dense`] hands half of each projection's columns to
//! a helper thread that polls for the length of that pass, so a hand-off costs about a microsecond
//! instead of a sleeping thread's wake-up. A task the helper has not taken by the time the pass's
//! own half is done is taken back and run by the pass itself: a helper starved of its core (chat
//! generating, another process) costs at most the time of doing the work alone.
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
//! helper lives in this file: the pass waits (or takes the task back) before the slices go.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::thread::Thread;

use aitier_kernels::DenseWeights;

/// Columns below which a projection is not split: the hand-off would cost more than half of it.
const MIN_SPLIT_COLUMNS: usize = 128;

const IDLE: u8 = 0;
const POSTED: u8 = 1;
const TAKEN: u8 = 2;
const DONE: u8 = 3;
/// The helper's projection panicked: the pass runs that half itself (and meets the panic there).
const FAILED: u8 = 4;

/// Half a projection, as raw parts of slices that outlive the task (see [`dense`]).
#[derive(Clone, Copy)]
struct Task {
    x: *const f32,
    x_len: usize,
    rows: usize,
    w: RawWeights,
    bias: *const f32,
    bias_len: usize,
    out: *mut f32,
    out_len: usize,
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

// SAFETY: a task only travels to the helper while the pass that posted it waits for it to be done
// (or takes it back), so the slices it points into are alive and not touched by the pass meanwhile.
unsafe impl Send for Task {}

struct Helper {
    state: AtomicU8,
    task: Mutex<Option<Task>>,
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

/// Projections the helper has run since start-up.
static HELPED: AtomicUsize = AtomicUsize::new(0);

/// The cores the helper may run on now, on Linux (for tests): all the process's but the core of
/// the last lone pass.
pub use placement::helper_cores;

/// Projections the helper has run since start-up (for tests and logs).
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
                    if let Some(t) = task {
                        // A panic here must not leave the pass waiting, nor its half unwritten:
                        // it is caught, and the pass runs the half itself.
                        let run = std::panic::catch_unwind(|| {
                            // SAFETY: see `Task`; the pass waits for DONE before these go.
                            let (x, w, bias, out) = unsafe {
                                (
                                    std::slice::from_raw_parts(t.x, t.x_len),
                                    t.w.get(),
                                    std::slice::from_raw_parts(t.bias, t.bias_len),
                                    std::slice::from_raw_parts_mut(t.out, t.out_len),
                                )
                            };
                            aitier_kernels::dense(
                                aitier_kernels::Isa::detect(),
                                x,
                                t.rows,
                                w,
                                Some(bias),
                                out,
                            );
                        });
                        if run.is_err() {
                            tracing::error!("the second-core helper's projection panicked");
                            self.state.store(FAILED, Ordering::Release);
                            continue;
                        }
                        HELPED.fetch_add(1, Ordering::Relaxed);
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

/// `out = x · wᵀ + bias` ([`aitier_kernels::dense`]), the upper half of the columns on the helper
/// when this thread's pass runs alone (see [`pass`]).
pub fn dense(x: &[f32], rows: usize, w: DenseWeights, bias: &[f32]) -> Vec<f32> {
    let isa = aitier_kernels::Isa::detect();
    let n = bias.len();
    let split = n >= 2 * MIN_SPLIT_COLUMNS && splitting();
    let helper = match helper() {
        Some(h) if split && h.state.load(Ordering::Acquire) == IDLE => h,
        _ => return aitier_kernels::dense_new(isa, x, rows, w, Some(bias)),
    };
    let k = x.len() / rows;
    // At a panel's edge, which row-major weights do not need but do not mind.
    let low = (n / 2).next_multiple_of(aitier_kernels::PANEL).min(n);
    let mut high = vec![0f32; rows * (n - low)];
    let (w_low, w_high, b_high) = (w.rows(0..low, k), w.rows(low..n, k), &bias[low..]);
    *helper.task.lock().unwrap_or_else(PoisonError::into_inner) = Some(Task {
        x: x.as_ptr(),
        x_len: x.len(),
        rows,
        w: RawWeights::new(w_high),
        bias: b_high.as_ptr(),
        bias_len: b_high.len(),
        out: high.as_mut_ptr(),
        out_len: high.len(),
    });
    helper.state.store(POSTED, Ordering::Release);
    /// Until the helper is done with the task or it is taken back, the slices stay borrowed: this
    /// waits on every way out of the function, a panic included.
    struct Wait<'a>(&'a Helper);
    impl Wait<'_> {
        /// Whether the helper ran the task (else it was taken back, or failed: the pass runs it).
        fn finish(&self) -> bool {
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
                return false;
            }
            let done = loop {
                match self.0.state.load(Ordering::Acquire) {
                    DONE => break true,
                    FAILED => break false,
                    _ => std::hint::spin_loop(),
                }
            };
            self.0.state.store(IDLE, Ordering::Release);
            done
        }
    }
    impl Drop for Wait<'_> {
        fn drop(&mut self) {
            if matches!(self.0.state.load(Ordering::Acquire), POSTED | TAKEN) {
                self.finish();
            }
        }
    }
    let wait = Wait(helper);
    let own = aitier_kernels::dense_new(isa, x, rows, w_low, Some(&bias[..low]));
    if !wait.finish() {
        aitier_kernels::dense(isa, x, rows, w_high, Some(b_high), &mut high);
    }
    drop(wait);
    let mut out = Vec::with_capacity(rows * n);
    for (own, high) in own.chunks_exact(low).zip(high.chunks_exact(n - low)) {
        out.extend_from_slice(own);
        out.extend_from_slice(high);
    }
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
