//! The fetch pool: a few worker threads take fetch jobs from a queue, background refreshes
//! of held tokens first, first fetches in arrival order. A flood of names costs queue
//! entries, not threads, sockets or descriptors; a queued job whose reader's deadline
//! passes is handed back (`take_overdue`) so its readers are answered within `--timeout`.

use super::Key;
use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Fetches running at once, at most.
pub const MAX_WORKERS: usize = 8;
/// A worker with nothing to do for this long ends (an idle mount keeps no fetch threads).
const IDLE_EXIT: Duration = Duration::from_secs(30);

/// One fetch of one key.
pub struct Job {
    pub key: Key,
    /// When the first reader waiting for it gives up: fixed when that reader started waiting,
    /// never extended (not by a restart after SIGUSR1 either).
    pub deadline: Instant,
    /// A refresh of a held token (background or a reader past the refresh point): goes
    /// before first fetches, in the queue and for the upstream rate limit.
    pub refresh: bool,
}

/// What became of a pushed job.
pub enum Pushed {
    Queued,
    /// Queued, and no worker is free: start one.
    StartWorker,
    /// The pool is stopped: the job is handed back.
    Stopped(Job),
}

/// Everything behind the pool's one lock (a leaf: nothing else is locked while it is held).
#[derive(Default)]
struct Queue {
    /// Refreshes of held tokens, taken first.
    refresh: VecDeque<Job>,
    /// First fetches (a reader without a valid token waits), in arrival order.
    first: VecDeque<Job>,
    /// Worker threads alive.
    workers: usize,
    /// Workers waiting for a job.
    idle: usize,
    /// `stop` was called: no job is taken or queued again.
    stopped: bool,
}

impl Queue {
    fn len(&self) -> usize {
        self.refresh.len() + self.first.len()
    }
}

/// Shared by the cache and its workers (cheap to clone).
#[derive(Clone, Default)]
pub struct Pool {
    /// The queue, and the condition idle workers wait on for a job.
    inner: Arc<(Mutex<Queue>, Condvar)>,
}

impl Pool {
    /// Queues `job`: `StartWorker` when the caller must start a worker for it (then call
    /// `not_started` if that fails); `Stopped` hands it back (its readers must be answered).
    pub fn push(&self, job: Job) -> Pushed {
        let (queue, cv) = &*self.inner;
        let mut q = queue.lock();
        if q.stopped {
            return Pushed::Stopped(job);
        }
        if job.refresh {
            q.refresh.push_back(job);
        } else {
            q.first.push_back(job);
        }
        let start = q.len() > q.idle && q.workers < MAX_WORKERS;
        if start {
            q.workers += 1;
        }
        cv.notify_one();
        if start {
            Pushed::StartWorker
        } else {
            Pushed::Queued
        }
    }

    /// A worker `push` asked for could not be started: when none runs at all, every queued
    /// job is handed back for its readers to be answered.
    pub fn not_started(&self) -> Vec<Job> {
        let mut q = self.inner.0.lock();
        q.workers -= 1;
        if q.workers > 0 {
            return Vec::new();
        }
        let mut jobs: Vec<Job> = q.refresh.drain(..).collect();
        jobs.extend(q.first.drain(..));
        jobs
    }

    /// The next job for a worker; `None` when the worker should end.
    pub fn next(&self) -> Option<Job> {
        let (queue, cv) = &*self.inner;
        let mut q = queue.lock();
        loop {
            if q.stopped {
                q.workers -= 1;
                return None;
            }
            if let Some(job) = q.refresh.pop_front().or_else(|| q.first.pop_front()) {
                return Some(job);
            }
            q.idle += 1;
            let timed_out = cv.wait_for(&mut q, IDLE_EXIT).timed_out();
            q.idle -= 1;
            if timed_out && q.len() == 0 {
                q.workers -= 1;
                return None;
            }
        }
    }

    /// Removes and returns the queued jobs whose deadline is past.
    pub fn take_overdue(&self, now: Instant) -> Vec<Job> {
        let mut q = self.inner.0.lock();
        if q.len() == 0 {
            return Vec::new();
        }
        let mut overdue = Vec::new();
        let q = &mut *q;
        for list in [&mut q.refresh, &mut q.first] {
            let (late, keep): (VecDeque<Job>, VecDeque<Job>) =
                list.drain(..).partition(|j| j.deadline <= now);
            *list = keep;
            overdue.extend(late);
        }
        overdue
    }

    /// The earliest deadline of a queued job.
    pub fn next_deadline(&self) -> Option<Instant> {
        let q = self.inner.0.lock();
        q.refresh
            .iter()
            .chain(q.first.iter())
            .map(|j| j.deadline)
            .min()
    }

    /// Jobs waiting for a worker.
    pub fn queued(&self) -> usize {
        self.inner.0.lock().len()
    }

    /// Ends every worker once its current job is done and refuses new jobs; the queued
    /// ones are handed back (their readers must be answered).
    pub fn stop(&self) -> Vec<Job> {
        let (queue, cv) = &*self.inner;
        let mut q = queue.lock();
        q.stopped = true;
        cv.notify_all();
        let mut jobs: Vec<Job> = q.refresh.drain(..).collect();
        jobs.extend(q.first.drain(..));
        jobs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(name: &str, refresh: bool, deadline: Instant) -> Job {
        Job {
            key: Key::new(
                super::super::IdentityId::DEFAULT,
                crate::names::Resource::for_test(name),
            ),
            deadline,
            refresh,
        }
    }

    #[test]
    fn refreshes_go_first_and_workers_are_capped() {
        let pool = Pool::default();
        let later = Instant::now() + Duration::from_secs(60);
        let mut started = 0;
        for i in 0..20 {
            started += usize::from(matches!(
                pool.push(job(&format!("first-{i}"), false, later)),
                Pushed::StartWorker
            ));
        }
        assert_eq!(started, MAX_WORKERS, "one worker per job up to the cap");
        assert!(matches!(
            pool.push(job("refresh", true, later)),
            Pushed::Queued
        ));
        assert_eq!(pool.queued(), 21);
        assert_eq!(pool.next().unwrap().key.resource.as_str(), "refresh");
        assert_eq!(pool.next().unwrap().key.resource.as_str(), "first-0");
    }

    #[test]
    fn overdue_jobs_are_handed_back() {
        let pool = Pool::default();
        let now = Instant::now();
        pool.push(job("late", false, now));
        pool.push(job("on-time", false, now + Duration::from_secs(60)));
        let late = pool.take_overdue(now);
        assert_eq!(late.len(), 1);
        assert_eq!(late[0].key.resource.as_str(), "late");
        assert_eq!(pool.queued(), 1);
    }

    #[test]
    fn a_stopped_pool_hands_back_what_it_held_and_what_comes() {
        let pool = Pool::default();
        let later = Instant::now() + Duration::from_secs(60);
        pool.push(job("queued", false, later));
        assert_eq!(pool.stop().len(), 1);
        assert!(matches!(
            pool.push(job("late", false, later)),
            Pushed::Stopped(_)
        ));
    }

    #[test]
    fn a_pool_without_workers_hands_its_jobs_back() {
        let pool = Pool::default();
        assert!(matches!(
            pool.push(job("a", false, Instant::now())),
            Pushed::StartWorker
        ));
        let back = pool.not_started();
        assert_eq!(back.len(), 1);
        assert_eq!(pool.queued(), 0);
    }
}
