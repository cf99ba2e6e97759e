//! A TCP proxy that injects network faults between the store and its `redis-server`.
//!
//! `FaultProxy::start(target)` listens on `127.0.0.1:0` and relays every connection to
//! `target`. [`FaultProxy::set`] switches the [`Fault`] at run time, and the switch applies to
//! connections already open as well as to new ones: a connection pool that connected while
//! the network was healthy sees the fault on its next read or write, as it would in
//! production.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does to the bytes it relays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Relays everything as it comes.
    PassThrough,
    /// Delays every chunk, in either direction, by this much.
    Latency(Duration),
    /// Accepts connections and reads what each side sends, but forwards nothing until the
    /// fault changes (then the held bytes go through).
    Stall,
    /// Resets (RST) every open connection, and every new one as soon as it is accepted.
    Reset,
    /// Forwards only the first `n` bytes of each reply from the server, then closes the
    /// connection (FIN, as a server that died mid-write). A reply is what the server sends
    /// between two writes of the client, so replies shorter than `n` pass untouched.
    CutReply(usize),
}

/// The proxy; it runs until the test's runtime shuts down.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

struct Shared {
    fault: watch::Sender<Fault>,
    /// How many times a fault acted: a chunk delayed or held, a connection reset, a reply cut.
    injected: AtomicUsize,
    /// Connections being relayed now.
    open: AtomicUsize,
}

impl FaultProxy {
    /// Starts a proxy to `target` in [`Fault::PassThrough`] mode.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            fault: watch::channel(Fault::PassThrough).0,
            injected: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
        });
        tokio::spawn(accept(listener, target, shared.clone()));
        Self { addr, shared }
    }

    /// `redis://127.0.0.1:{port}` of the proxy.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Switches the fault for open and new connections.
    pub fn set(&self, fault: Fault) {
        self.shared.fault.send_replace(fault);
    }

    /// How many times a fault acted since the proxy started; a test asserts it moved, so a
    /// fault that never engaged cannot pass for a fault the cache survived.
    pub fn injected(&self) -> usize {
        self.shared.injected.load(Ordering::SeqCst)
    }

    /// How many connections the proxy relays now. A connection the client closed while its
    /// bytes were held by [`Fault::Stall`] counts until the stall ends.
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }
}

async fn accept(listener: TcpListener, target: SocketAddr, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            if *shared.fault.borrow() == Fault::Reset {
                shared.injected.fetch_add(1, Ordering::SeqCst);
                reset(client);
                return;
            }
            if let Ok(server) = TcpStream::connect(target).await {
                relay(client, server, &shared).await;
            }
        });
    }
}

/// Why a relayed connection ended.
enum End {
    /// One side closed or failed: drop both, gracefully.
    Closed,
    /// The fault says reset: RST both sides.
    Reset,
    /// A reply was cut: close both, gracefully, mid-reply.
    Cut,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    ToServer,
    ToClient,
}

async fn relay(mut client: TcpStream, mut server: TcpStream, shared: &Shared) {
    shared.open.fetch_add(1, Ordering::SeqCst);
    struct Open<'a>(&'a AtomicUsize);
    impl Drop for Open<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let _open = Open(&shared.open);
    // Bytes sent to the client since the client last wrote: the size of the current reply.
    let reply_len = AtomicUsize::new(0);
    let end = {
        let (from_client, to_client) = client.split();
        let (from_server, to_server) = server.split();
        tokio::select! {
            () = reset_requested(shared.fault.subscribe()) => End::Reset,
            end = pump(from_client, to_server, Direction::ToServer, shared, &reply_len) => end,
            end = pump(from_server, to_client, Direction::ToClient, shared, &reply_len) => end,
        }
    };
    match end {
        End::Reset => {
            shared.injected.fetch_add(1, Ordering::SeqCst);
            reset(client);
            reset(server);
        }
        End::Closed | End::Cut => {}
    }
}

/// Returns once the fault is [`Fault::Reset`].
async fn reset_requested(mut fault: watch::Receiver<Fault>) {
    while *fault.borrow_and_update() != Fault::Reset {
        if fault.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Closes `stream` with a RST rather than a FIN.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn pump(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    direction: Direction,
    shared: &Shared,
    reply_len: &AtomicUsize,
) -> End {
    let mut fault = shared.fault.subscribe();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return End::Closed,
            Ok(n) => n,
        };
        let mut chunk = &buf[..n];
        let mut cut = false;
        // Decide under the current fault; a held chunk waits for the next switch.
        loop {
            let current = *fault.borrow_and_update();
            match current {
                Fault::PassThrough => {}
                Fault::Latency(delay) => {
                    shared.injected.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(delay).await;
                }
                Fault::Stall => {
                    shared.injected.fetch_add(1, Ordering::SeqCst);
                    if fault.changed().await.is_err() {
                        return End::Closed;
                    }
                    continue;
                }
                Fault::Reset => return End::Reset,
                Fault::CutReply(limit) if direction == Direction::ToClient => {
                    let room = limit.saturating_sub(reply_len.load(Ordering::SeqCst));
                    if chunk.len() > room {
                        shared.injected.fetch_add(1, Ordering::SeqCst);
                        chunk = &chunk[..room];
                        cut = true;
                    }
                }
                Fault::CutReply(_) => {}
            }
            break;
        }
        match direction {
            Direction::ToServer => reply_len.store(0, Ordering::SeqCst),
            Direction::ToClient => {
                reply_len.fetch_add(chunk.len(), Ordering::SeqCst);
            }
        }
        if to.write_all(chunk).await.is_err() {
            return End::Closed;
        }
        if cut {
            let _ = to.flush().await;
            return End::Cut;
        }
    }
}
