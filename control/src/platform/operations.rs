//! The one way to run a long operation: record it pending, run it as a task, record its
//! progress and its end (succeeded, or failed with a stable code and a sentence for the user,
//! the detail in the log), count it in the metrics.

use std::future::Future;
use std::sync::Arc;

use pgwarden_api::control::{Operation, OperationStatus};
use tracing::error;

use super::Platform;
use crate::failure::Reportable;
use crate::state::StoreError;

/// A running operation's handle to report progress.
pub struct Progress {
    platform: Arc<Platform>,
    op: Operation,
}

impl Progress {
    pub fn set(&mut self, progress: f64) {
        self.platform.update_operation(&mut self.op, OperationStatus::Running, progress);
    }

    pub fn id(&self) -> &str {
        &self.op.id
    }
}

impl Platform {
    /// Records a new operation on `database_id`, pending.
    pub fn new_operation(&self, kind: &str, database_id: &str) -> Result<Operation, StoreError> {
        let op = Operation {
            id: format!("op-{}", self.store.next_counter("operation_seq")?),
            kind: kind.into(),
            database_id: database_id.into(),
            status: OperationStatus::Pending,
            progress: 0.0,
            error: None,
            error_code: None,
        };
        self.store.put_operation(&op)?;
        Ok(op)
    }

    pub fn update_operation(&self, op: &mut Operation, status: OperationStatus, progress: f64) {
        op.status = status;
        op.progress = progress;
        if let Err(e) = self.store.put_operation(op) {
            error!(error = %e, operation = %op.id, "cannot record operation progress");
        }
    }

    /// Records an operation and runs `task` as it; returns the operation (pending) to answer
    /// with. `task` reports progress through its `Progress`; its error is what the operation
    /// says when it fails.
    pub fn spawn_operation<F, Fut, E>(
        self: &Arc<Self>,
        kind: &'static str,
        database_id: &str,
        task: F,
    ) -> Result<Operation, StoreError>
    where
        F: FnOnce(Progress) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Reportable + Send + 'static,
    {
        let op = self.new_operation(kind, database_id)?;
        self.run_operation(op.clone(), task);
        Ok(op)
    }

    /// Runs `task` as the already recorded `op` (an operation resumed after a restart).
    pub fn run_operation<F, Fut, E>(
        self: &Arc<Self>,
        op: Operation,
        task: F,
    ) -> tokio::task::JoinHandle<()>
    where
        F: FnOnce(Progress) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Reportable + Send + 'static,
    {
        let platform = self.clone();
        tokio::spawn(async move {
            let kind = op.kind.clone();
            let mut progress = Progress { platform: platform.clone(), op };
            let start = progress.op.progress.max(0.05);
            progress.set(start);
            let result =
                task(Progress { platform: platform.clone(), op: progress.op.clone() }).await;
            // The task's own handle recorded its progress in the store; read where it got.
            let mut op =
                platform.store.operation(&progress.op.id).ok().flatten().unwrap_or(progress.op);
            platform.metrics.operation(&kind, result.is_ok());
            match result {
                Ok(()) => platform.update_operation(&mut op, OperationStatus::Succeeded, 1.0),
                Err(e) => {
                    // The whole detail is the log's; the operation keeps what the user reads.
                    error!(operation = %op.id, kind, code = e.code(), error = %e, "operation failed");
                    op.error = Some(e.sentence());
                    op.error_code = Some(e.code().to_owned());
                    let at = op.progress;
                    platform.update_operation(&mut op, OperationStatus::Failed, at);
                }
            }
        })
    }
}
