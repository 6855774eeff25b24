//! A TCP forwarder between a service and its NATS server that a test can cut, to make a real
//! network partition of one process: its connections are severed and new ones refused until the
//! test heals it, while every other client keeps talking to the same server. It can also drop
//! what the server sends while relaying what the client sends ([`CuttableLink::mute`]), which
//! is what a connection about to break does to the bytes in flight: the server counts them as
//! delivered, the client never sees them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A forwarder listening on 127.0.0.1 that relays every connection to `upstream`.
pub struct CuttableLink {
    /// `host:port` the service should connect to instead of the upstream.
    pub addr: String,
    down: Arc<AtomicBool>,
    muted: Arc<AtomicBool>,
    links: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl CuttableLink {
    /// Starts forwarding to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> CuttableLink {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr").to_string();
        let down = Arc::new(AtomicBool::new(false));
        let muted = Arc::new(AtomicBool::new(false));
        let links: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let upstream = upstream.to_string();
        let accept = {
            let (down, muted, links) = (down.clone(), muted.clone(), links.clone());
            tokio::spawn(async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if down.load(Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    let (upstream, muted) = (upstream.clone(), muted.clone());
                    let link = tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(&upstream).await else {
                            return;
                        };
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        let (mut cr, mut cw) = client.split();
                        let (mut sr, mut sw) = server.into_split();
                        let up = tokio::io::copy(&mut cr, &mut sw);
                        let down = async {
                            let mut buf = vec![0u8; 64 * 1024];
                            loop {
                                let n = sr.read(&mut buf).await?;
                                if n == 0 {
                                    return Ok::<(), std::io::Error>(());
                                }
                                if !muted.load(Ordering::SeqCst) {
                                    cw.write_all(&buf[..n]).await?;
                                }
                            }
                        };
                        tokio::select! {
                            _ = up => {}
                            _ = down => {}
                        }
                    });
                    links.lock().expect("links").push(link);
                }
            })
        };
        CuttableLink {
            addr,
            down,
            muted,
            links,
            accept,
        }
    }

    /// Severs every relayed connection and refuses new ones until [`CuttableLink::heal`].
    pub fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        for link in self.links.lock().expect("links").drain(..) {
            link.abort();
        }
    }

    /// Drops whatever the server sends from now on (the client's bytes still go through),
    /// until [`CuttableLink::heal`].
    pub fn mute(&self) {
        self.muted.store(true, Ordering::SeqCst);
    }

    /// Accepts and relays connections again, both ways.
    pub fn heal(&self) {
        self.muted.store(false, Ordering::SeqCst);
        self.down.store(false, Ordering::SeqCst);
    }
}

impl Drop for CuttableLink {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}
