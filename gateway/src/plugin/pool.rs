//! The bounded blocking pool plugin calls run on, so a plugin never blocks the async runtime.
//!
//! A fixed set of OS threads takes jobs from a bounded queue. A call that finds the queue full
//! fails at once with [`CallError::Overloaded`] rather than piling up; a call that does not
//! answer within its timeout fails with [`CallError::Timeout`] (its thread stays busy until the
//! plugin returns: a thread cannot be killed, which is what the process isolation tier is for).
//! The gateway gives each plugin of each generation a pool of its own, so a plugin that hangs
//! can take only its own threads; calls still running past their timeout are counted (stuck)
//! until they return, and a reload starts fresh pools beside them.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use cardgate_sdk::Operation;
use crossbeam_channel::{Sender, TrySendError};

use super::error::CallError;
use super::loader::Instance;

type Job = Box<dyn FnOnce() + Send>;

/// Pool size and queue bound.
#[derive(Debug, Clone, Copy)]
pub struct PoolOptions {
    /// Worker threads.
    pub threads: usize,
    /// Calls that may wait for a thread; more are refused with [`CallError::Overloaded`].
    pub queue: usize,
}

impl Default for PoolOptions {
    fn default() -> Self {
        let threads = thread::available_parallelism().map_or(2, |n| n.get()) * 4;
        Self { threads, queue: threads * 64 }
    }
}

/// A handle to the pool; clones share it.
///
/// The worker threads live until the last handle is dropped: that closes the queue, each
/// worker finishes the job it holds and exits.
#[derive(Debug, Clone)]
pub struct PluginPool {
    jobs: Sender<Job>,
    /// Calls that ran past their timeout and have not returned yet: each holds a thread.
    stuck: Arc<AtomicUsize>,
    /// The plugin the pool serves, for the stuck-calls gauge (empty: none is kept).
    label: Arc<str>,
}

/// A call's progress, shared by the waiter and the worker.
const QUEUED: u8 = 0;
const RUNNING: u8 = 1;
const DONE: u8 = 2;
/// Its waiter gave up while it was queued: it is never started.
const GIVEN_UP_QUEUED: u8 = 3;
/// Its waiter gave up while it ran: a stuck call, counted until it returns.
const GIVEN_UP_RUNNING: u8 = 4;

impl PluginPool {
    /// Starts the worker threads.
    pub fn new(options: PoolOptions) -> std::io::Result<Self> {
        Self::named(options, "")
    }

    /// A pool of its own for one plugin: its calls, stuck or not, take only these threads.
    /// Its stuck calls are shown as `cardgate_plugin_stuck_calls{plugin=label}`.
    pub fn named(options: PoolOptions, label: &str) -> std::io::Result<Self> {
        let (jobs, queue) = crossbeam_channel::bounded::<Job>(options.queue.max(1));
        for index in 0..options.threads.max(1) {
            let queue = queue.clone();
            thread::Builder::new().name(format!("cardgate-plugin-{index}")).spawn(move || {
                for job in queue {
                    // A job only calls a plugin (whose panics the ABI already contains) and
                    // sends the result; this guards the worker against anything else.
                    let _ = catch_unwind(AssertUnwindSafe(job));
                }
            })?;
        }
        Ok(Self { jobs, stuck: Arc::default(), label: Arc::from(label) })
    }

    /// Calls past their timeout still holding a thread.
    pub fn stuck(&self) -> usize {
        self.stuck.load(Ordering::Relaxed)
    }

    fn note_stuck(&self, change: isize) {
        let now = if change > 0 {
            self.stuck.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.stuck.fetch_sub(1, Ordering::Relaxed) - 1
        };
        if !self.label.is_empty() {
            crate::metrics::plugin_stuck(&self.label, now);
        }
    }

    /// Runs `instance.call(operation, input)` on a pool thread and waits for it, at most
    /// `timeout`.
    pub async fn call(
        &self,
        instance: Arc<Instance>,
        operation: Operation,
        input: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, CallError> {
        let (answer, receive) = tokio::sync::oneshot::channel();
        let progress = Arc::new(AtomicU8::new(QUEUED));
        let (worker_progress, pool) = (Arc::clone(&progress), self.clone());
        let job: Job = Box::new(move || {
            if worker_progress.compare_exchange(QUEUED, RUNNING, Ordering::AcqRel, Ordering::Acquire).is_err() {
                return; // Its caller has already answered (timed out) without it.
            }
            let result = instance.call(operation, &input);
            // Returned after its waiter gave up: the thread is free again.
            if worker_progress.swap(DONE, Ordering::AcqRel) == GIVEN_UP_RUNNING {
                pool.note_stuck(-1);
            }
            let _ = answer.send(result);
        });
        self.jobs.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => CallError::Overloaded,
            TrySendError::Disconnected(_) => CallError::Unavailable,
        })?;
        match tokio::time::timeout(timeout, receive).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(CallError::Unavailable),
            Err(_) => {
                // Still queued: it will not run. Running: counted as stuck until it returns.
                let given_up = progress.compare_exchange(QUEUED, GIVEN_UP_QUEUED, Ordering::AcqRel, Ordering::Acquire);
                if given_up.is_err()
                    && progress.compare_exchange(RUNNING, GIVEN_UP_RUNNING, Ordering::AcqRel, Ordering::Acquire).is_ok()
                {
                    self.note_stuck(1);
                }
                Err(CallError::Timeout(timeout))
            }
        }
    }
}
