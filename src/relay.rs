//! A TCP relay the tests can cut, as a network link that starts dropping packets: while cut,
//! it forwards nothing either way (connections stay open, silent; new ones are accepted and
//! left silent), so that a client finds out only through its own timeouts. Healed, it closes
//! the silent connections and forwards new ones again.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Relay {
    pub addr: SocketAddr,
    cut: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// A relay on a free port of `host` to `target`.
    pub async fn start(host: &str, target: SocketAddr) -> Self {
        let listener = TcpListener::bind((host, 0)).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (cut, watching) = watch::channel(false);
        let watching = Arc::new(watching);
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { continue };
                tokio::spawn(relay(client, target, watch::Receiver::clone(&watching)));
            }
        });
        Self { addr, cut, task }
    }

    /// Drops everything from now on.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Forwards again (connections opened or silenced while cut are closed).
    pub fn heal(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(mut client: TcpStream, target: SocketAddr, mut cut: watch::Receiver<bool>) {
    if *cut.borrow_and_update() {
        let _ = cut.wait_for(|cut| !*cut).await;
        return;
    }
    let Ok(mut server) = TcpStream::connect(target).await else { return };
    let silenced = tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => false,
        _ = cut.wait_for(|cut| *cut) => true,
    };
    if silenced {
        // Silent until healed, then closed.
        let _ = cut.wait_for(|cut| !*cut).await;
    } else {
        let _ = client.shutdown().await;
    }
}
