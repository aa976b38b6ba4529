//! A node's socket, forwarded: the PostgreSQL client programs the control plane runs against a
//! node (`pg_dumpall`, `pg_dump`, `psql` of a major upgrade) reach a node on another host
//! through its agent's SQL tunnel, as a Unix socket in a private directory of the control
//! plane. Only the control plane's own user can reach that directory (0700): the tunnel ends
//! at the node's socket, where `postgres` logs in without a password.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::nodes::config::conninfo;
use crate::nodes::context::Tunnels;
use crate::nodes::NodeSpec;

/// The port in the socket's name (`.s.PGSQL.<port>`); any would do.
const PORT: u16 = 5432;

/// How long opening the tunnel of one connection may take.
const TUNNEL_WAIT: Duration = Duration::from_secs(10);

/// A forwarded node socket; closed (and its directory removed) when dropped.
pub struct Forward {
    dir: PathBuf,
    stop: CancellationToken,
}

impl Forward {
    /// Forwards `node`'s socket into a new private directory under `scratch`.
    pub fn open(remote: Arc<dyn Tunnels>, node: NodeSpec, scratch: &Path) -> std::io::Result<Self> {
        let dir = scratch.join(format!("socket-{:016x}", rand::random::<u64>()));
        crate::files::private_dir(&dir)?;
        let listener = match UnixListener::bind(dir.join(format!(".s.PGSQL.{PORT}"))) {
            Ok(listener) => listener,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, remote, node, stop.clone()));
        Ok(Self { dir, stop })
    }

    /// A superuser conninfo to `database` through the forwarded socket.
    pub fn conninfo(&self, database: &str) -> String {
        let (dir, port) = (self.dir.display().to_string(), PORT.to_string());
        conninfo(&[("host", &dir), ("port", &port), ("user", "postgres"), ("dbname", database)])
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.stop.cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Relays each connection to the node through a tunnel of its own, until `stop`.
async fn serve(
    listener: UnixListener,
    remote: Arc<dyn Tunnels>,
    node: NodeSpec,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => return,
        };
        let mut client = match accepted {
            Ok((client, _)) => client,
            Err(e) => {
                // Out of descriptors, say: a pause, not a spin.
                debug!(node = %node.name, error = %e, "cannot accept a forwarded connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (remote, node, stop) = (Arc::clone(&remote), node.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tunnel = match remote.open(&node, TUNNEL_WAIT).await {
                Ok(tunnel) => tunnel,
                Err(e) => {
                    return debug!(node = %node.name, error = %e, "no tunnel for a forwarded connection")
                }
            };
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut tunnel) => {}
                () = stop.cancelled() => {}
            }
        });
    }
}
