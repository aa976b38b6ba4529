//! The one way to run a long operation: record it pending, run it as a task, record its
//! progress and its end (succeeded, or failed with a stable code and a sentence for the user,
//! the detail in the log), count it in the metrics. Operations are tasks of their own,
//! tracked: a stop of the control plane ends them (at their next await) and waits for them, as
//! a kill would, and the next start resumes or fails them (`server::recover`).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use pgwarden_api::control::{Operation, OperationStatus};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::error;

use crate::failure::Reportable;
use crate::metrics::Metrics;
use crate::state::{Records, StoreError};

/// Where operations are recorded and counted, and their tasks.
#[derive(Clone)]
pub struct Operations {
    records: Arc<Records>,
    metrics: Metrics,
    tasks: TaskTracker,
    stop: CancellationToken,
}

/// A running operation's handle to report progress.
pub struct Progress {
    operations: Operations,
    op: Operation,
}

impl Progress {
    pub async fn set(&mut self, progress: f64) {
        self.operations.update(&mut self.op, OperationStatus::Running, progress).await;
    }

    pub fn id(&self) -> &str {
        &self.op.id
    }
}

impl Operations {
    pub fn new(records: Arc<Records>, metrics: Metrics) -> Self {
        Self { records, metrics, tasks: TaskTracker::new(), stop: CancellationToken::new() }
    }

    /// Ends every running operation and waits for them, at most `within`; false when some did
    /// not end in time. Operations started afterwards end at once.
    pub async fn stop(&self, within: Duration) -> bool {
        self.stop.cancel();
        self.tasks.close();
        tokio::time::timeout(within, self.tasks.wait()).await.is_ok()
    }

    /// Records a new operation on `database_id`, pending.
    pub async fn new_operation(
        &self,
        kind: &str,
        database_id: &str,
    ) -> Result<Operation, StoreError> {
        let op = Operation {
            id: format!("op-{}", self.records.store.next_counter("operation_seq").await?),
            kind: kind.into(),
            database_id: database_id.into(),
            status: OperationStatus::Pending,
            progress: 0.0,
            error: None,
            error_code: None,
        };
        self.records.store.put_operation(&op).await?;
        Ok(op)
    }

    pub async fn update(&self, op: &mut Operation, status: OperationStatus, progress: f64) {
        op.status = status;
        op.progress = progress;
        if let Err(e) = self.records.store.put_operation(op).await {
            error!(error = %e, operation = %op.id, "cannot record operation progress");
        }
    }

    /// Records an operation and runs `task` as it; returns the operation (pending) to answer
    /// with. `task` reports progress through its `Progress`; its error is what the operation
    /// says when it fails.
    pub async fn spawn<F, Fut, E>(
        &self,
        kind: &'static str,
        database_id: &str,
        task: F,
    ) -> Result<Operation, StoreError>
    where
        F: FnOnce(Progress) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Reportable + Send + 'static,
    {
        let op = self.new_operation(kind, database_id).await?;
        self.run(op.clone(), task);
        Ok(op)
    }

    /// Runs `task` as the already recorded `op` (an operation resumed after a restart).
    pub fn run<F, Fut, E>(&self, op: Operation, task: F) -> tokio::task::JoinHandle<()>
    where
        F: FnOnce(Progress) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Reportable + Send + 'static,
    {
        let operations = self.clone();
        let stop = self.stop.clone();
        let run = async move {
            let kind = op.kind.clone();
            let mut progress = Progress { operations: operations.clone(), op };
            let start = progress.op.progress.max(0.05);
            progress.set(start).await;
            let result =
                task(Progress { operations: operations.clone(), op: progress.op.clone() }).await;
            // The task's own handle recorded its progress in the store; read where it got.
            let mut op = operations
                .records
                .store
                .operation(&progress.op.id)
                .await
                .ok()
                .flatten()
                .unwrap_or(progress.op);
            operations.metrics.operation(&kind, result.is_ok());
            match result {
                Ok(()) => operations.update(&mut op, OperationStatus::Succeeded, 1.0).await,
                Err(e) => {
                    // The whole detail is the log's; the operation keeps what the user reads.
                    error!(operation = %op.id, kind, code = e.code(), error = %e, "operation failed");
                    op.error = Some(e.sentence());
                    op.error_code = Some(e.code().to_owned());
                    let at = op.progress;
                    operations.update(&mut op, OperationStatus::Failed, at).await;
                }
            }
        };
        self.tasks.spawn(async move {
            tokio::select! {
                () = run => {}
                () = stop.cancelled() => {}
            }
        })
    }
}
