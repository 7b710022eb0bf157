//! The bounded blocking pool plugin calls run on, so a plugin never blocks the async runtime.
//!
//! A fixed set of OS threads takes jobs from a bounded queue. A call that finds the queue full
//! fails at once with [`CallError::Overloaded`] rather than piling up; a call that does not
//! answer within its timeout fails with [`CallError::Timeout`] (its thread stays busy until the
//! plugin returns: a thread cannot be killed, which is what the process isolation tier is for).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
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
}

impl PluginPool {
    /// Starts the worker threads.
    pub fn new(options: PoolOptions) -> std::io::Result<Self> {
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
        Ok(Self { jobs })
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
        let job: Job = Box::new(move || {
            let _ = answer.send(instance.call(operation, &input));
        });
        self.jobs.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => CallError::Overloaded,
            TrySendError::Disconnected(_) => CallError::Unavailable,
        })?;
        match tokio::time::timeout(timeout, receive).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(CallError::Unavailable),
            Err(_) => Err(CallError::Timeout(timeout)),
        }
    }
}
