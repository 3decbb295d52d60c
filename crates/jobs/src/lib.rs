//! `strata-jobs`: Strata's block jobs.
//!
//! [`job`] is QEMU's job model (statuses, verbs, events, pauses, cancellation, error
//! actions) with a [`job::JobManager`] that QMP commands drive; [`ratelimit`] is the
//! 100 ms-slice rate limiter that `speed` controls; [`backup`] is the live backup
//! job with its copy-before-write hook and block-copy engine.

pub mod backup;
pub mod job;
pub mod ratelimit;

pub use job::{
    ErrorAction, EventSink, Job, JobContext, JobDriver, JobError, JobManager, JobOptions,
    JobStatus, NoEvents, OnError, Verb,
};

#[cfg(test)]
mod tests;
