//! This host's nodes for the control plane's async workflows: each call of the blocking
//! [`LocalDriver`] runs on a blocking thread, once.

use std::path::Path;
use std::sync::Arc;

use super::driver::{
    Call, DiskUsage, Done, DriverError, NodeConfig, NodeDriver, NodeResources, NodeSpec, Upstream,
};
use super::local::LocalDriver;

/// This host's driver for the control plane: each call runs on a blocking thread, once.
#[derive(Clone)]
pub struct ThisHost(pub Arc<LocalDriver>);

impl ThisHost {
    /// Runs `work` with the driver and a copy of `node` on a blocking thread.
    fn off<'a, T: Send + 'static>(
        &self,
        node: &NodeSpec,
        interrupted: impl FnOnce(String) -> T + Send + 'a,
        work: impl FnOnce(&LocalDriver, &NodeSpec) -> T + Send + 'static,
    ) -> Call<'a, T> {
        let (driver, node) = (Arc::clone(&self.0), node.clone());
        let running = tokio::task::spawn_blocking(move || work(&driver, &node));
        Box::pin(async move { running.await.unwrap_or_else(|e| interrupted(e.to_string())) })
    }

    /// As `off`, for a call that changes the node.
    fn change<'a>(
        &self,
        node: &NodeSpec,
        work: impl FnOnce(&LocalDriver, &NodeSpec) -> Done + Send + 'static,
    ) -> Call<'a, Done> {
        self.off(node, |e| Err(DriverError::Interrupted(e)), work)
    }
}

impl NodeDriver for ThisHost {
    fn init<'a>(&'a self, node: &'a NodeSpec, config: &'a NodeConfig) -> Call<'a, Done> {
        let config = config.clone();
        self.change(node, move |d, n| d.init(n, &config))
    }

    fn init_standby<'a>(
        &'a self,
        node: &'a NodeSpec,
        config: &'a NodeConfig,
        upstream: &'a Upstream,
    ) -> Call<'a, Done> {
        let (config, upstream) = (config.clone(), upstream.clone());
        self.change(node, move |d, n| d.init_standby(n, &config, &upstream))
    }

    fn configure<'a>(&'a self, node: &'a NodeSpec, config: &'a NodeConfig) -> Call<'a, Done> {
        let config = config.clone();
        self.change(node, move |d, n| d.configure(n, &config))
    }

    fn start<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, Done> {
        self.change(node, |d, n| d.start(n))
    }

    fn stop<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, Done> {
        self.change(node, |d, n| d.stop(n))
    }

    fn reload<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, Done> {
        self.change(node, |d, n| d.reload(n))
    }

    fn is_running<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, bool> {
        // A few reads of /proc and of the node's pid file, microseconds: on this thread. Handed
        // to a blocking thread, a listing of hundreds of nodes on a busy machine spent most of
        // its time waiting for those threads' turns.
        let running = self.0.is_running(node);
        Box::pin(std::future::ready(running))
    }

    fn fence<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, Done> {
        self.change(node, |d, n| d.fence(n))
    }

    fn promote<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, Done> {
        self.change(node, |d, n| d.promote(n))
    }

    fn rewind<'a>(&'a self, node: &'a NodeSpec, source: &'a NodeSpec) -> Call<'a, Done> {
        let source = source.clone();
        self.change(node, move |d, n| d.rewind(n, &source))
    }

    fn rewind_from<'a>(&'a self, node: &'a NodeSpec, source: &'a Upstream) -> Call<'a, Done> {
        let source = source.clone();
        self.change(node, move |d, n| d.rewind_from(n, &source))
    }

    fn make_standby<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, Done> {
        self.change(node, |d, n| d.make_standby(n))
    }

    fn init_from_backup<'a>(
        &'a self,
        node: &'a NodeSpec,
        config: &'a NodeConfig,
        base: &'a Path,
        wal: &'a Path,
    ) -> Call<'a, Done> {
        let (config, base, wal) = (config.clone(), base.to_owned(), wal.to_owned());
        self.change(node, move |d, n| d.init_from_backup(n, &config, &base, &wal))
    }

    fn log_tail<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, String> {
        self.off(node, |e| e, |d, n| d.log_tail(n))
    }

    fn destroy<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, Done> {
        self.change(node, |d, n| d.destroy(n))
    }

    fn dump<'a>(
        &'a self,
        node: &'a NodeSpec,
        database: &'a str,
        tools: &'a Path,
        file: &'a Path,
    ) -> Call<'a, Done> {
        let (database, tools, file) = (database.to_owned(), tools.to_owned(), file.to_owned());
        self.change(node, move |d, n| d.dump(n, &database, &tools, &file))
    }

    fn admin_conninfo(&self, node: &NodeSpec, database: &str) -> String {
        self.0.admin_conninfo(node, database)
    }

    fn resources<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, NodeResources> {
        self.off(node, |_| NodeResources::default(), |d, n| d.resources(n))
    }

    fn disk<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, DiskUsage> {
        self.off(node, |_| DiskUsage::default(), |d, n| d.disk(n))
    }
}
