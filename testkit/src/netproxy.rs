//! A TCP proxy in front of one broker: the network between the gateway's Kafka clients
//! and that broker, with faults a test can switch on and off (added latency, a stall,
//! every connection reset, the broker unreachable).
//!
//! It runs on a thread of its own with its own runtime, so it outlives any one test's
//! runtime and never competes with the code under test for its threads. Brokers talk to
//! each other (replication, the controller) on another listener, past the proxy: a fault
//! here is one between the clients and the cluster, as a flaky client network is.

use anyhow::Context as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does to the traffic it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetMode {
    /// Passes everything through.
    Pass,
    /// Holds every chunk this long before passing it on (both directions).
    Latency(Duration),
    /// Passes nothing (connections stay open, bytes wait) until the mode changes.
    Stall,
    /// Refuses new connections and closes the open ones: the broker is unreachable.
    Down,
}

struct Shared {
    mode: watch::Sender<NetMode>,
    /// Bumped to close every open connection (with a TCP reset).
    resets: AtomicU64,
    connections: AtomicU64,
}

/// One proxy; dropping it does not stop it (it ends with the process).
#[derive(Clone)]
pub struct NetProxy {
    pub listen: SocketAddr,
    pub upstream: SocketAddr,
    shared: Arc<Shared>,
}

impl NetProxy {
    /// Listens on `listen` (a port of 0 picks a free one) and forwards to `upstream`.
    pub fn start(listen: SocketAddr, upstream: SocketAddr) -> anyhow::Result<NetProxy> {
        let std_listener = std::net::TcpListener::bind(listen)
            .with_context(|| format!("the Kafka proxy cannot listen on {listen} (port in use?)"))?;
        std_listener.set_nonblocking(true)?;
        let listen = std_listener.local_addr()?;
        let (mode, _) = watch::channel(NetMode::Pass);
        let shared = Arc::new(Shared {
            mode,
            resets: AtomicU64::new(0),
            connections: AtomicU64::new(0),
        });
        let proxy = NetProxy {
            listen,
            upstream,
            shared: shared.clone(),
        };
        std::thread::Builder::new()
            .name(format!("kafka-proxy-{}", listen.port()))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        eprintln!("kafka proxy {listen}: no runtime: {e}");
                        return;
                    }
                };
                rt.block_on(async move {
                    let listener = match TcpListener::from_std(std_listener) {
                        Ok(l) => l,
                        Err(e) => {
                            eprintln!("kafka proxy {listen}: {e}");
                            return;
                        }
                    };
                    loop {
                        let Ok((client, _)) = listener.accept().await else {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        };
                        if *shared.mode.borrow() == NetMode::Down {
                            reset(client);
                            continue;
                        }
                        shared.connections.fetch_add(1, Ordering::Relaxed);
                        tokio::spawn(carry(client, upstream, shared.clone()));
                    }
                });
            })
            .context("starting the Kafka proxy's thread")?;
        Ok(proxy)
    }

    pub fn set_mode(&self, mode: NetMode) {
        self.shared.mode.send_replace(mode);
        if mode == NetMode::Down {
            self.reset_connections();
        }
    }

    pub fn mode(&self) -> NetMode {
        *self.shared.mode.borrow()
    }

    /// Closes every open connection with a reset (the clients reconnect).
    pub fn reset_connections(&self) {
        self.shared.resets.fetch_add(1, Ordering::Relaxed);
        // Wake the connections so they see it.
        self.shared.mode.send_modify(|_| {});
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }
}

/// Closes a socket with a TCP reset rather than a clean FIN.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn carry(client: TcpStream, upstream: SocketAddr, shared: Arc<Shared>) {
    let generation = shared.resets.load(Ordering::Relaxed);
    let Ok(server) = TcpStream::connect(upstream).await else {
        // The broker is down: the client sees its connection refused the same way.
        reset(client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pump(cr, sw, shared.clone(), generation);
    let down = pump(sr, cw, shared.clone(), generation);
    // Whichever side ends (or a reset) ends the connection; the other half is dropped.
    tokio::select! {
        () = up => {}
        () = down => {}
    }
}

/// Copies one direction, applying the mode to every chunk; a reset closes both sockets
/// with a TCP reset.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    shared: Arc<Shared>,
    generation: u64,
) {
    let reset_both = |from: &tokio::net::tcp::OwnedReadHalf,
                      to: &tokio::net::tcp::OwnedWriteHalf| {
        let _ = AsRef::<TcpStream>::as_ref(from).set_zero_linger();
        let _ = AsRef::<TcpStream>::as_ref(to).set_zero_linger();
    };
    let mut mode = shared.mode.subscribe();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = mode.changed() => {
                if shared.resets.load(Ordering::Relaxed) != generation {
                    return reset_both(&from, &to);
                }
                continue;
            }
        };
        loop {
            if shared.resets.load(Ordering::Relaxed) != generation {
                return reset_both(&from, &to);
            }
            let current = *mode.borrow_and_update();
            match current {
                NetMode::Pass => break,
                NetMode::Latency(d) => {
                    tokio::time::sleep(d).await;
                    break;
                }
                NetMode::Stall => {
                    let _ = mode.changed().await;
                }
                NetMode::Down => return reset_both(&from, &to),
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
